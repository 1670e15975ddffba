"""Generate ``docs/benchmarks.md`` and its plots from ``benchmarks/results/*.json``.

Run ``python tools/make_benchmarks_page.py`` after a benchmark script has written new results;
``--out DIR`` writes the page and its plots elsewhere (the test suite compares the page with
the committed one). Every section names the machine its result file records.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from gpt_section import gpt_section  # noqa: E402
from scaling_section import scaling_section  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLOTS = "benchmarks_plots"  # folder of the plots, next to the page

MACHINE_FIELDS = ("cpu", "cores", "backend", "device", "jax", "jaxlib", "date")


def load(name):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def machine_line(result) -> str:
    """One line naming the machine a result file records; older files recorded fewer fields
    (``platform``, ``device``, ``jax``), and a field a file lacks reads "not recorded"."""
    m = dict(result.get("machine") or {})
    for key in ("platform", "device", "jax", "backend"):
        if key not in m:
            m[key] = result.get(key, (result.get("meta") or {}).get(key))
    parts = []
    for key in (*MACHINE_FIELDS, "platform"):
        v = m.get(key)
        parts.append(f"{key} {v if v not in (None, '') else 'not recorded'}")
    return "*Machine:* " + "; ".join(parts) + "."


def table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def g(x, fmt=".3g"):
    return "—" if x is None else format(x, fmt)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "font.size": 9})
    return plt


def save(fig, out_dir, name) -> str:
    (out_dir / PLOTS).mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / PLOTS / name, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return f"![{name}]({PLOTS}/{name})"


def msign_section(out_dir) -> list[str]:
    lines = ["## msign", ""]
    lines += [
        "`python benchmarks/msign_bench.py`: the time of 5 Newton–Schulz steps against the same",
        "FLOPs as one plain batched matmul (the roofline fraction), optax's",
        "`orthogonalize_via_newton_schulz` and an SVD; and the accuracy `max|σ − 1|` of each",
        "schedule against its step count on a 256×256 matrix with a log-uniform spectrum.",
        "",
    ]
    for name in ("msign.json", "msign_h100_f32.json", "msign_h100_bf16.json"):
        r = load(name)
        if r is None:
            continue
        lines += [f"**{name}**", "", machine_line(r), ""]
        rows = [
            (
                "×".join(map(str, s["shape"])),
                s.get("dtype", "float32"),
                g(s["ours_ms"]),
                g(s.get("ours_roofline_fraction"), ".2f"),
                g(s.get("optax_ms")),
                g(s.get("optax_roofline_fraction"), ".2f"),
                g(s.get("svd_ms")),
            )
            for s in r["speed"]
        ]
        header = ("shape", "dtype", "ours ms", "ours / roofline", "optax ms", "optax / roofline")
        lines += table((*header, "SVD ms"), rows) + [""]
    r = load("msign.json")
    if r is not None:
        plt = _plt()
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
        for ax, lo in zip(axes, (1e-2, 1e-3), strict=True):
            acc = [a for a in r["accuracy"] if a["sigma_min_ratio"] == lo]
            for sched in sorted({a["schedule"] for a in acc}):
                pts = sorted(
                    (a["steps"], a["max_abs_sigma_minus_1"])
                    for a in acc
                    if a["schedule"] == sched and a["normalization"] == "schatten8"
                )
                ax.semilogy(*zip(*pts, strict=True), marker="o", label=sched)
            ax.set_title(f"σ_min/σ_max = {lo:g} (Schatten-8)")
            ax.set_xlabel("Newton–Schulz steps")
        axes[0].set_ylabel("max |σ − 1|")
        axes[0].legend()
        lines += [save(fig, out_dir, "msign_accuracy.png"), ""]
    return lines


def step_section(out_dir) -> list[str]:
    lines = ["## Optimizer step", ""]
    lines += [
        "`python benchmarks/step_bench.py` (`--d D`, `--wide` for d = 512): one jitted step on a",
        "reference tree of 4 transformer blocks (q, k, v, o, up, down and a scale vector per",
        "block), after 20 warm-up steps. Ratios are medians over rounds of the ratio within a",
        "round, with quartiles; matmul FLOPs are counted from each step's jaxpr.",
        "",
    ]
    plot_rows = {}
    for name in ("step.json", "step_wide.json", "step_h100.json"):
        r = load(name)
        if r is None:
            continue
        lines += [f"**{name}** (d = {r['d']})", "", machine_line(r), ""]
        rows = []
        for row in r["rows"]:
            q = row.get("vs_muon_default_quartiles")
            quart = f" ({q[0]:.2f}–{q[1]:.2f})" if q else ""
            rows.append(
                (
                    row["optimizer"],
                    g(row["ms"]),
                    g(row["vs_muon_default"], ".2f") + quart,
                    g(row["vs_optax_muon"], ".2f"),
                    g(row.get("flops_vs_muon_default"), ".3f"),
                )
            )
        header = ("optimizer", "ms/step", "× `mo.muon`", "× optax muon", "matmul FLOPs × muon")
        lines += table(header, rows) + [""]
        plot_rows[name] = r["rows"]
    if plot_rows:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(9, 3.4))
        names = [row["optimizer"] for row in next(iter(plot_rows.values()))]
        width = 0.8 / len(plot_rows)
        for k, (fname, rows) in enumerate(plot_rows.items()):
            by = {row["optimizer"]: row["vs_muon_default"] for row in rows}
            xs = [i + k * width for i in range(len(names))]
            ax.bar(xs, [by.get(n, 0.0) for n in names], width, label=fname)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_ylabel("time × mo.muon")
        ax.axhline(1.0, color="k", lw=0.6)
        ax.legend()
        lines += [save(fig, out_dir, "step_ratios.png"), ""]
    r = load("step_profile_cpu.json")
    if r is not None:
        lines += [
            "**Operations per step** (`python benchmarks/step_profile.py`: the ops a step",
            "executes, from a `jax.profiler` trace; unlike times, they do not move with load)",
            "",
            machine_line(r),
            "",
        ]
        rows = [(k, int(v["ops"]), g(v["wall_ms"])) for k, v in r["results"].items()]
        lines += table(("optimizer", "ops", "wall ms"), rows) + [""]
    return lines


def ops_section(out_dir) -> list[str]:
    r = load("step_ops.json")
    if r is None:
        return []
    lines = [
        "**Kernels per step on the accelerator path** (`python benchmarks/step_ops.py`: the",
        "operations a GPU launches separately, counted from the step's StableHLO lowered",
        f"for {r['lowered_for']} under `{r['path']}`: dot_general, reduce, custom calls and",
        "linear-algebra ops, loop bodies times their trip counts; elementwise operations fuse",
        "and are not counted. The same on any machine.)",
        "",
    ]
    rows = [
        (
            x["optimizer"],
            x["d"],
            x["ops"],
            g(x["ratio_to_muon"], ".2f"),
            x["by_kind"]["dot_general"],
            x["by_kind"]["reduce"],
            x["by_kind"]["custom_call"] + x["by_kind"]["linalg"],
            x["by_kind"]["while_trips"],
        )
        for x in r["rows"]
    ]
    header = ("optimizer", "d", "ops", "× `mo.muon`", "dot", "reduce", "solver calls", "loop trips")
    return lines + table(header, rows) + [""]


def solver_section(out_dir) -> list[str]:
    r = load("solvers.json")
    if r is None:
        return []
    lines = ["## Multiplier solvers", ""]
    lines += [
        "`python benchmarks/solver_bench.py`: Stiefel's solvers to a tangent violation of",
        f"{r['tol']:g} ({r['dtype']}); iterations and time in units of one msign.",
        "",
        machine_line(r),
        "",
    ]
    rows = []
    for shape, by in r["shapes"].items():
        for solver, v in by.items():
            rows.append((shape, solver, v["iters"], g(v["violation"], ".1e"), g(v["msign_eq"])))
    lines += table(("shape", "solver", "iterations", "violation", "time in msigns"), rows)
    lines += [""]
    h = r.get("heuristic_64x32") or []
    if h:
        lines += [
            '"Project G, then msign", made feasible, against the exact optimum (64×32):',
            "",
        ]
        rows = [
            (s, g(x["exact"], ".1f"), g(x["heuristic_feasible"], ".1f")) for s, x in enumerate(h)
        ]
        lines += table(("seed", "exact ⟨G, Φ⟩", "heuristic ⟨G, Φ⟩"), rows) + [""]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    shapes = list(r["shapes"])
    solvers = sorted({s for by in r["shapes"].values() for s in by})
    width = 0.8 / len(solvers)
    for k, solver in enumerate(solvers):
        xs = [i + k * width for i in range(len(shapes))]
        ax.bar(
            xs,
            [r["shapes"][s].get(solver, {}).get("iters", 0) for s in shapes],
            width,
            label=solver,
        )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
    ax.set_xticklabels(shapes)
    ax.set_yscale("log")
    ax.set_ylabel("iterations")
    ax.legend()
    lines += [save(fig, out_dir, "solver_iterations.png"), ""]
    return lines


def certified_section(out_dir) -> list[str]:
    r = load("solvers_certified.json")
    if r is None:
        return []
    lines = ["## The certified exact solve at layer size", ""]
    lines += [
        "`python benchmarks/solver_bench.py --certified [--big] [--only NAME]`:",
        '`Manifold.solve(G, W, "exact")` to a relative duality gap of 2e-3 (float32) or 1e-6',
        "(float64); the gap as reported and",
        "recomputed in float64 from the returned direction and multiplier, the Newton steps",
        "(dense below `SolverConfig.smoothing_max_size` multiplier entries, matrix-free",
        "Newton–CG above), and the time in units of one msign of the same matrix",
        "(`ns_steps` Newton–Schulz steps, HIGHEST precision, the working dtype).",
        "",
        machine_line(r),
        "",
    ]
    rows = [
        (
            c["manifold"],
            c["shape"],
            c["dtype"],
            c["rank"] or "full",
            g(c["gap"], ".1e"),
            g(c["gap_float64"], ".1e"),
            c["newton_steps"],
            g(c["msign_eq"], ".0f"),
        )
        for c in r["cases"]
    ]
    header = ("manifold", "shape", "dtype", "rank of G", "gap", "float64 gap", "Newton", "msigns")
    return lines + table(header, rows) + [""]


def spectral_section(out_dir) -> list[str]:
    lines = []
    for name, path in (
        ("spectral_accuracy.json", "this machine's"),
        ("spectral_accuracy_gpu_path.json", "accelerator (`--path gpu`)"),
    ):
        r = load(name)
        if r is None:
            continue
        if not lines:
            lines = ["## Spectral sphere retraction", ""]
            lines += [
                "`python benchmarks/spectral_accuracy.py`: the worst and median "
                "`|‖W‖₂ − r|/r` after",
                "each of the digits demo's steps, against the warm block iteration's filter "
                "and degree.",
                "",
            ]
        lines += [f"Path: {path}.", "", machine_line(r), ""]
        rows = [
            (
                x["filter"],
                x["degree"],
                x["block"],
                g(x["worst_violation"], ".1e"),
                g(x["median_violation"], ".1e"),
                g(x.get("step_vs_muon"), ".2f"),
            )
            for x in r["rows"]
        ]
        header = ("filter", "degree", "block", "worst", "median", "step × muon")
        lines += table(header, rows) + [""]
    return lines


def sharding_section(out_dir) -> list[str]:
    r = load("sharding.json")
    if r is None:
        return []
    if isinstance(r, list):
        r = {"rows": r}
    lines = ["## Many devices", ""]
    lines += [
        "`python benchmarks/sharded_step.py --json FILE` on 8 simulated CPU devices: the bytes",
        "each device receives per step over the bytes of all matrix parameters, and the",
        "largest difference from one device.",
        "",
        machine_line(r),
        "",
    ]
    rows = [
        (
            x["optimizer"],
            x["mesh"],
            x["strategy"],
            g(x["collective_ratio"], ".2f"),
            g(x["max_rel_diff"], ".1e"),
        )
        for x in r["rows"]
    ]
    header = ("optimizer", "mesh", "strategy", "bytes / matrix bytes", "max rel. diff")
    lines += table(header, rows) + [""]
    p = load("sharded_placement.json")
    if p is not None:
        lines += [
            "**Placement** (`python benchmarks/sharded_step.py --placement --quick --json FILE`,",
            "gather strategy): Auto and Explicit mesh axes, shardings given to `jit` (from",
            "`state_shardings`) or inferred (`jit(tx.init)` and the step under `jax.set_mesh`,",
            "none given); optimizer state bytes held by one device and collective bytes per",
            "step.",
            "",
            machine_line(p),
            "",
        ]
        rows = [
            (
                x["optimizer"],
                x["mesh"],
                x["axis_types"],
                x["placement"],
                x["state_bytes_per_device"]["after_steps"] if "error" not in x else "error",
                g(x["collective_bytes"]["total"], ".0f") if "error" not in x else "",
                g(x["max_rel_diff"], ".1e") if "error" not in x else "",
            )
            for x in p["rows"]
        ]
        header = (
            "optimizer",
            "mesh",
            "axes",
            "shardings",
            "state B/device",
            "coll. B/step",
            "rel. diff",
        )
        lines += table(header, rows) + [""]
    return lines


LM_NAMES = {
    "muon_qk_clip": "muon + qk_clip",
}


def lm_machine_lines(r) -> list[str]:
    """The file's machine line, for the runs that record none of their own, then one line per
    machine the other runs record, naming their optimizers."""
    groups: dict[str, list[str]] = {}
    for run in r["runs"]:
        line = machine_line(run if "machine" in run else r)
        names = groups.setdefault(line, [])
        if run["optimizer"] not in names:
            names.append(run["optimizer"])
    if len(groups) == 1:
        return [next(iter(groups)), ""]
    out = []
    for line, names in groups.items():
        out += [f"Runs of {', '.join(LM_NAMES.get(n, n) for n in names)}: {line}", ""]
    return out


def lm_logit_section(r, out_dir) -> list[str]:
    """The largest attention logit over training of Muon with and without QK-clip, at each
    learning rate: a table of the counts over the threshold and a figure."""
    runs = [x for x in r["runs"] if x["optimizer"] in ("muon", "muon_qk_clip") and "max_logit" in x]
    if not any(x["optimizer"] == "muon_qk_clip" for x in runs):
        return []
    tau = next(x["threshold"] for x in runs if x["optimizer"] == "muon_qk_clip")
    lines = [
        "### Attention logits and QK-clip",
        "",
        "Every block sows its heads' largest logit `q·k/√d_h` on the training batch",
        f"(`mo.max_attention_logits`); `muon + qk_clip` passes them to `mo.qk_clip({tau:g})`,",
        "last in the chain. At each evaluation the runs record the largest logit (over layers,",
        "heads and the training batches since the previous evaluation, measured before each",
        f"step's update); *over τ* counts the (step, layer, head) logits above τ = {tau:g} (for",
        "`muon`, those QK-clip would have clipped) and the steps with at least one.",
        "",
    ]
    rows = []
    for x in runs:
        o = x["over_threshold"]
        logits = [v for _, v in x["max_logit"]]
        rows.append(
            (
                LM_NAMES.get(x["optimizer"], x["optimizer"]),
                g(x["lr"]),
                g(x["final_val"], ".4f"),
                g(max(logits), ".1f"),
                g(logits[-1], ".1f"),
                f"{o['logits']} / {o['of_logits']} ({o['logits'] / o['of_logits']:.1%})",
                f"{o['steps']} / {o['of_steps']}",
            )
        )
    header = (
        "optimizer",
        "lr",
        "final val loss",
        "max logit",
        "max logit, last evaluation",
        "logits over τ",
        "steps over τ",
    )
    lines += table(header, rows) + [""]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    lrs = sorted({x["lr"] for x in runs})
    styles = dict(zip(lrs, ("-", "--", ":", "-."), strict=False))
    colors = {"muon": "C0", "muon_qk_clip": "C1"}
    for x in runs:
        steps, vals = zip(*x["max_logit"], strict=True)
        name = LM_NAMES.get(x["optimizer"], x["optimizer"])
        ax.plot(
            steps,
            vals,
            ls=styles.get(x["lr"], "-"),
            color=colors[x["optimizer"]],
            label=f"{name} ({x['lr']:g})",
        )
    ax.axhline(tau, color="gray", ls=":", lw=1, label=f"τ = {tau:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("max attention logit")
    ax.legend(fontsize=7)
    lines += [save(fig, out_dir, "train_lm_max_logit.png"), ""]
    return lines


def lm_section(out_dir) -> list[str]:
    r = load("train_lm.json")
    if r is None:
        return []
    c = r["config"]
    lines = ["## Character-level language model", ""]
    lines += [
        "`python benchmarks/train_lm.py`: a "
        f"{r['params'] / 1e6:.2f}M-parameter transformer ({c['layers']} layers, d = {c['d']}),",
        f"{c['steps']} steps of {c['batch']}×{c['seq']} characters of Python source; each",
        "optimizer at its best learning rate of three (AdaMuon's around AdamW's, NorMuon's and",
        "QK-clip's Muon's); a best learning rate at the end of its sweep may not be the",
        "optimizer's best. Steps are counted at the evaluations, every",
        f"{c['eval_every']} steps. `--only NAME ...` runs some optimizers and merges them into",
        "the results.",
        "",
    ]
    lines += lm_machine_lines(r)
    rows = []
    for name, s in r["summary"].items():
        steps = s["steps_to_target"]
        swept = sorted({x["lr"] for x in r["runs"] if x["optimizer"] == name})
        rows.append(
            (
                LM_NAMES.get(name, name),
                ", ".join(f"**{x:g}**" if x == s["lr"] else f"{x:g}" for x in swept),
                g(s["final_val"], ".4f"),
                steps if steps is not None else "not reached",
                g(s.get("ratio"), ".2f"),
            )
        )
    header = ("optimizer", "lr (best in bold)", "final val loss", "steps to AdamW's final", "ratio")
    lines += table(header, rows) + [""]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for run in r["runs"]:
        best = r["summary"].get(run["optimizer"], {}).get("lr")
        if run["lr"] != best:
            continue
        steps, _, val = zip(*run["curve"], strict=True)
        name = LM_NAMES.get(run["optimizer"], run["optimizer"])
        ax.plot(steps, val, label=f"{name} ({run['lr']:g})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=7)
    lines += [save(fig, out_dir, "train_lm.png"), ""]
    lines += lm_logit_section(r, out_dir)
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder of the page and plots")
    a = ap.parse_args(argv)
    out_dir = pathlib.Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python tools/make_benchmarks_page.py` from `benchmarks/results/*.json`;",
        "each section names the machine its result file records and the command that re-runs",
        "it. Times are medians over interleaved rounds; ratios are taken within a round, which",
        "cancels most of a shared machine's drift.",
        "",
    ]
    for section in (
        msign_section,
        step_section,
        ops_section,
        solver_section,
        certified_section,
        spectral_section,
        sharding_section,
        lambda out_dir: scaling_section(load, machine_line, table, g, _plt(), save, out_dir),
        lm_section,
        lambda out_dir: gpt_section(load, machine_line, table, g, save, out_dir),
    ):
        lines += section(out_dir)
    (out_dir / "benchmarks.md").write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {out_dir / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
