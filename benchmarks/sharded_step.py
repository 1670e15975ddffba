"""Sharded optimizer steps on simulated CPU devices: parity with one device, output and state
shardings, collective bytes per step (from the compiled HLO) and step time.

Run: ``python benchmarks/sharded_step.py [--json OUT]``. It sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` itself, so run it in its own process
(the test suite does, in a subprocess).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _machine import machine  # noqa: E402

import manifold_optax as mo  # noqa: E402
from manifold_optax import sharding as S  # noqa: E402

SHAPES = {
    "a": (64, 128),
    "b": (128, 64),
    "c": (64, 64),
    "d": (64, 64),
    "e": (128, 128),
    "bias": (64,),
}
#: ``--quick`` (the test suite's run): the same kinds of leaf — wide, tall, two same-shape
#: squares, a vector — without the largest matrix, so that compiling the 8-device programs
#: takes less time (the power block of a matrix much smaller would dominate its bytes).
QUICK_SHAPES = {"a": (64, 128), "b": (128, 64), "c": (64, 64), "d": (64, 64), "bias": (64,)}


def make_params(manifold):
    rng = np.random.default_rng(0)
    p = {
        k: jnp.asarray(rng.standard_normal(s) / math.sqrt(s[0]), jnp.float32)
        for k, s in SHAPES.items()
    }
    return mo.project_params(p, manifold) if manifold is not None else p


def param_specs(mesh_kind):
    if mesh_kind == "fsdp":
        return {k: P("fsdp", None) if len(s) == 2 else P("fsdp") for k, s in SHAPES.items()}
    return {k: P("data", "model") if len(s) == 2 else P("model") for k, s in SHAPES.items()}


def optimizer(name, sharding):
    if name == "muon":
        return mo.muon(0.02, sharding=sharding), None
    m = {
        "sphere": mo.Sphere(2.0),
        "spectral_sphere": mo.SpectralSphere(1.5),
        "stiefel": mo.Stiefel(),
    }[name]
    return mo.manifold_muon(0.05, m, sharding=sharding), m


def grads_for(params, t):
    return jax.tree.map(
        lambda x: jnp.asarray(np.random.default_rng(100 + t).standard_normal(x.shape), jnp.float32),
        params,
    )


@functools.cache
def single_device_reference(name, steps):
    """``(params, params after steps)`` on one device: what every mesh must reproduce."""
    tx_ref, manifold = optimizer(name, None)
    params = make_params(manifold)
    ref_p, ref_s = params, tx_ref.init(params)
    step_ref = jax.jit(
        lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx_ref.update(g, s, p))
    )
    for t in range(steps):
        ref_p, ref_s = step_ref(ref_p, ref_s, grads_for(params, t))
    return params, ref_p


def state_bytes_per_device(state):
    """Bytes of optimizer state held by one device (device 0's shards)."""
    dev = jax.devices()[0]
    total = 0
    for x in jax.tree.leaves(state):
        total += sum(s.data.nbytes for s in x.addressable_shards if s.device == dev)
    return total


def run(name, mesh_kind, strategy, axis_types="auto", placement="given", steps=2, time_reps=5):
    """One row. ``axis_types``: the mesh's ("auto" or "explicit"). ``placement``: "given"
    (``jit`` with ``in_shardings``/``out_shardings`` from ``state_shardings``) or "inferred"
    (``jit(tx.init)`` and the step under ``jax.set_mesh`` with no shardings given)."""
    kind = AxisType.Explicit if axis_types == "explicit" else AxisType.Auto
    mesh = (
        jax.make_mesh((8,), ("fsdp",), axis_types=(kind,))
        if mesh_kind == "fsdp"
        else jax.make_mesh((2, 4), ("data", "model"), axis_types=(kind, kind))
    )
    params, ref_p = single_device_reference(name, steps)
    try:
        with jax.set_mesh(mesh):
            return _run(
                name,
                mesh,
                mesh_kind,
                strategy,
                axis_types,
                placement,
                params,
                ref_p,
                steps,
                time_reps,
            )
    except Exception as e:  # noqa: BLE001 (a row that records what failed)
        return {
            "optimizer": name,
            "mesh": mesh_kind,
            "axis_types": axis_types,
            "placement": placement,
            "strategy": strategy,
            "error": f"{type(e).__name__}: {str(e)[:200]}",
        }


def _run(name, mesh, mesh_kind, strategy, axis_types, placement, params, ref_p, steps, time_reps):
    # Sharded.
    strat = S.MsignSharding(mesh, strategy)
    tx, _ = optimizer(name, strat)
    specs = param_specs(mesh_kind)
    p_sh = {k: NamedSharding(mesh, specs[k]) for k in SHAPES}
    s_sh = S.state_shardings(tx, params, p_sh)
    p = jax.device_put(params, p_sh)
    if placement == "given":
        state = jax.jit(tx.init, out_shardings=s_sh)(p)
    else:
        state = jax.jit(tx.init)(p)
    init_state_bytes = state_bytes_per_device(state)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    # One compiled program, donating as the examples do: its HLO gives the collective bytes,
    # and it takes the steps (compiling the 8-device step is most of this script's time).
    shardings = (
        dict(in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh))
        if placement == "given"
        else {}
    )
    jstep = (
        jax.jit(step, donate_argnums=(0, 1), **shardings)
        .lower(p, state, jax.device_put(grads_for(params, 0), p_sh))
        .compile()
    )
    coll = S.collective_bytes(jstep)
    for t in range(steps):
        p, state = jstep(p, state, jax.device_put(grads_for(params, t), p_sh))
    rel = {
        k: float(
            jnp.linalg.norm(np.asarray(p[k]) - np.asarray(ref_p[k]))
            / jnp.linalg.norm(np.asarray(ref_p[k]))
        )
        for k in SHAPES
    }
    shard_ok = all(p[k].sharding.is_equivalent_to(p_sh[k], p[k].ndim) for k in SHAPES)
    replicated_big = [
        str(path)
        for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
        if x.size >= 4096 and x.sharding.is_fully_replicated
    ]
    g = jax.device_put(grads_for(params, 0), p_sh)
    times = []
    for _ in range(time_reps):
        t0 = time.perf_counter()
        p, state = jstep(p, state, g)
        jax.block_until_ready(p)
        times.append(time.perf_counter() - t0)
    matrix_bytes = sum(math.prod(s) * 4 for s in SHAPES.values() if len(s) == 2)
    return {
        "optimizer": name,
        "mesh": mesh_kind,
        "axis_types": axis_types,
        "placement": placement,
        "strategy": strategy,
        "state_bytes_per_device": {
            "init": init_state_bytes,
            "after_steps": state_bytes_per_device(state),
        },
        "max_rel_diff": max(rel.values()),
        "output_shardings_match": shard_ok,
        "replicated_big_state": replicated_big,
        "collective_bytes": coll,
        "collective_ratio": coll["total"] / matrix_bytes,
        "result_ratio": coll["result_bytes"] / matrix_bytes,
        "step_ms": 1e3 * statistics.median(times),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="gather strategy only, small matrices")
    ap.add_argument(
        "--placement",
        action="store_true",
        help="rows for every axis type (auto, explicit) and placement (given, inferred), "
        "gather strategy",
    )
    a = ap.parse_args()
    assert len(jax.devices()) == 8, jax.devices()
    global SHAPES
    if a.quick:
        SHAPES = QUICK_SHAPES
    rows = []
    strategies = ("gather",) if a.quick or a.placement else ("gather", "owner", "none")
    kinds = (
        [(t, pl) for t in ("auto", "explicit") for pl in ("given", "inferred")]
        if a.placement
        else [("auto", "given")]
    )
    for name in ("muon", "sphere", "spectral_sphere", "stiefel"):
        for mesh_kind in ("fsdp", "2d"):
            for strategy in strategies:
                if strategy != "gather" and mesh_kind == "2d":
                    continue
                for types, placement in kinds:
                    rows.append(
                        run(
                            name,
                            mesh_kind,
                            strategy,
                            types,
                            placement,
                            time_reps=1 if a.quick or a.placement else 5,
                        )
                    )
    if a.placement:
        print(
            "| optimizer | mesh | axis types | shardings | state bytes / device | "
            "collective bytes / step | max rel diff | outputs placed |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            head = f"| {r['optimizer']} | {r['mesh']} | {r['axis_types']} | {r['placement']} |"
            if "error" in r:
                print(head + f" {r['error'][:60]} | | | |")
                continue
            print(
                head + f" {r['state_bytes_per_device']['after_steps']} | "
                f"{r['collective_bytes']['total']:.0f} | {r['max_rel_diff']:.1e} | "
                f"{r['output_shardings_match'] and not r['replicated_big_state']} |"
            )
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"machine": machine(), "rows": rows}, f, indent=1)
        return
    print(
        "| optimizer | mesh | strategy | max rel diff | shardings ok | bytes moved / matrix bytes |"
        " collective results / matrix bytes | step ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['optimizer']} | {r['mesh']} | {r['strategy']} | {r['max_rel_diff']:.1e} | "
            f"{r['output_shardings_match'] and not r['replicated_big_state']} | "
            f"{r['collective_ratio']:.2f} | {r['result_ratio']:.2f} | {r['step_ms']:.1f} |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
