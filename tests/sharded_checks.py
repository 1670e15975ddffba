"""Sharded optimizer steps on 8 simulated CPU devices, checked against one device.

Run by ``tests/test_sharding.py`` in a subprocess (the device count is fixed when jax starts):
``python tests/sharded_checks.py CASES OUT.json`` with ``CASES`` = ``fast`` or ``full``.
Each row records, for one optimizer on one kind of mesh with or without a strategy: the
largest relative difference from one device after two steps, whether the updated parameters
kept their shardings (no ``out_shardings``), whether every state leaf has the same sharding
after ``init``, ``jit(init)``, ``update`` and ``jit(update)``, and the state leaves of 4096
or more elements left fully replicated.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import contextlib  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import manifold_optax as mo  # noqa: E402

ROOT = pathlib.Path(__file__).parents[1]
SHAPES = {"a": (128, 64), "b": (64, 64), "c": (64, 64), "bias": (64,)}
MANIFOLDS = {
    "sphere": mo.Sphere(2.0),
    "spectral_sphere": mo.SpectralSphere(1.5),
    "stiefel": mo.Stiefel(),
    "oblique": mo.Oblique(),
}
SOLVERS = ("online", "dual_ascent", "exact", "fixed_point")
MESH_KINDS = ("explicit", "explicit+set_mesh", "auto")


def make_optimizer(name, solver, strategy):
    if name == "muon":
        return mo.muon(0.02, sharding=strategy), None
    if name == "chain":  # the building blocks, each placed on its own
        m = mo.Stiefel()
        tx = optax.chain(
            mo.momentum(0.95),
            mo.dual_ascent(m, solver, sharding=strategy),
            optax.scale_by_learning_rate(0.05),
            mo.retract(m, sharding=strategy),
        )
        return tx, m
    m = MANIFOLDS[name]
    kw = {"inner_steps": 3} if solver == "dual_ascent" else {}
    return mo.manifold_muon(0.05, m, solver=solver, sharding=strategy, **kw), m


def make_params(manifold):
    rng = np.random.default_rng(0)
    p = {
        k: jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), jnp.float32)
        for k, s in SHAPES.items()
    }
    return mo.project_params(p, manifold) if manifold is not None else p


def grads(t):
    rng = np.random.default_rng(100 + t)
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}


def mesh_for(kind, two_d):
    types = AxisType.Auto if kind == "auto" else AxisType.Explicit
    if two_d:
        return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(types, types))
    return jax.make_mesh((8,), ("fsdp",), axis_types=(types,))


def spec_of(x):
    """The sharding of a concrete array, normalized (trailing ``None`` dropped)."""
    sh = x.sharding
    if not isinstance(sh, NamedSharding):
        return "single" if len(sh.device_set) == 1 else repr(sh)
    return str(P(*_strip(tuple(sh.spec))))


def _strip(spec):
    spec = list(spec)
    while spec and spec[-1] is None:
        spec.pop()
    return spec


def step_fn(tx):
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return step


def reference(name, solver, steps=2):
    tx, m = make_optimizer(name, solver, None)
    p = make_params(m)
    s = tx.init(p)
    step = jax.jit(step_fn(tx))
    for t in range(steps):
        p, s = step(p, s, grads(t))
    return p


def run_case(name, solver, kind, strategy_name, two_d=False, eager=True, steps=2):
    mesh = mesh_for(kind, two_d)
    strategy = None if strategy_name == "none" else mo.MsignSharding(mesh, strategy_name)
    tx, m = make_optimizer(name, solver, strategy)
    ax = "fsdp"
    specs = {k: P(ax, None) if len(s) == 2 else P() for k, s in SHAPES.items()}
    if two_d:
        specs = {k: P("fsdp", "data") if len(s) == 2 else P() for k, s in SHAPES.items()}
    p_sh = {k: NamedSharding(mesh, specs[k]) for k in SHAPES}
    # Auto meshes without a strategy: the current mesh names the mesh for the large state.
    use_mesh = kind == "explicit+set_mesh" or (kind == "auto" and strategy is None)
    ctx = jax.set_mesh(mesh) if use_mesh else contextlib.nullcontext()
    with ctx:
        p = jax.device_put(make_params(m), p_sh)
        g = jax.device_put(grads(0), p_sh)
        state_types = {}
        state_types["init"] = [spec_of(x) for x in jax.tree.leaves(tx.init(p))]
        if kind == "explicit":
            # JAX compiles a jit whose outputs use no input on one device, so under Explicit
            # axes it asks for a current mesh (``jax.set_mesh``); optax's own inits alike.
            s = jax.jit(tx.init, keep_unused=True)(p)
        else:
            s = jax.jit(tx.init)(p)
        state_types["jit(init)"] = [spec_of(x) for x in jax.tree.leaves(s)]
        if eager:  # op by op on 8 devices: slow for the iterative steps
            u, s_eager = tx.update(g, s, p)
            state_types["update"] = [spec_of(x) for x in jax.tree.leaves(s_eager)]
        u, s_jit = jax.jit(tx.update)(g, s, p)
        update_keep = all(spec_of(u[k]) == spec_of(p[k]) for k in SHAPES)
        state_types["jit(update)"] = [spec_of(x) for x in jax.tree.leaves(s_jit)]
        step = jax.jit(step_fn(tx))
        for t in range(steps):
            p, s = step(p, s, jax.device_put(grads(t), p_sh))
    ref = reference(name, solver, steps)
    rel = max(
        float(np.linalg.norm(np.asarray(p[k]) - np.asarray(ref[k])) / np.linalg.norm(ref[k]))
        for k in SHAPES
    )
    first = state_types["init"]
    return {
        "optimizer": name,
        "solver": solver,
        "mesh": kind + (" 2d" if two_d else ""),
        "strategy": strategy_name,
        "max_rel_diff": rel,
        "params_keep_shardings": all(
            spec_of(p[k]) == str(P(*_strip(tuple(specs[k])))) for k in SHAPES
        ),
        "updates_keep_shardings": update_keep,
        "state_types_stable": all(v == first for v in state_types.values()),
        "state_types": state_types,
        "replicated_big_state": [
            jax.tree_util.keystr(path)
            for path, x in jax.tree_util.tree_flatten_with_path(s)[0]
            if x.size >= 4096 and x.sharding.is_fully_replicated
        ],
    }


def readme_example():
    """The README's "Many devices" code block, executed as written."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Many devices") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    return {"readme": "ran", "names": sorted(k for k in scope if not k.startswith("__"))}


