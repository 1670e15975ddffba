"""The demo: a Flax NNX MLP on scikit-learn's bundled digits, once per optimizer.

Run: python -m manifold_optax.demo (needs the demo extra: scikit-learn, matplotlib, tqdm).
It trains a 64-256-256-10 MLP with AdamW, optax.contrib.muon, manifold_optax's muon, and
manifold_muon on the Stiefel manifold, the spectral sphere, the sphere and the oblique
manifold (unit columns): the two hidden layers on the manifold, the output head and the
biases on AdamW, all for the same steps and batches. It prints a table (each column
explained below it) and writes to --out: demo.png (held-out accuracy and training loss
against steps, the singular values of both hidden layers at the end, each manifold's
constraint violation during training), results.json and table.md.

Learning rates are tuned defaults from a 3-point sweep on this task (--sweep re-runs it:
x1/3, x1, x3 of each default, chosen by the loss on a validation split of the training set,
then retrained on the full training set and reported on the test set).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import manifold_optax as mo
from manifold_optax.demo_figure import plot

HIDDEN = ("layers/0/kernel", "layers/1/kernel")
# Tuned on this task (see --sweep).
DEFAULT_LR = {
    "adamw": 1e-3,
    "optax_muon": 7e-3,
    "muon": 7e-3,
    "stiefel": 0.02,
    "spectral_sphere": 0.02,
    "sphere": 0.15,
    "oblique": 0.05,
}
OPTIMIZERS = tuple(DEFAULT_LR)
STEPS = 500


class MLP(nnx.Module):
    def __init__(self, sizes=(64, 256, 256, 10), *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.gelu(layer(x))
        return self.layers[-1](x)


def load_digits(seed: int):
    from sklearn.datasets import load_digits as _load

    data = _load()
    x = data.data.astype(np.float32)
    y = data.target.astype(np.int32)
    idx = np.random.default_rng(seed).permutation(len(x))
    n_test = len(x) // 5
    test, train = idx[:n_test], idx[n_test:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-3
    x = (x - mean) / std
    return (jnp.asarray(x[train]), jnp.asarray(y[train])), (
        jnp.asarray(x[test]),
        jnp.asarray(y[test]),
    )


def _hidden_only(factory):
    """Manifold spec: hidden kernels on the manifold, everything else on AdamW."""

    def spec(params):
        def pick(path, x):
            return factory(*x.shape) if mo.path_to_str(path) in HIDDEN else None

        return jax.tree_util.tree_map_with_path(pick, params)

    return spec


MANIFOLDS = {
    "stiefel": lambda fi, fo: mo.Stiefel(),
    "spectral_sphere": lambda fi, fo: mo.SpectralSphere(math.sqrt(fo / fi)),
    "sphere": lambda fi, fo: mo.Sphere(math.sqrt(fo)),
    "oblique": lambda fi, fo: mo.Oblique(1.0),
}


def make_optimizer(name: str, lr: float):
    if name == "adamw":
        return optax.adamw(lr, weight_decay=0.0), None
    if name == "optax_muon":
        return optax.contrib.muon(lr, adam_learning_rate=3e-3), None
    if name == "muon":
        return mo.muon(lr, adam_learning_rate=3e-3), None
    spec = _hidden_only(MANIFOLDS[name])
    return mo.manifold_muon(lr, spec, adam_learning_rate=3e-3), spec


def constraint_violation(name: str, params) -> float | None:
    if name not in MANIFOLDS:
        return None
    worst = 0.0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if mo.path_to_str(path) not in HIDDEN:
            continue
        w = np.asarray(x, np.float64)
        s = np.linalg.svd(w, compute_uv=False) if name in ("stiefel", "spectral_sphere") else None
        fi, fo = w.shape
        if name == "stiefel":
            v = np.abs(s - 1).max()
        elif name == "spectral_sphere":
            r = math.sqrt(fo / fi)
            v = abs(s[0] - r) / r
        elif name == "oblique":
            v = np.abs(np.linalg.norm(w, axis=0) - 1.0).max()
        else:
            r = math.sqrt(fo)
            v = abs(np.linalg.norm(w) - r) / r
        worst = max(worst, float(v))
    return worst


def loss_fn(model, x, y):
    """Mean softmax cross-entropy of ``model`` on a batch."""
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def train(model, tx, xtr, ytr, steps: int, batch: int, seed: int, *, on_step=None, progress=None):
    """Trains ``model`` in place with ``tx`` on ``steps`` batches of ``batch`` examples, sampled
    with replacement from ``(xtr, ytr)`` by a generator seeded with ``seed``; the step is one
    ``nnx.jit``-compiled program that donates the model and optimizer state (updated in
    place). ``on_step(model)``, if given, runs after every step (e.g. to check a constraint).
    Returns ``(losses, seconds)``: each step's training loss, and the wall time of every step
    after the first (which compiles)."""
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit(donate_argnums=(0, 1))  # model and optimizer state are updated in place
    def step(m, o, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(m, x, y)
        o.update(m, grads)
        return loss

    rng = np.random.default_rng(seed)
    n = xtr.shape[0]
    losses, times = [], []
    for t in range(steps):
        idx = rng.integers(0, n, batch)
        t0 = time.perf_counter()
        loss = float(step(model, opt, xtr[idx], ytr[idx]))
        if t > 0:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
        if on_step is not None:
            on_step(model)
        if progress is not None:
            progress.update(1)
    return losses, times


@nnx.jit
def accuracy(model, x, y):
    """Fraction of ``x`` that ``model`` classifies as ``y``."""
    return jnp.mean(jnp.argmax(model(x), -1) == y)


def run_one(name, lr, data, steps, batch, seed, progress=None, evals: int = 20):
    """Train one optimizer; return its row: the final figures, the per-step losses, the
    held-out accuracy and the constraint violation at ``evals`` points of training, and the
    final singular values of both hidden layers."""
    (xtr, ytr), (xte, yte) = data
    model = MLP(rngs=nnx.Rngs(seed))
    tx, spec = make_optimizer(name, lr)
    if spec is not None:
        params = nnx.state(model, nnx.Param)
        nnx.update(model, mo.project_params(params, spec))
    every = max(1, steps // evals)
    curve = {"step": [], "accuracy": [], "violation": []}
    count = [0]

    def on_step(m):
        count[0] += 1
        if count[0] % every == 0 or count[0] == steps:
            curve["step"].append(count[0])
            curve["accuracy"].append(float(accuracy(m, xte, yte)))
            v = constraint_violation(name, nnx.as_pure(nnx.state(m, nnx.Param)))
            curve["violation"].append(v)

    losses, times = train(
        model, tx, xtr, ytr, steps, batch, seed, on_step=on_step, progress=progress
    )
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    acc = float(accuracy(model, xte, yte))
    heldout_loss = float(loss_fn(model, xte, yte))
    full_loss = float(loss_fn(model, xtr, ytr))
    hidden = [
        np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if mo.path_to_str(p) in HIDDEN
    ]
    svals = [np.linalg.svd(w.astype(np.float64), compute_uv=False) for w in hidden]
    violations = [v for v in curve["violation"] if v is not None]
    return {
        "optimizer": name,
        "learning_rate": lr,
        "test_accuracy": acc,
        "final_train_loss": full_loss,
        "heldout_loss": heldout_loss,
        "ms_per_step": 1e3 * statistics.median(times) if times else float("nan"),
        "max_constraint_violation": max(violations) if violations else None,
        "sigma_min": float(min(s.min() for s in svals)),
        "sigma_max": float(max(s.max() for s in svals)),
        "losses": losses,
        "curve": curve,
        "spectra": [s.tolist() for s in svals],
    }


COLUMNS = (
    ("optimizer", "the update rule (manifold rows: the manifold of both hidden layers)"),
    ("lr", "its learning rate (the tuned default, or the sweep's choice)"),
    ("test acc", "accuracy on the 359 held-out test digits after the last step"),
    ("final train loss", "cross-entropy on the whole training set after the last step"),
    ("ms/step", "median wall time of one compiled step on this machine"),
    (
        "max constraint violation",
        "largest relative distance of a hidden layer from its manifold during training",
    ),
    ("σ_min, σ_max hidden", "smallest and largest singular value of the hidden layers at the end"),
)


def format_table(rows) -> str:
    """The results as a Markdown table, followed by one line per column saying what it is."""
    head = (
        "| optimizer | lr | test acc | final train loss | ms/step | max constraint violation |"
        " σ_min hidden | σ_max hidden |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        v = r["max_constraint_violation"]
        lines.append(
            f"| {r['optimizer']} | {r['learning_rate']:.3g} | {100 * r['test_accuracy']:.1f}% | "
            f"{r['final_train_loss']:.4f} | {r['ms_per_step']:.2f} | "
            f"{'—' if v is None else f'{v:.1e}'} | {r['sigma_min']:.3f} | {r['sigma_max']:.3f} |"
        )
    lines.append("")
    lines += [f"- {name}: {meaning}" for name, meaning in COLUMNS]
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _int_at_least(name: str, low: int):
    """An argparse type: an integer ``>= low``, else an error naming ``name``."""

    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{name} must be at least {low}, got {v}")
        return v

    return parse


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m manifold_optax.demo", description=__doc__, formatter_class=_HelpFormatter
    )
    ap.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help=f"comma-separated optimizers to train, in order; any of {', '.join(OPTIMIZERS)}",
    )
    ap.add_argument(
        "--steps",
        type=_int_at_least("--steps", 1),
        default=STEPS,
        help="training steps per optimizer",
    )
    ap.add_argument(
        "--batch",
        type=_int_at_least("--batch", 1),
        default=128,
        help="examples per step (drawn with replacement from the training set)",
    )
    ap.add_argument(
        "--seed",
        type=_int_at_least("seed", 0),
        default=0,
        help="seed of the train/test split, the initialization and the batches",
    )
    ap.add_argument(
        "--out", default="demo_output", help="folder for demo.png, results.json, table.md"
    )
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="re-tune each learning rate (x1/3, x1, x3 of the default) on a validation split "
        "first; takes four times as long",
    )
    return ap


def main(argv=None):
    """Run the demo (command-line arguments ``argv``; ``--help`` lists them). Returns the rows
    (one dict per optimizer, as in ``results.json``)."""
    ap = parser()
    a = ap.parse_args(argv)
    names = [s.strip() for s in a.optimizers.split(",") if s.strip()]
    if not names:
        ap.error("--optimizers is empty; choose from " + ", ".join(OPTIMIZERS))
    unknown = [n for n in names if n not in DEFAULT_LR]
    if unknown:
        ap.error(f"unknown optimizers {unknown}; choose from {', '.join(OPTIMIZERS)}")
    if len(set(names)) != len(names):
        ap.error(f"--optimizers names one twice: {names}")
    out = pathlib.Path(a.out)
    if out.exists() and not out.is_dir():
        ap.error(f"--out {out} exists and is not a folder")
    from tqdm import tqdm

    t_start = time.perf_counter()
    data = load_digits(a.seed)
    grid = {
        n: ([DEFAULT_LR[n] / 3, DEFAULT_LR[n], DEFAULT_LR[n] * 3] if a.sweep else []) for n in names
    }
    total = a.steps * sum(len(v) + 1 for v in grid.values())
    (xtr, ytr), _ = data
    n_val = xtr.shape[0] // 5
    sweep_data = ((xtr[n_val:], ytr[n_val:]), (xtr[:n_val], ytr[:n_val]))
    rows = []
    with tqdm(total=total, unit="step") as bar:
        for i, n in enumerate(names):
            bar.set_description(f"{n} ({i + 1}/{len(names)})")
            lr = DEFAULT_LR[n]
            if grid[n]:
                # Choose on a validation split carved from the training set, never the test set.
                runs = [run_one(n, g, sweep_data, a.steps, a.batch, a.seed, bar) for g in grid[n]]
                lr = min(runs, key=lambda r: r["heldout_loss"])["learning_rate"]
                bar.write(
                    f"  {n}: validation losses "
                    + ", ".join(f"{r['learning_rate']:.3g}→{r['heldout_loss']:.4f}" for r in runs)
                )
            rows.append(run_one(n, lr, data, a.steps, a.batch, a.seed, bar))
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    print(
        f"\nDigits ({xtr.shape[0]} train / {data[1][0].shape[0]} test), MLP 64→256→256→10, "
        f"{a.steps} steps, batch {a.batch}\n"
    )
    print(table)
    plot(rows, out / "demo.png", OPTIMIZERS)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "table.md").write_text(table + "\n")
    print(
        f"\nwrote {out / 'demo.png'}, {out / 'results.json'} and {out / 'table.md'} "
        f"in {time.perf_counter() - t_start:.0f} s"
    )
    return rows


if __name__ == "__main__":
    main()
