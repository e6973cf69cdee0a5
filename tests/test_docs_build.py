"""The docs build with warnings as errors (tutorials not executed here) and the README's commands are sound."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sphinx_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    pytest.importorskip("jupytext")
    env = dict(os.environ, NDE_DOCS_EXECUTE="off")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"),
           str(tmp_path / "html"), "-d", str(tmp_path / "doctrees")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    html = (tmp_path / "html" / "api" / "core.html").read_text()
    assert "nde.solve" in html and "PIDController" in html
    for tut in (ROOT / "tutorials").glob("*.py"):
        assert (tmp_path / "html" / "tutorials" / (tut.stem + ".html")).exists(), tut.name


def _block(marker):
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)\n```\s*<!-- /{marker} -->", text, re.S)
    assert m, f"README.md lacks the {marker} block"
    return m.group(1).strip()


def test_readme_quick_start_commands():
    main, tests = _block("main-command"), _block("test-command")
    for cmd in (main, tests):
        assert "pip install -q torch==2.13.0" in cmd and cmd.index("torch==2.13.0") < cmd.index("-e \".[")
        assert "\n" not in cmd
    tutorial = re.search(r"python (tutorials/\S+\.py)", main).group(1)
    assert (ROOT / tutorial).exists()
    assert "pytest" in tests and '-m "not slow"' in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci and os.access(ROOT / ".ci" / "run", os.X_OK)
    if shutil.which("bash"):
        extracted = subprocess.run(
            ["bash", "-c", "sed -n '/<!-- test-command -->/,/<!-- \\/test-command -->/p' README.md "
             "| grep -v -e '^<!--' -e '^```'"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert extracted == tests
