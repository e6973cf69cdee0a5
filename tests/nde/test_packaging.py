"""The distribution installs exactly one top-level import name, ``nde``."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_has_one_top_level_package(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is needed to build the wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("nde-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"nde"}, tops
    for sub in ("nde/solvers/__init__.py", "nde/models/__init__.py", "nde/solvers/rk.py", "nde/models/neural_ode.py"):
        assert sub in names
    assert not any(n.startswith(("solvers/", "models/", "tests/")) for n in names)


def test_installed_environment_has_no_top_level_solvers_or_models(tmp_path):
    # run outside the repository so that its folders are not on sys.path
    code = ("import importlib.util, nde.solvers, nde.models; "
            "print(importlib.util.find_spec('solvers') is None, importlib.util.find_spec('models') is None, "
            "nde.solvers.__name__, nde.models.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "nde.solvers", "nde.models"], out.stdout + out.stderr
