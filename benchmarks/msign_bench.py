"""msign speed (vs optax's Newton–Schulz, SVD and the matmul roofline) and accuracy per schedule.

Run: ``python benchmarks/msign_bench.py [--quick] [--dtype float32|bfloat16] [--shapes 4096x4096,…]
[--no-svd] [--out PATH]``. Prints two markdown tables and writes ``benchmarks/results/msign.json``.

``--dtype bfloat16`` times bfloat16 inputs against a bfloat16 matmul of the same FLOPs with
float32 accumulation, as msign's own products have (so ``ours/roofline`` is the fraction of the
device's bfloat16 matmul rate; issue 6 asks for it at 4096×4096 on a GPU: ``--dtype bfloat16
--shapes 4096x4096 --no-svd``), and the accuracy table runs the products in bfloat16
(``compute_dtype``; coefficients, normalization and accumulation stay float32), measuring the
σ of the result in float64.

Roofline: a plain batched matmul ``[k, m, n] @ [k, n, m]`` whose FLOP count equals the
Newton–Schulz FLOPs ``steps·(4m²n + 2m³)`` is timed in the same process; the fraction of the
roofline is its time divided by the candidate's time.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from optax.contrib._muon import orthogonalize_via_newton_schulz

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _machine import machine  # noqa: E402
from _timing import time_interleaved  # noqa: E402

import manifold_optax as mo  # noqa: E402
from manifold_optax import schedules  # noqa: E402

JORDAN = jnp.asarray(schedules.JORDAN[0])


def speed_rows(shapes, dtype, steps, reps, with_svd=True):
    rows = []
    for shape in shapes:
        key = jax.random.PRNGKey(0)
        x = jax.random.normal(key, shape, dtype)
        *batch, r, c = shape
        m, n = min(r, c), max(r, c)
        b = math.prod(batch)
        flops = mo.newton_schulz_flops(shape, steps)
        k = max(1, round(flops / (2.0 * m * m * n)))
        lhs = jax.random.normal(key, (k, m, n), dtype)
        rhs = jax.random.normal(key, (k, n, m), dtype)
        ours = jax.jit(lambda x: mo.msign(x, steps=steps))
        x2 = x.reshape(b, r, c)
        theirs = jax.jit(
            lambda x: jax.vmap(lambda y: orthogonalize_via_newton_schulz(y, JORDAN, steps))(x)
        )
        svd = jax.jit(mo.msign_svd)
        # bfloat16 inputs with float32 accumulation, as msign's own products: on XLA:CPU with
        # AVX512-BF16 that ran at 650 GFLOP/s (4096², 2 cores) against 285 for a bfloat16 result.
        matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
        fns = {"ours": ours, "optax": theirs, "svd": svd, "matmul": matmul}
        args = {"ours": (x,), "optax": (x2,), "svd": (x.astype(jnp.float32),), "matmul": (lhs, rhs)}
        if not with_svd:
            del fns["svd"], args["svd"]
        t = time_interleaved(fns, args, reps=reps)
        t_roof = t["matmul"] * flops / (2.0 * k * m * m * n)
        row = {
            "shape": list(shape),
            "dtype": str(jnp.dtype(dtype)),
            "steps": steps,
            "gflop": flops / 1e9,
        }
        for name in ("ours", "optax", "svd") if with_svd else ("ours", "optax"):
            row[f"{name}_ms"] = 1e3 * t[name]
            row[f"{name}_gflops"] = flops / t[name] / 1e9
            row[f"{name}_roofline_fraction"] = t_roof / t[name]
        row["matmul_gflops"] = flops / t_roof / 1e9
        rows.append(row)
        print(f"  timed {shape}", file=sys.stderr)
    return rows


def accuracy_rows(size=256, rank=256, seed=0, compute_dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    out = []
    for lo in (1e-2, 1e-3):
        s = np.exp(rng.uniform(np.log(lo), 0, rank))
        s[0], s[-1] = 1.0, lo
        u, _ = np.linalg.qr(rng.standard_normal((size, rank)))
        v, _ = np.linalg.qr(rng.standard_normal((size, rank)))
        g = jnp.asarray((u * s) @ v.T, jnp.float32)
        configs = [("jordan", k) for k in range(3, 11)]
        configs += [("polar_express", k) for k in range(3, 11)] + [("you", 5)]
        for name, k in configs:
            for norm in ("schatten8", "frobenius"):
                y = mo.msign(
                    g, steps=k, coeffs=name, normalization=norm, compute_dtype=compute_dtype
                )
                sv = np.linalg.svd(np.asarray(y, np.float64), compute_uv=False)
                out.append(
                    {
                        "schedule": name,
                        "steps": k,
                        "normalization": norm,
                        "sigma_min_ratio": lo,
                        "compute_dtype": str(jnp.dtype(compute_dtype)),
                        "max_abs_sigma_minus_1": float(np.abs(sv - 1).max()),
                    }
                )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-svd", action="store_true", help="skip the SVD reference timing")
    ap.add_argument(
        "--shapes", default=None, help="comma-separated shapes to time, e.g. 4096x4096,16x256x256"
    )
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "msign.json"))
    a = ap.parse_args()
    shapes = [(256, 256), (1024, 1024), (1024, 4096), (4096, 1024), (16, 256, 256)]
    if a.quick:
        shapes = [(256, 256), (16, 128, 128)]
    if a.shapes:
        shapes = [tuple(int(d) for d in sh.split("x")) for sh in a.shapes.split(",")]
    dtype = jnp.dtype(a.dtype)
    speed = speed_rows(shapes, dtype, a.steps, a.reps, with_svd=not a.no_svd)
    acc = accuracy_rows(compute_dtype=dtype)

    print(
        f"\n### msign speed ({a.dtype}, {a.steps} steps, {jax.devices()[0].device_kind}, "
        "median of interleaved runs)\n"
    )
    print(
        "| shape | ours ms | ours GFLOP/s | ours/roofline | optax ms | optax/roofline | SVD ms |"
        " matmul GFLOP/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in speed:
        print(
            f"| {'×'.join(map(str, r['shape']))} | {r['ours_ms']:.2f} | {r['ours_gflops']:.1f} | "
            f"{r['ours_roofline_fraction']:.2f} | {r['optax_ms']:.2f} | "
            f"{r['optax_roofline_fraction']:.2f} | {r.get('svd_ms', float('nan')):.1f} | "
            f"{r['matmul_gflops']:.1f} |"
        )
    print(
        "\n### max|σ−1| after msign, 256×256 rank 256, log-uniform spectrum "
        f"(float32 input, {a.dtype} products)\n"
    )
    print(
        "| schedule | steps | [1e-2,1] schatten8 | [1e-2,1] frobenius | [1e-3,1] schatten8 |"
        " [1e-3,1] frobenius |"
    )
    print("|---|---|---|---|---|---|")
    keyed = {(r["schedule"], r["steps"], r["normalization"], r["sigma_min_ratio"]): r for r in acc}
    for name, k in sorted({(r["schedule"], r["steps"]) for r in acc}):
        vals = [
            keyed[(name, k, nm, lo)]["max_abs_sigma_minus_1"]
            for lo in (1e-2, 1e-3)
            for nm in ("schatten8", "frobenius")
        ]
        print(f"| {name} | {k} | " + " | ".join(f"{v:.2e}" for v in vals) + " |")
    result = {
        "machine": machine(),
        "speed": speed,
        "accuracy": acc,
    }
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
