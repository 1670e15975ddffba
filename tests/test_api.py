"""The promised public API exists, every public name is documented and in the API reference."""

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


def test_api_reference_lists_every_public_name():
    text = (pathlib.Path(__file__).parents[1] / "docs" / "api_reference.rst").read_text()
    for name in mo.__all__:
        if name != "__version__":
            assert f":: manifold_optax.{name}\n" in text, name
