"""Operations an accelerator launches separately in one optimizer step, counted from the step's
lowered StableHLO (no GPU needed: the same code gives the same count on any machine).

Each optimizer of ``step_bench.py`` is traced on the accelerator path
(``mo.lowering_for("gpu")``: short fixed loops unrolled, same-shape matrices batched, as on a
GPU) and lowered for the GPU platform when this jaxlib can (else for the host; the counts
differ only in which custom call a factorization names). Counted, as one kernel each:
``dot_general``, ``reduce``, ``custom_call`` (Cholesky, QR, eigh, SVD, …) and the linear
algebra ops StableHLO has of its own (``cholesky``, ``triangular_solve``), with ``while``
bodies counted × their trip counts (read from the loop's condition; a loop whose count is not
a constant is counted once and listed under ``dynamic_while``), ``case`` at its cheapest
branch, and ``func.call`` followed into the callee. Elementwise operations are not counted
(XLA fuses them into their neighbours). The by-kind table also lists ``while_trips``: loop
iterations, each a predicate read back to the host on a GPU (not added to ``ops``).

Run: ``python benchmarks/step_ops.py [--d 256] [--d 512] [--json OUT]``; writes
``benchmarks/results/step_ops.json`` by default.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
from collections import Counter

import jax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _machine import machine  # noqa: E402
from step_bench import optimizers, reference_tree  # noqa: E402

import manifold_optax as mo  # noqa: E402

COUNTED = {
    "stablehlo.dot_general": "dot_general",
    "stablehlo.dot": "dot_general",
    "stablehlo.reduce": "reduce",
    "stablehlo.custom_call": "custom_call",
    "stablehlo.cholesky": "linalg",
    "stablehlo.triangular_solve": "linalg",
}
#: Optimizers of step_bench.py counted here (the CPU-only A/B rows are left out).
ROWS = (
    "optax_muon",
    "muon (default)",
    "manifold_muon sphere",
    "manifold_muon spectral_sphere",
    "manifold_muon stiefel",
    "manifold_muon oblique",
)
BASE = "muon (default)"
_INT = re.compile(r"dense<(-?[0-9]+)>")


def _const_int(value):
    """The integer of a scalar ``stablehlo.constant`` that defines ``value``, else None."""
    owner = getattr(value, "owner", None)
    op = getattr(owner, "operation", owner)
    if op is None or getattr(op, "name", None) != "stablehlo.constant":
        return None
    m = _INT.search(str(op.attributes["value"]))
    return int(m.group(1)) if m else None


def _trip_count(while_op):
    """Iterations of a ``stablehlo.while`` whose condition is ``i < N`` (or ``N > i``) on a
    carried counter that starts at a constant, else None."""
    cond = while_op.regions[0].blocks[0]
    for op in cond.operations:
        op = op.operation
        if op.name != "stablehlo.compare":
            continue
        direction = str(op.attributes["comparison_direction"])
        lhs, rhs = op.operands
        if "LT" in direction:
            counter, bound = lhs, rhs
        elif "GT" in direction:
            counter, bound = rhs, lhs
        else:
            continue
        n = _const_int(bound)
        if n is None or not hasattr(counter, "arg_number"):
            continue
        start = _const_int(while_op.operands[counter.arg_number])
        if start is not None:
            return max(0, n - start)
    return None


_FRAME = re.compile(r'"[^"]*manifold_optax/([^"]+)":([0-9]+)')


def where(op) -> str:
    """The first two frames of the library's code that made ``op``."""
    frames = _FRAME.findall(str(op.location))
    return " < ".join(f"{f}:{n}" for f, n in frames[:2]) or "?"