def guide_nnx_example():
    """The sharding guide's NNX example: a model sharded over data × fsdp, trained under
    ``nnx.jit``, against the same model on one device."""
    sys.path.insert(0, str(ROOT / "docs" / "examples"))
    from flax import nnx  # noqa: PLC0415
    from sharded_nnx import train  # noqa: PLC0415

    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    model, optimizer = train(mesh)
    one = jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1])
    single, _ = train(one)
    a = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    b = nnx.to_pure_dict(nnx.state(single, nnx.Param))
    rel = max(
        float(np.linalg.norm(np.asarray(x) - np.asarray(y)) / np.linalg.norm(np.asarray(y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    state = nnx.state(optimizer, nnx.OptState)
    return {
        "nnx": "ran",
        "max_rel_diff": rel,
        "param_specs": {
            jax.tree_util.keystr(k): spec_of(x)
            for k, x in jax.tree_util.tree_flatten_with_path(a)[0]
        },
        "state_specs": {
            jax.tree_util.keystr(k): spec_of(x)
            for k, x in jax.tree_util.tree_flatten_with_path(state)[0]
        },
        "replicated_big_state": [
            jax.tree_util.keystr(k)
            for k, x in jax.tree_util.tree_flatten_with_path(state)[0]
            if x.size >= 4096 and x.sharding.is_fully_replicated
        ],
    }


def cases(which):
    fast = [
        ("muon", None, "explicit", "none", False, True),
        ("stiefel", "online", "explicit+set_mesh", "gather", False, False),
        ("sphere", "online", "auto", "gather", False, True),
        ("chain", "online", "explicit", "none", False, False),
    ]
    if which == "fast":
        return fast
    out = []
    for name in ("muon", *MANIFOLDS):
        for kind in MESH_KINDS:
            for strat in ("none", "gather"):
                # The eager update (op by op) once per manifold: slow for the iterative steps.
                eager = name in ("muon", "sphere") or (kind, strat) == ("explicit", "gather")
                out.append((name, None if name == "muon" else "online", kind, strat, False, eager))
    for name in MANIFOLDS:
        for solver in SOLVERS[1:]:
            if name == "oblique" and solver == "fixed_point":
                continue  # the oblique manifold has no fixed-point solver
            out.append((name, solver, "explicit", "gather", False, False))
            out.append((name, solver, "auto", "none", False, False))
    for kind in MESH_KINDS:
        out.append(("chain", "online", kind, "gather", False, kind == "explicit"))
    out += [
        ("spectral_sphere", "online", "explicit", "owner", False, False),
        ("stiefel", "online", "auto", "owner", True, False),
        ("stiefel", "online", "explicit+set_mesh", "gather", True, False),
    ]
    return out


def main():
    which, out = sys.argv[1], sys.argv[2]
    assert len(jax.devices()) == 8, jax.devices()
    rows = []
    for c in cases(which):
        t0 = time.perf_counter()
        rows.append(run_case(*c))
        rows[-1]["seconds"] = time.perf_counter() - t0
    extra = [readme_example(), guide_nnx_example()]
    pathlib.Path(out).write_text(json.dumps({"rows": rows, "examples": extra}, indent=1))


if __name__ == "__main__":
    main()
