"""Tables and figures of ``benchmarks/gpt.py``'s results (the benchmarks page draws the same
figures through ``curves_figure`` and ``width_figure``)."""

from __future__ import annotations

import numpy as np


def table(summary, target, equal_time):
    rows = [
        "| optimizer | best lr | final val loss | steps to AdamW's final | ratio | step time ÷ "
        f"AdamW's | val loss at {equal_time:.0f} s |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, s in summary.items():
        ratio = f"{s['ratio']:.2f}" if s["ratio"] else "—"
        at = s["val_at_equal_time"]
        rows.append(
            f"| {n} | {s['lr']:g} | {s['final_val']:.4f} | {s['steps_to_adamw'] or 'not reached'} "
            f"| {ratio} | {s['step_time_ratio']:.2f} | {f'{at:.4f}' if at else '—'} |"
        )
    return "\n".join(rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_figure(best, target):
    """Validation loss against steps and against training seconds, one curve per optimizer."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 4), sharey=True)
    for n, r in best.items():
        c = np.asarray(r["curve"])
        for ax, x in zip(axes, (c[:, 0], c[:, 3]), strict=True):
            ax.plot(x, c[:, 2], label=f"{n} (lr {r['lr']:g})")
    for ax, xl in zip(axes, ("step", "training seconds"), strict=True):
        ax.axhline(target, color="gray", ls=":", lw=1)
        ax.set(xlabel=xl, ylabel="validation loss (nats/byte)")
    axes[0].legend(fontsize=7)
    fig.suptitle("GPT on Python source (bytes)")
    fig.tight_layout()
    return fig


def width_figure(runs, widths, grids):
    """Final validation loss against learning rate, one curve per width, one panel per
    optimizer (the names in ``grids``)."""
    fig, axes = _pyplot().subplots(1, len(grids), figsize=(3.6 * len(grids), 3.4))
    axes = np.atleast_1d(axes)
    for ax, n in zip(axes, grids, strict=True):
        for d in widths:
            rs = sorted(
                (r for r in runs if r["optimizer"] == n and r["d"] == d), key=lambda r: r["lr"]
            )
            ys = [r["final_val"] if np.isfinite(r["final_val"]) else np.nan for r in rs]
            ax.plot([r["lr"] for r in rs], ys, "o-", label=f"d = {d}")
        ax.set(xscale="log", xlabel="learning rate", title=n)
    axes[0].set_ylabel("final validation loss")
    axes[0].legend()
    fig.tight_layout()
    return fig


def save(fig, path):
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
