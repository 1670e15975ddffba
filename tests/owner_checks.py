"""The owner strategy on 8 simulated CPU devices: per-device FLOPs, collective bytes and
parity with one device, for every optimizer.

Run by ``tests/test_sharding.py`` in a subprocess (the device count is fixed when jax starts):
``python tests/owner_checks.py OUT.json [OPTIMIZER ...]``. The tree is a transformer's
matrices, 8 layers × (attention d×d; up d×4d; down 4d×d) sharded ``P("fsdp", None)``, plus
three ``d×2d``
matrices (a group that does not divide the devices: padded). Each row records, for one
optimizer with ``MsignSharding(mesh, "owner")``: the compiled step's FLOPs per device
(``cost_analysis``), the same step's FLOPs unsharded on one device (compiled in this
process), the collective bytes a device receives over the matrices' bytes, and the largest
relative difference from the unsharded run after two steps.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import manifold_optax as mo  # noqa: E402

D = 32
LAYER = {"attn": (D, D), "up": (D, 4 * D), "down": (4 * D, D)}
SHAPES = {f"layer{i}": dict(LAYER) for i in range(8)}
SHAPES["extra"] = {f"x{i}": (D, 2 * D) for i in range(3)}
MANIFOLDS = {
    "sphere": mo.Sphere(),
    "spectral_sphere": mo.SpectralSphere(),
    "stiefel": mo.Stiefel(),
    "oblique": mo.Oblique(),
}


def optimizer(name, sharding):
    if name == "muon":
        return mo.muon(0.02, sharding=sharding), None
    if name == "normuon":
        return mo.normuon(0.02, sharding=sharding), None
    m = MANIFOLDS[name]
    return mo.manifold_muon(0.05, m, sharding=sharding), m


def is_shape(x):
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def main():
    out = sys.argv[1]
    names = sys.argv[2:] or ["muon", "normuon", *MANIFOLDS]
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    base = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s) / math.sqrt(s[0]), jnp.float32),
        SHAPES,
        is_leaf=is_shape,
    )
    grads = [
        jax.tree.map(
            lambda x, t=t: jnp.asarray(
                np.random.default_rng(10 + t).standard_normal(x.shape), jnp.float32
            ),
            base,
        )
        for t in range(2)
    ]
    p_sh = jax.tree.map(lambda _: NamedSharding(mesh, P("fsdp", None)), base)
    matrix_bytes = sum(x.size * 4 for x in jax.tree.leaves(base))
    rows = []
    for name in names:
        res = {}
        for placed in (False, True):
            tx, m = optimizer(name, mo.MsignSharding(mesh, "owner") if placed else None)
            params = base if m is None else mo.project_params(base, m)

            def step(p, s, g, tx=tx):
                u, s = tx.update(g, s, p)
                return optax.apply_updates(p, u), s

            if placed:
                with jax.set_mesh(mesh):
                    p = jax.device_put(params, p_sh)
                    state = jax.jit(tx.init)(p)
                    gs = [jax.device_put(g, p_sh) for g in grads]
                    compiled = jax.jit(step).lower(p, state, gs[0]).compile()
                    for g in gs:
                        p, state = compiled(p, state, g)
            else:
                p, state, gs = params, tx.init(params), grads
                compiled = jax.jit(step).lower(p, state, gs[0]).compile()
                for g in gs:
                    p, state = compiled(p, state, g)
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            res[placed] = {
                "flops": float(cost["flops"]),
                "bytes": mo.collective_bytes(compiled)["total"] if placed else 0.0,
                "params": jax.tree.map(np.asarray, p),
                "state_specs": [
                    str(x.sharding.spec) if placed else "" for x in jax.tree.leaves(state)
                ],
            }
        diffs = jax.tree.leaves(
            jax.tree.map(
                lambda a, b: float(np.abs(a - b).max() / np.abs(b).max()),
                res[True]["params"],
                res[False]["params"],
            )
        )
        rows.append(
            {
                "optimizer": name,
                "flops_per_device": res[True]["flops"],
                "flops_one_device": res[False]["flops"],
                "collective_ratio": res[True]["bytes"] / matrix_bytes,
                "max_rel_diff": max(diffs),
            }
        )
        print(rows[-1], flush=True)
    pathlib.Path(out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
