"""Multiplier solvers for Stiefel manifold Muon: iterations and time to a relative tangent
violation of 1e-6, in float64, and the "project G, then msign" heuristic's value.

Run: ``python benchmarks/solver_bench.py [--quick]``. Writes ``benchmarks/results/solvers.json``.
``--certified [--big] [--only NAME]``: the certified exact solve (``Manifold.solve(..., "exact")``) of
Stiefel and Oblique problems at layer size, tall and wide, nearly square and with
rank-deficient gradients, to a relative duality gap of 2e-3 (float32) or 1e-6 (float64)
(``gap_tol``, and the fixed point's ``tol``), the gap recomputed in float64 from the returned
direction and multiplier; writes ``benchmarks/results/solvers_certified.json`` (``--big``: the
4096×1024 cases, one solve each, merged into that file).

Solvers: ``exact`` (Su's fixed point + Anderson mixing, one SVD per iteration),
``fixed_point`` (Su's plain fixed point), ``dual_ascent`` (``Y ← Y − η₂·sym(WᵀΦ)`` with a
10-step msign per iteration, constant η₂ = 0.1 — the online solver's iteration with W, G held
fixed). "msign-eq" = solver time / time of one default (5-step) msign of the same shape.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _machine import machine  # noqa: E402
from _timing import time_interleaved  # noqa: E402

import manifold_optax as mo  # noqa: E402
from manifold_optax import manifolds as M  # noqa: E402
from manifold_optax.manifolds import stiefel  # noqa: E402


def _sym(a):
    return 0.5 * (a + a.T)


TOL = 1e-6


def problem(n, m, seed=0):
    rng = np.random.default_rng(seed)
    W = jnp.asarray(np.linalg.qr(rng.standard_normal((n, m)))[0])
    G = jnp.asarray(rng.standard_normal((n, m)))
    G = G / (jnp.linalg.norm(G) / np.sqrt(m))
    return W, G


def violation(W, Phi):
    R = _sym(W.T @ Phi)
    return float(jnp.linalg.norm(R) / jnp.linalg.norm(Phi))


def run_shape(n, m, max_iters, da_cap):
    W, G = problem(n, m)
    X0 = -_sym(W.T @ G)
    rows = {}
    msign_fn = jax.jit(lambda x: mo.msign(x))
    if n == m:
        closed = jax.jit(lambda G, W: M.Stiefel().solve(G, W, "exact")[0])
        t = time_interleaved({"c": closed, "ms": msign_fn}, {"c": (G, W), "ms": (G,)}, reps=5)
        rows["closed_form"] = {
            "iters": 1,
            "violation": violation(W, closed(G, W)),
            "ms": 1e3 * t["c"],
            "msign_eq": t["c"] / t["ms"],
        }
        return rows
    cfg = M.SolverConfig(tol=TOL, max_iters=max_iters)
    for name, anderson in (("exact", True), ("fixed_point", False)):
        f = jax.jit(lambda G, W, X0, a=anderson: stiefel.su_solve(G, W, X0, cfg, anderson=a))
        Phi, _, iters = f(G, W, X0)
        t = time_interleaved({"s": f, "ms": msign_fn}, {"s": (G, W, X0), "ms": (G,)}, reps=3)
        rows[name] = {
            "iters": int(iters),
            "violation": violation(W, Phi),
            "ms": 1e3 * t["s"],
            "msign_eq": t["s"] / t["ms"],
        }
    # Dual ascent / online: constant-step dual gradient descent, accurate msign.
    step = jax.jit(
        lambda X: (
            X - 0.1 * _sym(W.T @ mo.msign(G + W @ X, steps=10)),
            mo.msign(G + W @ X, steps=10),
        )
    )
    X, k, v = X0, 0, 1.0
    t0 = time.perf_counter()
    while k < da_cap:
        Xn, Phi = step(X)
        v = violation(W, Phi)
        if v <= TOL:
            break
        X, k = Xn, k + 1
    dt = time.perf_counter() - t0
    t_ms = time_interleaved({"ms": msign_fn}, {"ms": (G,)}, reps=3)["ms"]
    rows["dual_ascent"] = {
        "iters": k,
        "violation": v,
        "ms": 1e3 * dt,
        "msign_eq": dt / t_ms,
        "capped": k >= da_cap,
    }
    return rows


def heuristic(n=64, m=32, seed=0):
    """Value of the exact direction vs "project G, then msign" made feasible (MATH.md §3)."""
    rng = np.random.default_rng(seed)
    W = jnp.asarray(np.linalg.qr(rng.standard_normal((n, m)))[0])
    G = jnp.asarray(rng.standard_normal((n, m)))
    st = M.Stiefel()
    exact = st.steepest_direction(G, W, "exact")
    raw = mo.msign_svd(G - W @ _sym(W.T @ G))
    feas = st.project_tangent(W, raw)
    feas = feas / jnp.linalg.norm(feas, ord=2)
    return {
        "exact": float(jnp.vdot(G, exact)),
        "heuristic_raw_infeasible": float(jnp.vdot(G, raw)),
        "heuristic_feasible": float(jnp.vdot(G, feas)),
        "raw_violation": violation(W, raw),
    }


#: (manifold, shape, dtype, gradient rank or None) of the certified solve.
CERTIFIED = [
    (man, shape, "float32", None)
    for shape in [(1024, 256), (256, 1024), (2048, 512), (512, 2048)]
    for man in ("Stiefel", "Oblique")
] + [
    ("Stiefel", (512, 128), "float64", None),
    ("Oblique", (512, 128), "float64", None),
    ("Stiefel", (256, 255), "float32", None),
    ("Stiefel", (256, 252), "float32", None),
    ("Oblique", (256, 256), "float32", None),
    ("Stiefel", (128, 127), "float64", None),
    ("Stiefel", (1024, 256), "float32", 32),
    ("Oblique", (1024, 256), "float32", 32),
]
BIG = [("Stiefel", (4096, 1024), "float32", None), ("Oblique", (4096, 1024), "float32", None)]


def certified_case(name, shape, dtype, rank, reps):
    """One certified solve: its gap (reported and recomputed in float64), Newton steps, and
    its time in msigns of the same matrix (``SolverConfig.ns_steps`` steps, HIGHEST
    precision, the working dtype), the ratio taken within each of ``reps`` rounds."""
    man = getattr(mo, name)()
    rng = np.random.default_rng(0)
    W = man.project(jnp.asarray(rng.standard_normal(shape), dtype))
    if rank is None:
        G = rng.standard_normal(shape)
    else:
        G = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
    G = jnp.asarray(G, dtype)
    tol = 2e-3 if dtype == "float32" else 1e-6
    cfg = M.SolverConfig(gap_tol=tol, tol=tol)  # the fixed point stops at the same residual
    solve = jax.jit(lambda G, W: man.solve(G, W, "exact", config=cfg))
    unit = jax.jit(lambda Z: mo.msign(Z, steps=cfg.ns_steps, precision=jax.lax.Precision.HIGHEST))
    sol = jax.block_until_ready(solve(G, W))
    jax.block_until_ready(unit(G))
    ratios, secs = [], []
    for _ in range(reps):
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(unit(G))
            ts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sol = jax.block_until_ready(solve(G, W))
        secs.append(time.perf_counter() - t0)
        ratios.append(secs[-1] / sorted(ts)[1])
    # The certificate recomputed in float64: L = ⟨Ĝ, Φ⟩ (Φ feasible: σ₁ and C_W(Φ) recorded),
    # U = ‖Ĝ + C_W*(Y)‖_*.
    G64, P64 = np.asarray(G, np.float64), np.asarray(sol.direction, np.float64)
    with jax.enable_x64(True):
        W64, Y64 = (
            jnp.asarray(np.asarray(W, np.float64)),
            jnp.asarray(np.asarray(sol.multiplier, np.float64)),
        )
        adj = np.asarray(man.adjoint(W64, Y64))
        viol = float(man.tangent_violation(W64, jnp.asarray(P64)))
    scale = np.linalg.norm(G64) / np.sqrt(min(shape))
    U = np.linalg.svd(G64 / scale + adj, compute_uv=False).sum()
    L = float(np.sum(G64 * P64)) / scale
    return {
        "manifold": name,
        "shape": "x".join(map(str, shape)),
        "dtype": dtype,
        "rank": rank,
        "gap_tol": tol,
        "gap": float(sol.info.duality_gap),
        "gap_float64": (U - L) / U,
        "sigma1_minus_1": float(np.linalg.svd(P64, compute_uv=False)[0] - 1.0),
        "tangent_violation": viol,
        "newton_steps": int(sol.info.iterations),
        "converged": bool(sol.info.converged),
        "seconds": statistics.median(secs),
        "msign_eq": statistics.median(ratios),
    }


def certified(big: bool, only: str | None):
    """Run :data:`CERTIFIED` (``big``: :data:`BIG`; ``only``: one manifold's cases), merged
    into the file's rows when either is given."""
    out = pathlib.Path(__file__).parent / "results" / "solvers_certified.json"
    merge = (big or only) and out.exists()
    rows = json.loads(out.read_text())["cases"] if merge else []
    key = lambda r: (r["manifold"], r["shape"], r["dtype"], r["rank"])
    cases = [c for c in (BIG if big else CERTIFIED) if only in (None, c[0])]
    for name, shape, dtype, rank in cases:
        reps = 1 if max(shape) >= 2048 else 3
        r = certified_case(name, shape, dtype, rank, reps)
        rows = [x for x in rows if key(x) != key(r)] + [r]
        print(
            f"| {r['manifold']} | {r['shape']} | {dtype} | {rank or 'full'} | {r['gap']:.1e} | "
            f"{r['gap_float64']:.1e} | {r['newton_steps']} | {r['msign_eq']:.1f} |",
            flush=True,
        )
        out.write_text(json.dumps({"machine": machine(), "cases": rows}, indent=1))
    print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--certified", action="store_true")
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--only", choices=("Stiefel", "Oblique"), help="one manifold's cases")
    a = ap.parse_args()
    if a.certified:
        print("| manifold | shape | dtype | gradient rank | gap | float64 gap | Newton | msigns |")
        print("|---|---|---|---|---|---|---|---|")
        return certified(a.big, a.only)
    shapes = [(64, 32), (256, 64), (1024, 128), (512, 512)]
    if a.quick:
        shapes = [(64, 32), (256, 64)]
    result = {"tol": TOL, "dtype": "float64", "shapes": {}}
    for n, m in shapes:
        result["shapes"][f"{n}x{m}"] = run_shape(n, m, max_iters=5000, da_cap=20000)
        print(f"  done {n}x{m}", file=sys.stderr)
    result["heuristic_64x32"] = [heuristic(seed=s) for s in range(5)]
    print("\n### Stiefel multiplier solvers: to relative tangent violation 1e-6 (float64, CPU)\n")
    print("| shape | solver | iterations | violation | time ms | msign-equivalents |")
    print("|---|---|---|---|---|---|")
    for shp, rows in result["shapes"].items():
        for name, r in rows.items():
            capped = " (cap)" if r.get("capped") else ""
            print(
                f"| {shp} | {name} | {r['iters']}{capped} | {r['violation']:.1e} | "
                f"{r['ms']:.1f} | {r['msign_eq']:.1f} |"
            )
    print("\n### 'project G, then msign' vs exact, random 64×32 Stiefel (5 seeds)\n")
    print("| seed | exact tr(GᵀΦ) | heuristic (infeasible) | heuristic made feasible | loss |")
    print("|---|---|---|---|---|")
    for s, h in enumerate(result["heuristic_64x32"]):
        loss = 1 - h["heuristic_feasible"] / h["exact"]
        print(
            f"| {s} | {h['exact']:.1f} | {h['heuristic_raw_infeasible']:.1f} | "
            f"{h['heuristic_feasible']:.1f} | {100 * loss:.1f}% |"
        )
    out = pathlib.Path(__file__).parent / "results" / "solvers.json"
    out.write_text(json.dumps({"machine": machine(), **result}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