class Counter_:
    """Counts over a module's functions, following calls (``by_place``: keys are
    ``kind @ source`` instead of kinds)."""

    def __init__(self, module, by_place: bool = False):
        self.by_place = by_place
        self.funcs = {}
        for op in module.body.operations:
            op = op.operation
            if op.name == "func.func":
                self.funcs[str(op.attributes["sym_name"]).strip('"')] = op
        self.memo = {}

    def func(self, name):
        if name not in self.memo:
            self.memo[name] = Counter()  # recursion guard
            self.memo[name] = self.region(self.funcs[name].regions[0])
        return self.memo[name]

    def region(self, region):
        total = Counter()
        for block in region.blocks:
            for op in block.operations:
                total += self.op(op.operation)
        return total

    def op(self, op):
        name = op.name
        out = Counter()
        if name in COUNTED:
            out[f"{COUNTED[name]} @ {where(op)}" if self.by_place else COUNTED[name]] += 1
        if name == "func.call":
            out += self.func(str(op.attributes["callee"]).lstrip("@").strip('"'))
        elif name == "stablehlo.while":
            trips = _trip_count(op)
            body = self.region(op.regions[1]) + self.region(op.regions[0])
            if trips is None:
                out["dynamic_while"] += 1
                trips = 1
            out["while_trips"] += trips
            for k, v in body.items():
                out[k] += v * (trips if k not in ("dynamic_while",) else 1)
        elif name == "stablehlo.case":
            branches = [self.region(r) for r in op.regions]
            out += min(branches, key=_size)
        else:
            for r in op.regions:
                out += self.region(r)
        return out


KINDS = ("dot_general", "reduce", "custom_call", "linalg")


def _size(c: Counter) -> int:
    return sum(v for k, v in c.items() if k.split(" @ ")[0] in KINDS)


def lower_step(tx, params, grads, platform):
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return jax.tree.map(lambda a, b: a + b, p, u), s

    state = jax.eval_shape(tx.init, params)
    traced = jax.jit(step).trace(params, state, grads)
    return traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()


def count_ops(lowered, by_place: bool = False) -> Counter:
    module = lowered.compiler_ir("stablehlo")
    return Counter_(module, by_place).func("main")


def platform_for_lowering(params, tx) -> str | None:
    try:
        lower_step(tx, params, params, "cuda")
        return "cuda"
    except Exception:  # noqa: BLE001 (no GPU lowering in this jaxlib: lower for the host)
        return None


def run(d: int, names=ROWS):
    """Rows for the optimizers ``names`` (``BASE`` among them) at width ``d``, and the
    platform lowered for."""
    tree = reference_tree(d)
    grads = jax.tree.map(lambda x: 0.01 * x, tree)
    rows = []
    platform = None
    with mo.lowering_for("gpu"):
        txs = optimizers()
        platform = platform_for_lowering(tree, txs[BASE])
        counts = {}
        for name in names:
            # (Only shapes are traced: the parameters need not be on their manifolds.)
            counts[name] = count_ops(lower_step(txs[name], tree, grads, platform))
    base = sum(counts[BASE][k] for k in KINDS)
    for name in names:
        c = counts[name]
        ops = sum(c[k] for k in KINDS)
        rows.append(
            {
                "optimizer": name,
                "d": d,
                "ops": ops,
                "by_kind": {k: c[k] for k in (*KINDS, "while_trips", "dynamic_while")},
                "ratio_to_muon": ops / base,
            }
        )
    return rows, platform or jax.default_backend()


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--d", type=int, action="append", help="model width (repeatable)")
    ap.add_argument("--where", default=None, help="list one optimizer's operations by source")
    ap.add_argument(
        "--json", default=str(pathlib.Path(__file__).parent / "results" / "step_ops.json")
    )
    a = ap.parse_args()
    ds = a.d or [256, 512]
    if a.where:
        tree = reference_tree(ds[0])
        with mo.lowering_for("gpu"):
            tx = optimizers()[a.where]
            platform = platform_for_lowering(tree, tx)
            c = count_ops(lower_step(tx, tree, tree, platform), by_place=True)
        for k, v in sorted(c.items(), key=lambda kv: -kv[1]):
            print(f"{v:4d}  {k}")
        return
    rows, lowered_for = [], None
    for d in ds:
        r, lowered_for = run(d)
        rows += r
    print(f"\n### Kernels per step on the accelerator path (StableHLO lowered for {lowered_for})\n")
    print(
        "| optimizer | d | ops | × muon | dot_general | reduce | custom_call | linalg | while trips | dynamic while |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        k = r["by_kind"]
        print(
            f"| {r['optimizer']} | {r['d']} | {r['ops']} | {r['ratio_to_muon']:.2f} | "
            f"{k['dot_general']} | {k['reduce']} | {k['custom_call']} | {k['linalg']} | "
            f"{k['while_trips']} | {k['dynamic_while']} |"
        )
    out = {
        "machine": machine(),
        "lowered_for": lowered_for,
        "path": "mo.lowering_for('gpu')",
        "rows": rows,
    }
    pathlib.Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
