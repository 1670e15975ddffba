"""Where an optimizer step's time goes: the ops it executes per step, counted from a profile.

The step_bench tree and optimizers (``--only`` picks a subset by name), each jitted and taken
to steady state with 20 steps, then 10 steps under ``jax.profiler``. Per step it prints the
wall time (median of 5 unprofiled 10-step loops) and the ops executed: on a GPU the device's
kernels, on a CPU the thunks of the compiled program (events named after its HLO
instructions). Op counts do not move with the machine's load, unlike times, so they show a
change that removes ops without the rounds of an A/B timing; on a GPU, where a small step is
bound by kernel launches, the count is also what sets the time. Then the top groups of ops
by summed time, grouped by op kind and output shape (CPU) or kernel name (GPU). On a
2-core CPU the summed times are only indicative: the same products summed 80 ms in one
step's profile and 134 ms in another's whose wall times differed by 5%.

Run: ``python benchmarks/step_profile.py [--wide] [--only muon,stiefel] [--top 12]``; writes
``benchmarks/results/step_profile_<backend>.json``.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import statistics
import sys
import tempfile
import time

import jax
import optax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _machine import machine  # noqa: E402
from step_bench import optimizers, reference_tree, tx_manifold  # noqa: E402

import manifold_optax as mo  # noqa: E402

DEFAULT = (
    "muon (default)",
    "manifold_muon sphere",
    "manifold_muon spectral_sphere",
    "manifold_muon stiefel",
)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(")


def instruction_groups(hlo_text: str) -> dict[str, str]:
    """HLO instruction name → ``"<kind> <output shape>"`` (fusions by their fusion kind's
    name stem, e.g. ``multiply_add_fusion f32[256,256]``), for naming CPU thunks."""
    groups = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            name, shape, op = m.groups()
            stem = re.sub(r"\.\d+$", "", name) if op == "fusion" else op
            groups[name] = f"{stem} {shape.split('{')[0]}"
    return groups


def profile_ops(f, args, steps: int) -> tuple[dict, dict]:
    """Run ``f(*args)`` ``steps`` times under the profiler; per step, ``(count, µs)`` by
    group, and the totals."""
    groups = instruction_groups(f.lower(*args).compile().as_text())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            out = args
            for _ in range(steps):
                out = f(*out[:2], *args[2:])
            jax.block_until_ready(out)
        (trace,) = pathlib.Path(d).rglob("*.trace.json.gz")
        events = json.load(gzip.open(trace))["traceEvents"]
    process = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    device = {pid for pid, name in process.items() if "/device:" in name and "CPU" not in name}
    count, micros = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        if device:
            if e["pid"] not in device:
                continue
            key = e["name"][:70]
        else:
            key = groups.get(e["name"].split(" ")[0])
            if key is None:
                continue
        count[key] += 1
        micros[key] += e["dur"]
    per_step = {k: (count[k] / steps, micros[k] / steps) for k in count}
    totals = {
        "ops": sum(c for c, _ in per_step.values()),
        "op_ms": sum(t for _, t in per_step.values()) / 1e3,
    }
    return per_step, totals


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--wide", action="store_true")
    ap.add_argument(
        "--only",
        default=",".join(DEFAULT),
        help="comma-separated optimizer names (step_bench's), or parts of names",
    )
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    d = 512 if a.wide else 256
    tree = reference_tree(d)
    grads = jax.tree.map(lambda x: 0.01 * jax.random.normal(jax.random.PRNGKey(1), x.shape), tree)
    keep = a.only.split(",")
    every = optimizers()
    txs = {k: v for k, v in every.items() if k in keep}
    txs = txs or {k: v for k, v in every.items() if any(s in k for s in keep)}
    results = {}
    for name, tx in txs.items():
        params = mo.project_params(tree, tx_manifold(name))
        state = tx.init(params)

        def step(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        f = jax.jit(step)
        for _ in range(20):
            params, state = f(params, state, grads)
        jax.block_until_ready(params)
        walls = []
        for _ in range(5):
            t0 = time.perf_counter()
            p, s = params, state
            for _ in range(10):
                p, s = f(p, s, grads)
            jax.block_until_ready(p)
            walls.append((time.perf_counter() - t0) / 10)
        per_step, totals = profile_ops(f, (params, state, grads), 10)
        wall = statistics.median(walls) * 1e3
        results[name] = {"wall_ms": wall, **totals, "top": {}}
        print(f"\n## {name}: {wall:.2f} ms/step wall, {totals['ops']:.0f} ops/step", end="")
        print(f" ({totals['op_ms']:.2f} ms/step summed over threads/streams)")
        for key, (c, us) in sorted(per_step.items(), key=lambda kv: -kv[1][1])[: a.top]:
            print(f"  {key:62s} {us / 1e3:8.3f} ms  n = {c:g}")
            results[name]["top"][key] = {"ms": us / 1e3, "n": c}
    out = pathlib.Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    path = out / f"step_profile_{jax.default_backend()}{'_wide' if a.wide else ''}.json"
    meta = {"d": d, "optax": optax.__version__}
    path.write_text(json.dumps({"machine": machine(), "meta": meta, "results": results}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
