"""The demo's figure: training loss and held-out accuracy against steps, each manifold's
constraint violation during training, and the hidden layers' singular values at the end."""

from __future__ import annotations

import math

import numpy as np

LOSS_FLOOR = 1e-3
VIOLATION_FLOOR = 1e-9


def smooth(x, halflife: float):
    """Exponential moving average of ``x`` with the given half-life in steps (debiased)."""
    a = 0.5 ** (1.0 / max(halflife, 1e-9))
    out, m, w = [], 0.0, 0.0
    for v in x:
        m, w = a * m + (1 - a) * v, a * w + (1 - a)
        out.append(m / w)
    return np.asarray(out)


def plot(rows, path, order):
    """The demo's figure: training loss and held-out accuracy against steps, each manifold's
    constraint violation during training, and both hidden layers' singular values at the
    end. Values outside a panel's range are drawn at its edge (the range is in the label).
    ``order``: every optimizer name, in the order that fixes its colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    (loss_ax, acc_ax, viol_ax), (s0_ax, s1_ax, key_ax) = axes
    colors = {n: plt.get_cmap("tab10")(i) for i, n in enumerate(order)}
    finals = [r["curve"]["accuracy"][-1] for r in rows if r["curve"]["accuracy"]]
    acc_lo = max(0.0, math.floor((min(finals, default=0.9) - 0.1) * 20) / 20)
    for r in rows:
        c = colors[r["optimizer"]]
        losses = np.asarray(r["losses"])
        loss_ax.plot(
            np.arange(1, len(losses) + 1),
            np.maximum(smooth(losses, max(1, len(losses) / 60)), LOSS_FLOOR),
            color=c,
        )
        cv = r["curve"]
        acc_ax.plot(cv["step"], np.clip(cv["accuracy"], acc_lo, 1.0), color=c, marker=".")
        if r["max_constraint_violation"] is not None:
            viol_ax.plot(cv["step"], np.maximum(cv["violation"], VIOLATION_FLOOR), color=c)
        s0_ax.plot(r["spectra"][0], color=c)
        s1_ax.plot(r["spectra"][1], color=c)
        key_ax.plot([], [], color=c, lw=3, label=r["optimizer"])
    loss_ax.set(
        yscale="log",
        xlabel="step",
        ylabel=f"training loss (EMA; below {LOSS_FLOOR:g} drawn at {LOSS_FLOOR:g})",
        title="Training loss",
    )
    loss_ax.set_ylim(bottom=LOSS_FLOOR / 1.5)
    acc_ax.set(
        xlabel="step",
        ylabel=f"held-out accuracy (below {acc_lo:.2f} drawn at {acc_lo:.2f})",
        title="Accuracy on the test digits",
        ylim=(acc_lo - 0.005, 1.005),
    )
    viol_ax.set(
        yscale="log",
        xlabel="step",
        ylabel=f"relative distance from the manifold (≥ {VIOLATION_FLOOR:g})",
        title="Constraint violation (manifold rows)",
    )
    viol_ax.set_ylim(bottom=VIOLATION_FLOOR / 2)
    s0_ax.set(
        xlabel="index",
        ylabel="singular value",
        title="Hidden layer 1 (64×256) at the end",
    )
    s1_ax.set(
        xlabel="index",
        ylabel="singular value",
        title="Hidden layer 2 (256×256) at the end",
    )
    for ax in (loss_ax, acc_ax, viol_ax, s0_ax, s1_ax):
        ax.grid(alpha=0.3)
    key_ax.axis("off")
    key_ax.legend(loc="center", fontsize=12, title="optimizer", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
