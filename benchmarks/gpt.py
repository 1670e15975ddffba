"""GPT benchmark: optimizers at equal steps and equal time, and learning-rate transfer across
width.

The model is ``gpt_model.GPT`` (Flax NNX: RoPE, fused QKV, RMSNorm, SwiGLU, ``nnx.vmap``-stacked
blocks run by ``nnx.scan``) on the Python standard library's source at byte level. Every
optimizer runs the same warmup-cosine schedule; the matrix optimizers send embeddings, head
and norm scales to AdamW at ``adam_lr``.

1. **Optimizers** (``--part optimizers``): AdamW, ``optax.contrib.muon`` (which orthogonalizes
   the fused QKV kernel as one matrix), ``mo.muon``, ``mo.normuon``, ``mo.adamuon``, ``mo.muon``
   + ``mo.qk_clip(fused="qkv")``, and ``mo.manifold_muon`` on the sphere, the spectral sphere
   (radius ``√(fan_out/fan_in)`` per matrix, ``mo.by_shape``), Stiefel and the oblique
   manifold, each over a 4-point learning-rate grid. Reported per optimizer (best run): the
   final validation loss, the steps to AdamW's final loss and their ratio to AdamW's, the
   median step time over AdamW's (same process), and the validation loss at equal wall-clock
   (the training seconds of the fastest best run, evaluations excluded).
2. **Width transfer** (``--part width``): widths 64, 128, 256 (heads = width / 32, depth
   fixed), a ×2 grid of learning rates for AdamW, ``mo.muon`` and ``manifold_muon`` on the
   spectral sphere and on Stiefel, fewer steps; the optimal learning rate per width and how
   many grid points it moves from the smallest width to the largest.

Run: ``python benchmarks/gpt.py`` (both parts; each result file records its wall-clock
``seconds``) or ``--quick`` (tiny sizes, a few minutes). Results:
``benchmarks/results/gpt.{json,md,png}`` and ``gpt_width.{json,png}`` (``--out DIR`` writes
them elsewhere).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import manifold_optax as mo

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _curves import best_runs, loss_at, steps_to  # noqa: E402
from _machine import machine  # noqa: E402
from gpt_model import GPT, Windows, count_params, dimension_numbers, load_corpus  # noqa: E402
from gpt_report import curves_figure, save, table, width_figure  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
QK_CLIP_THRESHOLD = 20.0

MANIFOLDS = {
    "sphere": lambda: mo.by_shape(lambda fi, fo: mo.Sphere(math.sqrt(fo))),
    "spectral_sphere": lambda: mo.by_shape(lambda fi, fo: mo.SpectralSphere(math.sqrt(fo / fi))),
    "stiefel": lambda: mo.Stiefel(),
    "oblique": lambda: mo.Oblique(),
}
MUON_FAMILY = {"muon": mo.muon, "normuon": mo.normuon, "adamuon": mo.adamuon}

# 4-point grids (×2) for the optimizer comparison; the width study widens them to 6 points.
LRS = {
    "adamw": [1e-3, 2e-3, 4e-3, 8e-3],
    "optax_muon": [0.01, 0.02, 0.04, 0.08],
    "muon": [0.01, 0.02, 0.04, 0.08],
    "normuon": [0.01, 0.02, 0.04, 0.08],
    "adamuon": [1e-3, 2e-3, 4e-3, 8e-3],
    "muon_qk_clip": [0.01, 0.02, 0.04, 0.08],
    "sphere": [0.05, 0.1, 0.2, 0.4],
    "spectral_sphere": [0.025, 0.05, 0.1, 0.2],
    "stiefel": [0.025, 0.05, 0.1, 0.2],
    "oblique": [0.025, 0.05, 0.1, 0.2],
}
WIDTH_LRS = {
    "adamw": [5e-4 * 2**k for k in range(6)],
    "muon": [0.005 * 2**k for k in range(6)],
    "spectral_sphere": [0.0125 * 2**k for k in range(6)],
    "stiefel": [0.0125 * 2**k for k in range(6)],
}


def optax_muon_dims(dims):
    """``optax.contrib.muon``'s dimension numbers from ``mo``'s, as a function of the params:
    the same axes (optax has no split, so the fused QKV kernel is one matrix)."""
    table = {}
    for path, spec in jax.tree_util.tree_flatten_with_path(
        dims, is_leaf=lambda s: s is None or isinstance(s, mo.MatrixSpec)
    )[0]:
        if spec is not None:
            table[mo.path_to_str(path)] = optax.contrib.MuonDimensionNumbers(
                spec.reduction_axis, spec.output_axis
            )

    def fn(params):
        return jax.tree_util.tree_map_with_path(lambda p, _: table.get(mo.path_to_str(p)), params)

    return fn


def make_tx(name, cfg, dims):
    """The optimizer ``name`` and its manifold spec (or None). Its peak learning rate is a
    hyperparameter in the state (``optax.inject_hyperparams``: ``state.hyperparams["peak"]``),
    so one compiled step serves a whole learning-rate grid; the schedule is ``peak`` times a
    warmup-cosine from 0 to 1 and down to 0.1."""
    steps = cfg["steps"]
    unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, steps // 20), steps, 0.1)
    adam = dict(adam_learning_rate=lambda c: cfg["adam_lr"] * unit(c), adam_b2=0.95)
    base = "muon" if name == "muon_qk_clip" else name
    spec = MANIFOLDS[name]() if name in MANIFOLDS else None

    def build(peak):
        lr = lambda c: peak * unit(c)  # noqa: E731
        if name == "adamw":
            return optax.adamw(lr, b2=0.95, weight_decay=0.01)
        if name == "optax_muon":
            return optax.contrib.muon(
                lr, muon_weight_dimension_numbers=optax_muon_dims(dims), **adam
            )
        if base in MUON_FAMILY:
            tx = MUON_FAMILY[base](lr, weight_dimension_numbers=dims, **adam)
            if name == "muon_qk_clip":
                tx = optax.chain(tx, mo.qk_clip(QK_CLIP_THRESHOLD, fused="qkv"))
            return tx
        return mo.manifold_muon(lr, spec, weight_dimension_numbers=dims, **adam)

    return optax.inject_hyperparams(build)(peak=1.0), spec


def loss_fn(m, xy):
    logits, max_logits = m(xy[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, xy[:, 1:]).mean()
    return loss, max_logits


@nnx.jit(donate_argnums=(0, 1), static_argnames="clip")
def train_step(m, o, xy, clip=False):
    (loss, max_logits), g = nnx.value_and_grad(loss_fn, has_aux=True)(m, xy)
    if clip:
        o.update(m, g, max_logits={"blocks/attn": max_logits})
    else:
        o.update(m, g)
    return loss, jnp.max(max_logits)


@nnx.jit
def evaluate(m, xy):
    return loss_fn(m, xy)[0]


@nnx.jit(static_argnums=1)
def new_optimizer(model, tx):
    """``nnx.Optimizer(model, tx)`` as one compiled program (the manifolds' initial warm
    blocks would otherwise run op by op)."""
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


_TX = {}  # one optimizer object per (optimizer, configuration): the compiled steps are shared


def run(name, lr, cfg, train, val, seed=0):
    """Train one model; the curve is ``(step, train loss, val loss, training seconds)``. The
    runs of one optimizer and configuration differ only in the state's peak learning rate, so
    they share one compiled step (the first run's first steps compile it)."""
    model = GPT(cfg["d"], cfg["layers"], cfg["heads"], cfg["seq"], rngs=nnx.Rngs(seed))
    dims = dimension_numbers(model)
    key = (name, *sorted(cfg.items()))
    if key not in _TX:
        tx, spec = make_tx(name, cfg, dims)
        project = None
        if spec is not None:
            project = jax.jit(
                partial(mo.project_params, manifold_spec=spec, weight_dimension_numbers=dims)
            )
        _TX[key] = tx, project
    tx, project = _TX[key]
    if project is not None:
        nnx.update(model, project(nnx.state(model, nnx.Param)))
    opt = new_optimizer(model, tx)
    opt.opt_state.hyperparams["peak"].value = jnp.asarray(lr, jnp.float32)
    clip = name == "muon_qk_clip"

    batches = Windows(train, cfg["seq"], cfg["batch"], seed=seed)
    vb = Windows(val, cfg["seq"], cfg["batch"], seed=1234)
    vbatches = [jnp.asarray(vb.next()) for _ in range(cfg["val_batches"])]
    evals, logits, times = [], [], []
    window = -np.inf
    for t in range(1, cfg["steps"] + 1):
        xy = jnp.asarray(batches.next())
        t0 = time.perf_counter()
        loss, s_max = train_step(model, opt, xy, clip=clip)
        loss = float(loss)  # waits for the step
        times.append(time.perf_counter() - t0)
        window = max(window, float(s_max))
        if t % cfg["eval_every"] == 0 or t == cfg["steps"]:
            vl = float(np.mean([float(evaluate(model, v)) for v in vbatches]))
            evals.append((t, loss, vl))
            logits.append((t, window))
            window = -np.inf
            if not np.isfinite(vl):
                break
    # Training seconds: the steps' times, the first two (which may compile: the first step,
    # and the second where nnx.Optimizer hands a state back in another pytree form) counted at
    # the run's median step time, so no run pays for a compilation another run reused.
    steady = times[2:] or times
    seconds = np.cumsum([np.median(steady)] * min(2, len(times)) + times[2:])
    curve = [(t, loss, vl, float(seconds[t - 1])) for t, loss, vl in evals]
    steady = np.asarray(steady)
    return {
        "optimizer": name,
        "lr": lr,
        "d": cfg["d"],
        "curve": curve,
        "final_val": curve[-1][2],
        "step_seconds": {
            "median": float(np.median(steady)),
            "q1": float(np.percentile(steady, 25)),
            "q3": float(np.percentile(steady, 75)),
        },
        "max_logit": logits,
    }


def summarize(runs):
    best = best_runs(runs)
    target = best["adamw"]["final_val"]
    adam_steps = steps_to(best["adamw"]["curve"], target)
    adam_time = best["adamw"]["step_seconds"]["median"]
    equal_time = min(r["curve"][-1][3] for r in best.values())
    summary = {}
    for n, r in best.items():
        s = steps_to(r["curve"], target)
        summary[n] = {
            "lr": r["lr"],
            "final_val": r["final_val"],
            "steps_to_adamw": s,
            "ratio": s / adam_steps if s else None,
            "step_time_ratio": r["step_seconds"]["median"] / adam_time,
            "val_at_equal_time": loss_at(r["curve"], equal_time),
        }
    return {"target": target, "equal_time_seconds": equal_time, "summary": summary}


def summarize_width(runs, widths):
    out = {}
    for n in WIDTH_LRS:
        per = {}
        for d in widths:
            rs = [r for r in runs if r["optimizer"] == n and r["d"] == d]
            finite = [r for r in rs if np.isfinite(r["final_val"])]
            b = min(finite, key=lambda r: r["final_val"]) if finite else None
            per[d] = {"best_lr": b["lr"] if b else None, "final_val": b["final_val"] if b else None}
        grid = WIDTH_LRS[n]
        lo, hi = per[widths[0]]["best_lr"], per[widths[-1]]["best_lr"]
        shift = None if lo is None or hi is None else grid.index(hi) - grid.index(lo)
        out[n] = {"per_width": per, "grid_shift": shift}
    return out


def config(quick: bool):
    base = dict(
        d=256,
        layers=6,
        heads=8,
        seq=64,
        batch=8,
        steps=120,
        eval_every=10,
        val_batches=4,
        adam_lr=4e-3,
        corpus=4_000_000,
    )
    width = dict(base, layers=2, steps=100, eval_every=25)
    widths = [64, 128, 256]
    if quick:
        base.update(
            d=32,
            layers=2,
            heads=2,
            seq=32,
            batch=4,
            steps=16,
            eval_every=8,
            val_batches=1,
            corpus=300_000,
        )
        width = dict(base, steps=12, eval_every=6)
        widths = [16, 32]
    return base, width, widths


def log(r, elapsed):
    print(
        f"  {r['optimizer']:16s} d={r['d']:<4d} lr={r['lr']:<8g} final val {r['final_val']:.4f}  "
        f"step {1e3 * r['step_seconds']['median']:.0f} ms  [{elapsed:.0f}s]",
        flush=True,
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    ap.add_argument("--part", choices=["all", "optimizers", "width"], default="all")
    ap.add_argument("--optimizers", nargs="+", choices=sorted(LRS), default=list(LRS))
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS)
    for k in ("d", "layers", "heads", "steps", "batch", "seq"):
        ap.add_argument(f"--{k}", type=int, help=f"override the optimizer runs' {k}")
    ap.add_argument("--width-layers", type=int, help="override the width runs' depth")
    ap.add_argument("--width-steps", type=int, help="override the width runs' steps")
    a = ap.parse_args(argv)
    cfg, wcfg, widths = config(a.quick)
    cfg.update(
        {
            k: getattr(a, k)
            for k in ("d", "layers", "heads", "steps", "batch", "seq")
            if getattr(a, k) is not None
        }
    )
    for k in ("batch", "seq"):
        wcfg[k] = cfg[k]
    if a.width_layers:
        wcfg["layers"] = a.width_layers
    if a.width_steps:
        wcfg.update(steps=a.width_steps, eval_every=max(1, a.width_steps // 4))
    if a.quick:
        lrs = {n: v[1:3] for n, v in LRS.items()}
        wlrs = {n: v[1:4] for n, v in WIDTH_LRS.items()}
    else:
        lrs, wlrs = LRS, WIDTH_LRS
    a.out.mkdir(parents=True, exist_ok=True)
    train, val = load_corpus(cfg["corpus"])
    t_start = time.perf_counter()
    if a.part in ("all", "optimizers"):
        n_params = count_params(
            GPT(cfg["d"], cfg["layers"], cfg["heads"], cfg["seq"], rngs=nnx.Rngs(0))
        )
        print(
            f"corpus {len(train)} train / {len(val)} val bytes; model {n_params / 1e6:.2f}M params"
        )
        t_part = time.perf_counter()
        names = ["adamw"] + [n for n in a.optimizers if n != "adamw"]
        runs = []
        for n in names:
            for lr in lrs[n]:
                runs.append(run(n, lr, cfg, train, val))
                log(runs[-1], time.perf_counter() - t_start)
        s = summarize(runs)
        seconds = time.perf_counter() - t_part
        result = dict(
            machine=machine(), config=cfg, params=n_params, seconds=seconds, **s, runs=runs
        )
        (a.out / "gpt.json").write_text(json.dumps(result, indent=1))
        md = table(s["summary"], s["target"], s["equal_time_seconds"])
        head = (
            f"GPT on Python source bytes, {n_params / 1e6:.2f}M params, {cfg['steps']} steps × "
            f"{cfg['batch']}×{cfg['seq']} tokens\n\n"
        )
        (a.out / "gpt.md").write_text(head + md + "\n")
        print("\n" + md)
        save(curves_figure(best_runs(runs), s["target"]), a.out / "gpt.png")
    if a.part in ("all", "width"):
        t_part = time.perf_counter()
        runs = []
        for d in widths:
            c = dict(wcfg, d=d, heads=max(1, d // 32) if not a.quick else 2)
            for n, grid in wlrs.items():
                for lr in grid:
                    runs.append(run(n, lr, c, train, val))
                    log(runs[-1], time.perf_counter() - t_start)
        summary = summarize_width(runs, widths)
        result = dict(
            machine=machine(),
            config=wcfg,
            widths=widths,
            grids=wlrs,
            seconds=time.perf_counter() - t_part,
            summary=summary,
            runs=runs,
        )
        (a.out / "gpt_width.json").write_text(json.dumps(result, indent=1))
        for n, s in summary.items():
            print(
                f"  {n:16s} best lr per width {[s['per_width'][d]['best_lr'] for d in widths]}"
                f"  shift {s['grid_shift']}"
            )
        save(width_figure(runs, widths, wlrs), a.out / "gpt_width.png")
    print(f"total {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
