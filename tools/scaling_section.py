"""The benchmarks page's section on per-device cost against the device count, from
``benchmarks/results/scaling.json`` (``benchmarks/scaling.py``)."""

from __future__ import annotations


def _ms(t) -> str:
    if t.get("q1") is None:
        return f"{t['median']:.0f}"
    return f"{t['median']:.0f} [{t['q1']:.0f}, {t['q3']:.0f}]"


def scaling_section(load, machine_line, table, g, plt, save, out_dir) -> list[str]:
    """Markdown lines (and a plot in ``out_dir``) for ``scaling.json``; ``[]`` without it.
    The helpers are the page generator's own."""
    r = load("scaling.json")
    if r is None:
        return []
    rows = r["rows"]
    lines = ["## Cost per device against the device count", ""]
    lines += [
        f"`python benchmarks/scaling.py --width {r['width']} --json FILE`: {r['layers']} layers",
        f"× (q, k, v, o: {r['width']}²; up and down: {r['width']}×{4 * r['width']}), sharded",
        '`P("fsdp", None)` over N simulated CPU devices; for each optimizer and',
        "`MsignSharding` strategy, the compiled step's FLOPs per device (XLA's cost analysis,",
        "and its ratio to one device's ÷ N), the bytes a device receives over the matrices'",
        "bytes, the step time (simulated devices share the host's cores: the time shows the",
        "work, not a speed-up), and the largest relative difference from one device.",
        "",
        machine_line(r),
        "",
    ]
    if r.get("note"):
        lines += [f"*{r['note']}.*", ""]
    body = [
        (
            x["optimizer"],
            x["strategy"],
            x["devices"],
            g(x["gflop_per_device"], ".3f"),
            g(x.get("flop_ratio_vs_ideal"), ".2f"),
            g(x["collective_ratio"], ".2f"),
            _ms(x["step_ms"]),
            g(x.get("max_rel_diff_vs_1"), ".1e"),
        )
        for x in rows
    ]
    header = (
        "optimizer",
        "strategy",
        "N",
        "GFLOP / device",
        "÷ (1-device ÷ N)",
        "bytes / matrix bytes",
        "step ms (median [q1, q3])",
        "rel. diff vs N = 1",
    )
    lines += table(header, body) + [""]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    names = sorted({x["optimizer"] for x in rows}, key=[x["optimizer"] for x in rows].index)
    for ax, strategy in zip(axes, ("gather", "owner"), strict=True):
        for name in names:
            pts = sorted(
                (x["devices"], x["gflop_per_device"])
                for x in rows
                if x["optimizer"] == name and x["strategy"] == strategy
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("devices N")
        ax.set_title(f'"{strategy}"')
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GFLOP per device per step")
    axes[1].legend(fontsize=7)
    lines += [save(fig, out_dir, "scaling.png"), ""]
    return lines
