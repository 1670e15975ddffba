"""Sphinx configuration: the API reference from the docstrings (autodoc, autosummary,
napoleon), Markdown pages and notebooks through myst-nb, the book theme. No network access at
build time (no intersphinx).

The notebooks are stored without outputs in ``notebooks/`` and copied into ``docs/notebooks``
at build time; a docs build executes them (``nb_execution_mode = "force"``), the test suite
builds with ``-D nb_execution_mode=off``.
"""

import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import manifold_optax  # noqa: E402

project = "manifold_optax"
author = "manifold_optax developers"
copyright = "2026, manifold_optax developers"
release = manifold_optax.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True

html_theme = "sphinx_book_theme"
html_title = "manifold_optax"
html_theme_options = {"show_toc_level": 2}
html_static_path = []


def _copy_notebooks(app):
    src, dst = ROOT / "notebooks", pathlib.Path(app.srcdir) / "notebooks"
    dst.mkdir(exist_ok=True)
    for nb in sorted(src.glob("*.ipynb")):
        shutil.copyfile(nb, dst / nb.name)


def setup(app):
    app.connect("builder-inited", _copy_notebooks)
