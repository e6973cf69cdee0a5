"""Every tutorial runs as a script (as the README's main command runs the flagship) and meets the
result it states; the docs build executes the same files as notebooks."""

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted(p.name for p in (ROOT / "tutorials").glob("*.py"))


def _main_command():
    text = (ROOT / "README.md").read_text()
    return re.search(r"<!-- main-command -->\s*```bash\n(.*?)\n```", text, re.S).group(1).strip()


def _test_command():
    text = (ROOT / "README.md").read_text()
    return re.search(r"<!-- test-command -->\s*```bash\n(.*?)\n```", text, re.S).group(1).strip()


def _run(name, figures):
    env = dict(os.environ, NDE_FIGURES=str(figures), MPLBACKEND="Agg")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, str(ROOT / "tutorials" / name)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # CPU time of the tutorial's process: what it costs on an idle machine, whatever else is running
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, out.stdout


def test_main_command_sets_up_what_ci_tests_and_runs_the_flagship(tmp_path):
    """The main command's set-up is the test command's (which CI runs from a clean clone); its job,
    the flagship tutorial, trains a neural ODE in under two minutes and writes its figures."""
    main, tests = _main_command(), _test_command()
    setup = main.rsplit("&&", 1)[0].strip()
    assert tests.startswith(setup), (setup, tests)
    job = main.rsplit("&&", 1)[1].strip()
    m = re.fullmatch(r"NDE_FIGURES=(\S+) \.venv/bin/python (tutorials/\S+\.py)", job)
    assert m, job
    name = Path(m.group(2)).name
    cpu_seconds, stdout = _run(name, tmp_path / m.group(1))
    assert cpu_seconds < 120, cpu_seconds
    assert "final loss" in stdout
    assert list((tmp_path / m.group(1)).glob("*.png"))


@pytest.mark.parametrize("name", [n for n in TUTORIALS if n != "neural_ode.py"])
def test_tutorial_runs_as_a_script(name, tmp_path):
    _run(name, tmp_path / "figures")
    assert list((tmp_path / "figures").glob("*.png")), "the tutorial wrote no figure"
