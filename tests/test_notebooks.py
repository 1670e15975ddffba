"""Every research notebook runs top to bottom and its asserted claims hold. The suite runs each
at small sizes: a cell with :data:`SMALL` is inserted after the notebook's ``parameters`` cell
(papermill's convention), so the sizes a reader sees stay the notebook's own."""

import ast
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))

#: Per notebook, the sizes the suite runs it at (each claim must hold at these sizes too).
SMALL = {
    "01_msign.ipynb": "n = 96\nreps = 2",
    "02_manifolds.ipynb": "n, m = 48, 24\nonline_steps = 120",
    "03_training.ipynb": "steps = 60",
    "04_width_transfer.ipynb": "widths = [32, 128]\nsteps = 150",
    "05_how_far_is_online.ipynb": "steps, every, d = 40, 20, 16",
}


def test_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} == set(SMALL)


def _public_api_uses(source):
    """(name, how) for every use of manifold_optax in ``source`` that is not a public name:
    ``mo.X`` with X outside ``__all__``, imports of its submodules or of private names."""
    import manifold_optax

    public = set(manifold_optax.__all__)
    bad = []
    aliases = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("manifold_optax"):
                    if a.name != "manifold_optax":
                        bad.append((a.name, "imports a submodule"))
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("manifold_optax"):
            for a in node.names:
                if node.module != "manifold_optax" or a.name not in public:
                    bad.append((f"{node.module}.{a.name}", "imports a non-public name"))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr not in public
        ):
            bad.append((f"{node.value.id}.{node.attr}", "not in manifold_optax.__all__"))
    return bad


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_use_only_the_public_api(path):
    nb = nbformat.read(path, as_version=4)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert _public_api_uses(source) == []


def test_the_public_api_check_catches_private_names():
    src = (
        "import manifold_optax as mo\nfrom manifold_optax import schedules as S\nmo._ops\nmo.msign"
    )
    assert _public_api_uses(src) == [
        ("manifold_optax.schedules", "imports a non-public name"),
        ("mo._ops", "not in manifold_optax.__all__"),
    ]


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
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
