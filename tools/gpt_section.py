"""The benchmarks page's sections on the GPT benchmark, from ``benchmarks/results/gpt.json``
and ``gpt_width.json`` (``benchmarks/gpt.py``)."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
from _curves import best_runs  # noqa: E402
from gpt_report import curves_figure, width_figure  # noqa: E402


def _cfg(c) -> str:
    return (
        f"d = {c['d']}, {c['layers']} layers, {c['heads']} heads, {c['steps']} steps of "
        f"{c['batch']}×{c['seq']} bytes"
    )


def gpt_section(load, machine_line, table, g, save, out_dir) -> list[str]:
    """Markdown lines (and plots in ``out_dir``) for the GPT results; ``[]`` without them.
    The table, number and save helpers are the page generator's; the figures are
    ``benchmarks/gpt_report.py``'s."""
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
        fig = curves_figure(best_runs(r["runs"]), r["target"])
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
        fig = width_figure(w["runs"], widths, list(w["summary"]))
        lines += [save(fig, out_dir, "gpt_width.png"), ""]
    return lines
