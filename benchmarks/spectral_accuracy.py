"""How exactly the spectral sphere's retraction keeps ``‖W‖₂ = r``, against what it costs.

The retraction rescales ``V = W − ηΦ`` by ``r/σ̂`` where ``σ̂`` is the Ritz value of a block
warm-started from the previous step and refined by a degree-``power_iters`` Chebyshev filter
(``manifold_muon(..., power_iters=k)``; ``linalg.top_singular_subspace``). ``σ̂`` is a lower
bound, so after the step ``‖W‖₂ = r·σ₁/σ̂ ≥ r``, and the constraint violation
``|‖W‖₂ − r|/r`` is the estimate's relative error.

For each filter (Chebyshev of each degree in ``--degrees``; ``--power`` adds plain power
steps of the given counts, for comparison) it

- trains the demo (``manifold_optax.demo``: the digits MLP, both hidden layers on the
  spectral sphere, 600 steps) and measures the violation after *every* step from a float64
  SVD: the worst and the median over training, and the test accuracy;
- times the optimizer step on step_bench's reference tree (d = 256) against ``muon``'s, in
  one process with interleaved rounds (medians of per-round ratios, with quartiles), for
  the Chebyshev degrees only (``k`` power steps are the same products as degree ``k``).

Run: ``python benchmarks/spectral_accuracy.py [--degrees 2,3,4,6,8] [--power 6,10]
[--reps 15] [--block 32] [--path gpu] [--no-timing] [--json OUT]``; writes
``benchmarks/results/spectral_accuracy.json`` (or ``OUT``). ``--path gpu`` trains on the
accelerator path (``mo.lowering_for("gpu")``) on any machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _machine import machine  # noqa: E402
from _timing import time_interleaved  # noqa: E402
from step_bench import reference_tree  # noqa: E402

import manifold_optax as mo  # noqa: E402
from manifold_optax import demo  # noqa: E402


def sphere_factory(kind: str, block: int = 32):
    """Per-layer spectral spheres refined by the Chebyshev filter or (``"power"``) power steps."""
    chebyshev = kind != "power"
    return lambda fi, fo: mo.SpectralSphere(math.sqrt(fo / fi), block=block, chebyshev=chebyshev)


def train_demo(kind: str, degree: int, block: int = 32, steps: int = 600, seed: int = 0):
    """The demo's spectral-sphere run (``demo.train``, batch 128); the violation of both hidden
    layers after every step."""
    spec = demo._hidden_only(sphere_factory(kind, block))
    lr = demo.DEFAULT_LR["spectral_sphere"]
    tx = mo.manifold_muon(lr, spec, adam_learning_rate=3e-3, power_iters=degree)
    (xtr, ytr), (xte, yte) = demo.load_digits(seed)
    model = demo.MLP(rngs=nnx.Rngs(seed))
    nnx.update(model, mo.project_params(nnx.state(model, nnx.Param), spec))
    violations = []

    def check(m):
        params = nnx.as_pure(nnx.state(m, nnx.Param))
        violations.append(demo.constraint_violation("spectral_sphere", params))

    demo.train(model, tx, xtr, ytr, steps, 128, seed, on_step=check)
    acc = float(jnp.mean(jnp.argmax(model(xte), -1) == yte))
    return {
        "worst_violation": max(violations),
        "median_violation": statistics.median(violations),
        "final_violation": violations[-1],
        "test_accuracy": acc,
    }


def step_ratios(filters, reps: int, block: int = 32, d: int = 256):
    """Per-round step-time ratios against ``muon``'s on the reference tree: ``{name: [..]}``."""
    tree = reference_tree(d)
    grads = jax.tree.map(lambda x: 0.01 * jax.random.normal(jax.random.PRNGKey(1), x.shape), tree)
    txs = {"muon": (mo.muon(0.02), None)}
    for kind, degree in filters:
        manifold = mo.by_shape(sphere_factory(kind, block))
        txs[(kind, degree)] = (mo.manifold_muon(0.02, manifold, power_iters=degree), manifold)
    fns, args = {}, {}
    for name, (tx, manifold) in txs.items():
        params = tree if manifold is None else mo.project_params(tree, manifold)
        state = tx.init(params)

        def step(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        f = jax.jit(step)
        for _ in range(20):  # steady state: filled momenta, a converged multiplier
            params, state = f(params, state, grads)
        fns[name], args[name] = f, (params, state, grads)
    runs = time_interleaved(fns, args, reps=reps, min_sample_s=0.2, samples=True)
    return {k: [a / b for a, b in zip(runs[k], runs["muon"], strict=True)] for k in txs}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--degrees", default="2,3,4,6,8", help="Chebyshev filter degrees")
    ap.add_argument("--power", default="6,10", help="power-step counts ('' for none)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--block", type=int, default=32, help="the SpectralSphere's block size")
    ap.add_argument(
        "--path",
        choices=("cpu", "gpu"),
        default=None,
        help="trace the training steps for this platform's path (mo.lowering_for); default: "
        "this machine's",
    )
    ap.add_argument("--no-timing", action="store_true", help="accuracy only")
    ap.add_argument("--json", default=None, help="output file")
    a = ap.parse_args()
    # (A new context each time: one made by contextlib.contextmanager is entered only once.)
    path = lambda: mo.lowering_for(a.path) if a.path else contextlib.nullcontext()
    filters = [("chebyshev", int(k)) for k in a.degrees.split(",") if k]
    filters += [("power", int(k)) for k in a.power.split(",") if k]
    rows = []
    for kind, degree in filters:
        row = {"filter": kind, "degree": degree, "block": a.block}
        with path():
            rows.append(row | train_demo(kind, degree, a.block) | {"path": a.path or "default"})
        print(f"trained {kind} {degree}: worst {rows[-1]['worst_violation']:.2e}", flush=True)
    ratios = (
        {}
        if a.no_timing
        else step_ratios([f for f in filters if f[0] == "chebyshev"], a.reps, a.block)
    )
    for r in rows:
        per_round = ratios.get((r["filter"], r["degree"]))
        if per_round is None:
            r["step_vs_muon"] = r["step_vs_muon_quartiles"] = None
            continue
        q1, _, q3 = statistics.quantiles(per_round, n=4)
        r["step_vs_muon"] = statistics.median(per_round)
        r["step_vs_muon_quartiles"] = [q1, q3]
    print(
        f"\n### Spectral sphere retraction: accuracy (digits demo, 600 steps, violation after "
        f"every step; block {a.block}) and step time (reference tree d=256, "
        f"{jax.devices()[0].device_kind}, "
        f"median of {a.reps} interleaved rounds)\n"
    )
    print("| filter | degree | worst ‖W‖₂ violation | median | test acc | step × muon |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        q = r["step_vs_muon_quartiles"]
        time = "—" if q is None else f"{r['step_vs_muon']:.3f} ({q[0]:.3f}–{q[1]:.3f})"
        print(
            f"| {r['filter']} | {r['degree']} | {r['worst_violation']:.1e} | "
            f"{r['median_violation']:.1e} | {100 * r['test_accuracy']:.1f}% | {time} |"
        )
    out = pathlib.Path(
        a.json or pathlib.Path(__file__).parent / "results" / "spectral_accuracy.json"
    )
    out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
