"""The promised public API exists, every public name is documented and listed in docs/api.md."""

import inspect
import pathlib

import manifold_optax as mo

PROMISED = [
    "msign",
    "Sphere",
    "SpectralSphere",
    "Stiefel",
    "orthogonalize",
    "dualize",
    "dual_ascent",
    "retract",
    "muon",
    "manifold_muon",
]


def test_promised_names_and_docstrings():
    for name in PROMISED:
        assert hasattr(mo, name), name
    for name in mo.__all__:
        obj = getattr(mo, name)
        if name == "__version__" or isinstance(obj, tuple):
            continue
        assert inspect.getdoc(obj), f"{name} has no docstring"
    for m in (mo.Sphere(), mo.SpectralSphere(), mo.Stiefel()):
        assert callable(m.retract) and callable(m.steepest_direction)


def test_api_doc_lists_every_public_name():
    text = (pathlib.Path(__file__).parents[1] / "docs" / "api.md").read_text()
    for name in mo.__all__:
        if name != "__version__":
            assert f"`{name}" in text, name
