"""Sphinx configuration for nde's documentation.

Tutorials live in ``tutorials/`` as jupytext percent-format ``.py`` notebooks; they are copied into
``docs/tutorials/`` at build time and executed by myst-nb. Set ``NDE_DOCS_EXECUTE=off`` to build
without executing them (the test suite does this to check the markup and the API reference).
"""

import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

# ---- tutorials: copy the jupytext sources next to the docs -------------------------------------
_tut_src, _tut_dst = ROOT / "tutorials", HERE / "tutorials"
_tut_dst.mkdir(exist_ok=True)
for old in _tut_dst.glob("*.py"):
    if not (_tut_src / old.name).exists():
        old.unlink()
for src in sorted(_tut_src.glob("*.py")):
    dst = _tut_dst / src.name
    if not dst.exists() or dst.read_bytes() != src.read_bytes():
        shutil.copyfile(src, dst)
os.environ.setdefault("NDE_FIGURES", str(HERE / "_build" / "figures"))

project = "nde"
author = "nde developers"
copyright = "2026, nde developers"
try:
    import nde

    release = nde.__version__
except Exception:  # the API pages will report the import failure
    release = "0.1.0"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb", ".py": "myst-nb"}
nb_custom_formats = {".py": ["jupytext.reads", {"fmt": "py:percent"}]}
nb_execution_mode = os.environ.get("NDE_DOCS_EXECUTE", "force")
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
exclude_patterns = ["conf.py", "_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "jupyter_execute"]

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_typehints = "none"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = "nde"
suppress_warnings = ["mystnb.unknown_mime_type"]
if nb_execution_mode == "off":
    # unexecuted notebooks carry no language_info, so their cells have no lexer
    suppress_warnings.append("myst-nb.lexer")
