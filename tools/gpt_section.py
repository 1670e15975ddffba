"""The benchmarks page's sections on the GPT benchmark, from ``benchmarks/results/gpt.json``
and ``gpt_width.json`` (``benchmarks/gpt.py``)."""

from __future__ import annotations

import numpy as np


def _cfg(c) -> str:
    return (
        f"d = {c['d']}, {c['layers']} layers, {c['heads']} heads, {c['steps']} steps of "
        f"{c['batch']}×{c['seq']} bytes"
    )


def gpt_section(load, machine_line, table, g, plt, save, out_dir) -> list[str]:
    """Markdown lines (and plots in ``out_dir``) for the GPT results; ``[]`` without them.
    The helpers are the page generator's own."""
    lines = []
    r = load("gpt.json")
    if r is not None:
        c = r["config"]
        lines += ["## GPT on Python source: optimizers", ""]
        lines += [
            f"`python benchmarks/gpt.py --part optimizers` with {_cfg(c)} "
            f"({r['params'] / 1e6:.2f}M parameters): an NNX decoder (RoPE, fused QKV, RMSNorm,",
            "SwiGLU, `nnx.vmap`-stacked blocks run by `nnx.scan`) on the standard library's",
            "source bytes, train and validation split by file. Each optimizer's best run of its",
            "4-point learning-rate grid: final validation loss, the steps it needs to reach",
            "AdamW's final loss and their ratio to AdamW's, its median step time over AdamW's",
            "(same process, one run after another), and the validation loss at equal wall-clock",
            f"({r['equal_time_seconds']:.0f} training seconds, the fastest best run's).",
            "",
            machine_line(r),
            "",
        ]
        body = [
            (
                n,
                f"{s['lr']:g}",
                f"{s['final_val']:.4f}",
                s["steps_to_adamw"] or "not reached",
                g(s["ratio"], ".2f"),
                g(s["step_time_ratio"], ".2f"),
                g(s["val_at_equal_time"], ".4f"),
            )
            for n, s in r["summary"].items()
        ]
        head = ["optimizer", "best lr", "final val", "steps to AdamW's", "ratio"]
        lines += table(head + ["step time ÷ AdamW", "val at equal time"], body) + [""]
        best = {}
        for run in r["runs"]:
            n = run["optimizer"]
            if n not in best or run["final_val"] < best[n]["final_val"]:
                best[n] = run
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for n, run in best.items():
            cv = np.asarray(run["curve"])
            axes[0].plot(cv[:, 0], cv[:, 2], label=n)
            axes[1].plot(cv[:, 3], cv[:, 2], label=n)
        for ax, xl in zip(axes, ("step", "training seconds"), strict=True):
            ax.axhline(r["target"], color="gray", ls=":", lw=1)
            ax.set(xlabel=xl, ylabel="validation loss (nats/byte)")
        axes[0].legend(fontsize=7)
        lines += [save(fig, out_dir, "gpt.png"), ""]
    w = load("gpt_width.json")
    if w is not None:
        c, widths = w["config"], w["widths"]
        lines += ["## GPT: learning rate across width", ""]
        lines += [
            f"`python benchmarks/gpt.py --part width`: widths {', '.join(map(str, widths))}",
            f"(heads = width / 32), {c['layers']} layers, {c['steps']} steps of",
            f"{c['batch']}×{c['seq']} bytes, a ×2 grid of learning rates per optimizer. The best",
            "learning rate per width and how many grid points it moves from the smallest width",
            "to the largest.",
            "",
            machine_line(w),
            "",
        ]
        body = []
        for n, s in w["summary"].items():
            per = s["per_width"]
            body.append(
                (
                    n,
                    *(g(per[str(d)]["best_lr"], "g") for d in widths),
                    *(g(per[str(d)]["final_val"], ".4f") for d in widths),
                    g(s["grid_shift"], "d"),
                )
            )
        head = ["optimizer", *(f"best lr d={d}" for d in widths)]
        head += [*(f"loss d={d}" for d in widths), "grid points moved"]
        lines += table(head, body) + [""]
        names = list(w["summary"])
        fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4))
        for ax, n in zip(axes, names, strict=True):
            for d in widths:
                rs = sorted(
                    (x for x in w["runs"] if x["optimizer"] == n and x["d"] == d),
                    key=lambda x: x["lr"],
                )
                ys = [x["final_val"] if np.isfinite(x["final_val"]) else np.nan for x in rs]
                ax.plot([x["lr"] for x in rs], ys, "o-", label=f"d = {d}")
            ax.set(xscale="log", xlabel="learning rate", title=n)
        axes[0].set_ylabel("final validation loss")
        axes[0].legend()
        lines += [save(fig, out_dir, "gpt_width.png"), ""]
    return lines
