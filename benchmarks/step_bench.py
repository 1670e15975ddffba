"""Optimizer step time on a transformer-like tree, against optax.contrib.muon and the roofline.

Reference tree: 4 blocks with d = 256: q, k, v, o (d×d), up (d×4d), down (4d×d) and a
vector scale (d) per block, float32 (``--d`` sets d; ``--wide`` is ``--d 512``). Each optimizer's update is jitted
(not donated here: the same step is timed again and again on the same inputs; the examples
donate) and timed in one process with interleaved repetitions; times are medians, ratios the
median over rounds of the ratio within a round (each round runs every candidate back to back,
so the machine's slow drifts cancel), with the quartiles of those per-round ratios against
``muon``'s default beside them (the goal column; how far a run's median may move). The
roofline is the tree's standard Newton–Schulz FLOPs (``steps·(4m²n + 2m³)`` per matrix)
divided by the rate of a plain batched matmul timed in the same run. Each optimizer first
takes 20 warm-up steps (steady state: filled momenta, a converged online multiplier), then
the same step is timed repeatedly. Also checks that
repeated steps do not retrace (the "traces" column counts traces after the first).

The "GFLOP" and "FLOPs × muon" columns count the matmul FLOPs of each step from its jaxpr
(``_flops.matmul_flops``: the path a step on the manifold takes, fallback conditionals at
their cheapest branch). Their ratio is the time ratio the step would have if every product ran
at the same rate: the floor under the measured ratio, which only fewer FLOPs can lower.

Run: ``python benchmarks/step_bench.py [--d D | --wide] [--reps N] [--only NAMES] [--json OUT]``;
writes ``benchmarks/results/step.json`` (d = 256), ``step_wide.json`` (512) or
``step_d{D}.json``, or ``OUT``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _flops import matmul_flops  # noqa: E402
from _machine import machine  # noqa: E402
from _timing import time_interleaved  # noqa: E402

import manifold_optax as mo  # noqa: E402

JORDAN = (3.4445, -4.7750, 2.0315)


def reference_tree(d: int, blocks: int = 4, seed: int = 0):
    key = jax.random.PRNGKey(seed)
    tree = {}
    for b in range(blocks):
        shapes = {
            "q": (d, d),
            "k": (d, d),
            "v": (d, d),
            "o": (d, d),
            "up": (d, 4 * d),
            "down": (4 * d, d),
            "scale": (d,),
        }
        blk = {}
        for name, shp in shapes.items():
            key, sub = jax.random.split(key)
            blk[name] = jax.random.normal(sub, shp, jnp.float32) / math.sqrt(shp[0])
        tree[f"block{b}"] = blk
    return tree


def ns_flops(tree, steps=5):
    return sum(mo.newton_schulz_flops(x.shape, steps) for x in jax.tree.leaves(tree) if x.ndim == 2)


@dataclasses.dataclass(frozen=True)
class UnscaledStiefel(mo.Stiefel):
    """Stiefel whose online direction is only projected onto the tangent space, without the
    division by ``1 + ‖c‖_F`` that keeps ``‖Φ‖₂ ≤ max(1, ‖msign‖₂)``: the A/B row that prices
    that division."""

    def tangent_in_ball(self, W, Phi, c, theta=None):
        return self.remove_normal(W, Phi, c)


def optimizers(lr=0.02):
    hidden = lambda make: mo.by_shape(make)
    return {
        "adamw": optax.adamw(lr),
        "optax_muon": optax.contrib.muon(lr),
        "muon (Jordan 5, Frobenius)": mo.muon(lr, ns_coeffs=JORDAN, normalization="frobenius"),
        "muon (default)": mo.muon(lr),
        "muon (bf16 compute)": mo.muon(lr, compute_dtype=jnp.bfloat16),
        "manifold_muon sphere": mo.manifold_muon(
            lr, hidden(lambda fi, fo: mo.Sphere(math.sqrt(fo)))
        ),
        "manifold_muon spectral_sphere": mo.manifold_muon(
            lr, hidden(lambda fi, fo: mo.SpectralSphere(math.sqrt(fo / fi)))
        ),
        "manifold_muon stiefel": mo.manifold_muon(lr, mo.Stiefel()),
        "manifold_muon stiefel (unscaled projection)": mo.manifold_muon(lr, UnscaledStiefel()),
        "manifold_muon oblique": mo.manifold_muon(lr, hidden(lambda fi, fo: mo.Oblique(1.0))),
        # Last: its LAPACK eigensolver keeps threads busy after it returns, which slowed the
        # candidate timed next (the next round starts with AdamW, which absorbs it).
        "manifold_muon spectral_sphere (exact norm)": mo.manifold_muon(
            lr, hidden(lambda fi, fo: mo.SpectralSphere(math.sqrt(fo / fi), exact_norm=True))
        ),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--wide", action="store_true", help="d = 512")
    ap.add_argument("--d", type=int, default=None, help="model width (default 256)")
    ap.add_argument("--json", default=None, help="output file (default: by d, see above)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--only", default=None, help="comma-separated subset of optimizer names")
    a = ap.parse_args()
    d = a.d if a.d is not None else 512 if a.wide else 256
    tree = reference_tree(d)
    txs = optimizers()
    if a.only:
        keep = a.only.split(",")
        txs = {k: v for k, v in txs.items() if any(s in k for s in keep)}
    grads = jax.tree.map(lambda x: 0.01 * jax.random.normal(jax.random.PRNGKey(1), x.shape), tree)
    fns, args, traces, gflop = {}, {}, {}, {}
    for name, tx in txs.items():
        params = mo.project_params(tree, tx_manifold(name))
        state = tx.init(params)
        count = matmul_flops(lambda p, s, g, tx=tx: tx.update(g, s, p), params, state, grads)
        gflop[name] = count.flops / 1e9
        traces[name] = 0

        def step(p, s, g, tx=tx, name=name):
            traces[name] += 1
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        f = jax.jit(step)
        # Steady state: 20 warm-up steps (the online multiplier converges, momenta fill).
        for _ in range(20):
            params, state = f(params, state, grads)
        traces[name] = 0 if traces[name] == 1 else traces[name]
        fns[name] = f
        args[name] = (params, state, grads)
    # Roofline: a batched matmul of the same FLOP count, [k, d, 4d] @ [k, 4d, d].
    flops = ns_flops(tree)
    k = max(1, round(flops / (2.0 * d * d * 4 * d)))
    lhs = jax.random.normal(jax.random.PRNGKey(2), (k, d, 4 * d))
    rhs = jax.random.normal(jax.random.PRNGKey(3), (k, 4 * d, d))
    fns["matmul"] = jax.jit(lambda a, b: a @ b)
    args["matmul"] = (lhs, rhs)
    runs = time_interleaved(fns, args, reps=a.reps, min_sample_s=0.2, samples=True)
    t = {name: statistics.median(v) for name, v in runs.items()}
    roof_scale = flops / (2.0 * k * d * d * 4 * d)  # the tree's NS FLOPs / the matmul's
    t_roof = t["matmul"] * roof_scale

    def per_round(name, base):
        # The ratio within each round (each round runs every candidate back to back, so the
        # machine's slow drifts cancel).
        return [a / b for a, b in zip(runs[name], runs[base], strict=True)]

    def ratio(name, base):
        # Median over rounds of the ratio within a round, rather than a ratio of medians.
        return statistics.median(per_round(name, base)) if base in runs else None

    def spread(name, base):
        # The quartiles of those per-round ratios: how far one run's median may move.
        if base not in runs or len(runs[name]) < 4:
            return None
        q1, _, q3 = statistics.quantiles(per_round(name, base), n=4)
        return [q1, q3]

    # Two baselines of ours: the muon with optax's Newton–Schulz (Jordan's coefficients,
    # Frobenius normalization: the equal-NS comparison with optax.contrib.muon), and the
    # muon with the defaults that manifold_muon also runs (Polar Express, 5 steps, Schatten-8
    # normalization: the equal-NS baseline of the manifold rows, the issue-6 goal column).
    jordan, default = "muon (Jordan 5, Frobenius)", "muon (default)"
    rows = []
    for name in txs:
        rows.append(
            {
                "optimizer": name,
                "ms": 1e3 * t[name],
                "vs_optax_muon": ratio(name, "optax_muon"),
                "vs_roofline": ratio(name, "matmul") / roof_scale,
                "vs_muon_default": ratio(name, default),
                "vs_muon_default_quartiles": spread(name, default),
                "vs_muon_jordan": ratio(name, jordan),
                "gflop": gflop[name],
                "flops_vs_muon_default": gflop[name] / gflop[default] if default in gflop else None,
                "traces": traces[name],
            }
        )
    print(
        f"\n### Step time, reference tree d={d} (4 blocks), float32, "
        f"{jax.devices()[0].device_kind}, median of {a.reps} interleaved samples\n"
    )
    print(
        f"NS FLOPs (5 steps): {flops / 1e9:.1f} GFLOP; batched matmul rate "
        f"{flops / t_roof / 1e9:.0f} GFLOP/s; roofline {1e3 * t_roof:.1f} ms\n"
    )
    print(
        "| optimizer | ms/step | × optax muon | × roofline | × muon default (same NS as "
        "manifold_muon; quartiles over rounds) | × muon Jordan/Frobenius (same NS as optax) "
        "| GFLOP | FLOPs × muon default | traces |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda v: "—" if v is None else f"{v:.3f}"
        q = r["vs_muon_default_quartiles"]
        quartiles = "" if q is None else f" ({q[0]:.3f}–{q[1]:.3f})"
        print(
            f"| {r['optimizer']} | {r['ms']:.1f} | {f(r['vs_optax_muon'])} | "
            f"{r['vs_roofline']:.3f} | {f(r['vs_muon_default'])}{quartiles} | "
            f"{f(r['vs_muon_jordan'])} | "
            f"{r['gflop']:.2f} | {f(r['flops_vs_muon_default'])} | {r['traces']} |"
        )
    default = {256: "step.json", 512: "step_wide.json"}.get(d, f"step_d{d}.json")
    out = pathlib.Path(a.json) if a.json else pathlib.Path(__file__).parent / "results" / default
    out.write_text(
        json.dumps(
            {
                "machine": machine(),
                "d": d,
                "ns_gflop": flops / 1e9,
                "roofline_ms": 1e3 * t_roof,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"\nwrote {out}")


def tx_manifold(name):
    if "stiefel" in name:
        return mo.Stiefel()
    if "oblique" in name:
        return mo.Oblique()
    if "spectral_sphere" in name:
        return mo.by_shape(lambda fi, fo: mo.SpectralSphere(math.sqrt(fo / fi)))
    if "sphere" in name:
        return mo.by_shape(lambda fi, fo: mo.Sphere(math.sqrt(fo)))
    return None


if __name__ == "__main__":
    main()
