"""Every research notebook runs top to bottom and its asserted claims hold. The suite runs each
at small sizes: a cell with :data:`SMALL` is inserted after the notebook's ``parameters`` cell
(papermill's convention), so the sizes a reader sees stay the notebook's own."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))

#: Per notebook, the sizes the suite runs it at (each claim must hold at these sizes too).
SMALL = {
    "01_msign.ipynb": "n = 96",
    "02_manifolds.ipynb": "n, m = 48, 24\nonline_steps = 120",
    "03_training.ipynb": "steps = 60",
}


def test_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} == set(SMALL)


def _with_small_sizes(nb, source):
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    nb.cells.insert(tagged[0] + 1, new_code_cell(source))
    return nb


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_its_claims_hold(path):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "strip outputs"
    assert any("assert " in c.source for c in nb.cells if c.cell_type == "code"), "no claim"
    nb = _with_small_sizes(nb, SMALL[path.name])
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
