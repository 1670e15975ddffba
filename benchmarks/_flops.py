"""Matmul FLOPs of a jitted step, counted from its jaxpr (the floor a step's time ratio sits on).

``matmul_flops(fn, *args)`` traces ``fn`` and adds ``2·(output size)·(contracted size)`` for
every ``dot_general`` on the path a steady-state step takes: ``scan`` bodies count ``length``
times, a ``cond``/``switch`` counts its cheapest branch (the manifold steps' conditionals are
fallbacks that a step on the manifold does not take, e.g. the Stiefel retraction's), and a
``while`` body counts once (there is none outside such fallbacks in the optimizers here;
``MatmulCount.while_loops`` says how many were met on the counted path). Elementwise work and
LAPACK calls (eigh, QR, SVD) are not counted: elementwise work, 0.09–0.16 G element
operations per step on step_bench's d = 256 tree (muon to Stiefel), is under 1% of its matmul
FLOPs, though not of its time.

Unlike XLA's ``cost_analysis()``, which adds every branch of every conditional, this is the
work the step does; dividing two such counts gives the time ratio the two steps would have
if every product ran at the same rate.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
from jax.extend import core as jcore


class MatmulCount(NamedTuple):
    flops: int  # matmul FLOPs on the counted path
    while_loops: int  # while loops met on that path (each counted as one iteration)


def _dot_flops(eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    contracted = math.prod(lhs[i] for i in lhs_contract)
    return 2 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _count(jaxpr) -> MatmulCount:
    flops, whiles = 0, 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            flops += _dot_flops(eqn)
        elif name == "cond":
            branch = min((_count(b.jaxpr) for b in eqn.params["branches"]), key=lambda c: c.flops)
            flops, whiles = flops + branch.flops, whiles + branch.while_loops
        elif name == "while":
            body = _count(eqn.params["body_jaxpr"].jaxpr)
            flops, whiles = flops + body.flops, whiles + 1 + body.while_loops
        elif name == "scan":
            body = _count(eqn.params["jaxpr"].jaxpr)
            flops, whiles = flops + eqn.params["length"] * body.flops, whiles + body.while_loops
        else:  # pjit, custom_jvp/vjp, remat, shard_map, ...: count the inner jaxprs once
            for value in eqn.params.values():
                inner = value.jaxpr if isinstance(value, jcore.ClosedJaxpr) else value
                if isinstance(inner, jcore.Jaxpr):
                    sub = _count(inner)
                    flops, whiles = flops + sub.flops, whiles + sub.while_loops
    return MatmulCount(flops, whiles)


def matmul_flops(fn, *args) -> MatmulCount:
    """The matmul FLOPs of ``fn(*args)`` on its steady-state path (see the module docstring)."""
    return _count(jax.make_jaxpr(fn)(*args).jaxpr)
