"""Regenerate docs/api.md from the public API's signatures and docstrings."""

import inspect
import pathlib

import manifold_optax as mo

GROUPS = {
    "Matrix functions (`linalg/`, `schedules.py`)": [
        "msign",
        "msign_svd",
        "nuclear_norm",
        "spectral_norm",
        "top_singular_pair",
        "newton_schulz_flops",
        "polar_express_coefficients",
        "get_schedule",
    ],
    "Norms (`norms.py`)": ["NORMS", "dualize_array", "dual_norm", "primal_norm"],
    "Transformations (`transforms/`)": [
        "momentum",
        "MomentumState",
        "orthogonalize",
        "dualize",
        "scale_by_shape",
        "scale_by_modular_norm",
        "dual_ascent",
        "DualAscentState",
        "retract",
        "RetractState",
        "manifold_step",
        "ManifoldStepState",
    ],
    "Optimizers (`alias.py`)": ["muon", "manifold_muon", "trust_region"],
    "Manifolds (`manifolds/`, `transforms/`)": [
        *mo.manifolds.__all__,
        "by_shape",
        "project_params",
        "resolve_manifolds",
        "diagnostics",
    ],
    "Labels (`labels.py`)": ["MuonDimensionNumbers", "label_params", "path_to_str"],
    "Sharding (`sharding.py`)": ["MsignSharding", "state_shardings", "collective_bytes"],
}


def main():
    lines = [
        "# manifold_optax public API",
        "",
        "Everything below is importable as `import manifold_optax as mo; mo.<name>`. Each entry",
        "gives the signature and the first paragraph of its docstring (see the docstring for the",
        "math, arguments and references). Regenerate with `python tools/make_api_doc.py`.",
        "",
    ]
    covered = set()
    for title, names in GROUPS.items():
        lines += [f"## {title}", ""]
        for n in names:
            covered.add(n)
            obj = getattr(mo, n)
            try:
                sig = str(inspect.signature(obj)) if callable(obj) else ""
            except (TypeError, ValueError):
                sig = ""
            doc = inspect.getdoc(obj) or ""
            first = repr(obj) if isinstance(obj, tuple) else doc.split("\n\n")[0].replace("\n", " ")
            lines += [f"### `{n}{sig}`", "", first, ""]
    missing = [n for n in mo.__all__ if n not in covered and n != "__version__"]
    if missing:
        raise SystemExit(f"public names missing from docs/api.md groups: {missing}")
    out = pathlib.Path(__file__).resolve().parents[1] / "docs" / "api.md"
    out.write_text("\n".join(lines))
    print("wrote", out)


if __name__ == "__main__":
    main()
