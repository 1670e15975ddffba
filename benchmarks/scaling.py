"""Per-device cost of one optimizer step against the device count: compiled FLOPs per device,
collective bytes per device, and step time, for N simulated CPU devices.

The tree is a transformer's matrices: ``--layers`` layers × (q, k, v, o: d×d; up d×4d; down
4d×d), sharded ``P("fsdp", None)`` over a one-axis mesh of N devices. For each optimizer and
strategy (``MsignSharding(mesh, strategy)``) it compiles one ``update`` + ``apply_updates``
and records XLA's ``cost_analysis()`` FLOPs (per device: the partitioned program's), the
collective bytes a device receives (:func:`manifold_optax.sharding.collective_bytes`; the
ratio is to the bytes of all the matrices), the step time (median and quartiles), and the
relative difference from the same steps on one device.

Run: ``python benchmarks/scaling.py [--devices 1 2 4 8] [--width 256] [--json OUT]``. Each N
runs in its own process (the device count is fixed when JAX starts).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).parent
OPTIMIZERS = ("muon", "normuon", "sphere", "spectral_sphere", "stiefel", "oblique")
STRATEGIES = ("gather", "owner")


def shapes(width, layers):
    d = width
    per = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "up": (d, 4 * d), "down": (4 * d, d)}
    return {f"layer{i}": dict(per) for i in range(layers)}


def _child(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import manifold_optax as mo

    sys.path.insert(0, str(HERE))
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    tree = shapes(args.width, args.layers)
    rng = np.random.default_rng(0)
    base = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s) / math.sqrt(s[0]), jnp.float32),
        tree,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    grads = [
        jax.tree.map(
            lambda x, t=t: jnp.asarray(
                np.random.default_rng(10 + t).standard_normal(x.shape), jnp.float32
            ),
            base,
        )
        for t in range(3)
    ]
    manifolds = {
        "sphere": mo.Sphere(),
        "spectral_sphere": mo.SpectralSphere(),
        "stiefel": mo.Stiefel(),
        "oblique": mo.Oblique(),
    }

    def make(name, strategy):
        sh = None if strategy is None else mo.MsignSharding(mesh, strategy)
        if name == "muon":
            return mo.muon(0.02, sharding=sh), None
        if name == "normuon":
            return mo.normuon(0.02, sharding=sh), None
        m = manifolds[name]
        return mo.manifold_muon(0.05, m, sharding=sh), m

    rows = []
    p_sh = jax.tree.map(lambda _: NamedSharding(mesh, P("fsdp", None)), base)
    matrix_bytes = sum(x.size * 4 for x in jax.tree.leaves(base))
    for name in args.optimizers:
        for strategy in args.strategies:
            tx, m = make(name, strategy)
            params0 = base if m is None else mo.project_params(base, m)
            with jax.set_mesh(mesh):
                p = jax.device_put(params0, p_sh)
                state = jax.jit(tx.init)(p)

                def step(p, s, g):
                    u, s = tx.update(g, s, p)  # noqa: B023 (compiled at once)
                    return optax.apply_updates(p, u), s

                gs = [jax.device_put(g, p_sh) for g in grads]
                compiled = jax.jit(step).lower(p, state, gs[0]).compile()
                cost = compiled.cost_analysis()
                cost = cost[0] if isinstance(cost, list) else cost
                coll = mo.collective_bytes(compiled)
                for g in gs:
                    p, state = compiled(p, state, g)
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    out = compiled(p, state, gs[0])
                    jax.block_until_ready(out)
                    times.append(time.perf_counter() - t0)
            final = jax.tree.map(np.asarray, p)
            q = (
                statistics.quantiles(times, n=4, method="inclusive")
                if len(times) > 1
                else [times[0]] * 3
            )
            rows.append(
                {
                    "optimizer": name,
                    "strategy": strategy,
                    "devices": n,
                    "gflop_per_device": cost.get("flops", 0.0) / 1e9,
                    "collective_bytes": coll["total"],
                    "collective_ratio": coll["total"] / matrix_bytes,
                    "step_ms": {"median": 1e3 * q[1], "q1": 1e3 * q[0], "q3": 1e3 * q[2]},
                    "final": {k: v.tolist() for k, v in _digest(final).items()},
                }
            )
            print(
                f"{n} {name:16s} {strategy:6s} {rows[-1]['gflop_per_device']:.3f} GFLOP "
                f"coll {rows[-1]['collective_ratio']:.2f}× {1e3 * q[1]:.1f} ms",
                flush=True,
            )
    json.dump(rows, sys.stdout if args.out is None else open(args.out, "w"))


def _digest(tree):
    """A few numbers of each parameter (sums by row) that any two runs must reproduce."""
    import jax
    import numpy as np

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): np.asarray(v, np.float64).sum(axis=1) for k, v in flat}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    import tempfile

    rows = []
    for n in args.devices:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
        ).strip()
        env["JAX_PLATFORMS"] = "cpu"
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--out",
                f.name,
                "--width",
                str(args.width),
                "--layers",
                str(args.layers),
                "--reps",
                str(args.reps),
                "--optimizers",
                *args.optimizers,
                "--strategies",
                *args.strategies,
            ]
            subprocess.run(cmd, env=env, check=True)
            rows += json.load(open(f.name))
    one = {(r["optimizer"], r["strategy"]): r for r in rows if r["devices"] == 1}
    for r in rows:
        ref = one.get((r["optimizer"], r["strategy"]))
        if ref is not None:
            diffs = []
            for k, v in r["final"].items():
                a, b = _arr(v), _arr(ref["final"][k])
                diffs.append(float(abs(a - b).max() / max(abs(b).max(), 1e-30)))
            r["max_rel_diff_vs_1"] = max(diffs)
            r["flop_ratio_vs_ideal"] = r["gflop_per_device"] / (
                ref["gflop_per_device"] / r["devices"]
            )
    for r in rows:
        del r["final"]
    print(
        "| optimizer | strategy | N | GFLOP/device | ÷ ideal | collective / matrix bytes | "
        "step ms (median [q1, q3]) | rel. diff vs 1 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["step_ms"]
        print(
            f"| {r['optimizer']} | {r['strategy']} | {r['devices']} | "
            f"{r['gflop_per_device']:.3f} | {r.get('flop_ratio_vs_ideal', float('nan')):.2f} | "
            f"{r['collective_ratio']:.2f} | {t['median']:.1f} [{t['q1']:.1f}, {t['q3']:.1f}] | "
            f"{r.get('max_rel_diff_vs_1', float('nan')):.1e} |"
        )
    if args.json:
        from _machine import machine

        out = {
            "machine": machine(),
            "width": args.width,
            "layers": args.layers,
            "reps": args.reps,
            "rows": rows,
        }
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


def _arr(v):
    import numpy as np

    return np.asarray(v, np.float64)


if __name__ == "__main__":
    main()
