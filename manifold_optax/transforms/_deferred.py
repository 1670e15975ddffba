"""The retraction deferred to the end of a step, so that the retractions of all leaves run
together: Stiefel's polish step under two conditionals for the whole step, and the spectral
sphere's top-pair refinement as one batch per short-side Gram shape (layers of different
shapes share it: a transformer's ``d×d``, ``d×4d`` and ``4d×d`` matrices all have ``d×d``
Grams).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from manifold_optax.linalg.warm_block import refine_warm_block
from manifold_optax.manifolds import BlockPlan, Manifold, PolishPlan
from manifold_optax.sharding import owns, run_placed
from manifold_optax.transforms._leaves import run_grouped, update_to

__all__ = ["Deferred", "finish_deferred", "finish_now"]


class Deferred(NamedTuple):
    """A leaf waiting for its retraction (:func:`finish_deferred`)."""

    index: int  # the leaf's index in the update list
    manifold: Manifold
    V: jax.Array  # [b, rows, cols] float32: the point before the retraction
    plan: PolishPlan | BlockPlan
    param: jax.Array  # the parameter W
    dtype: Any  # the update's dtype
    unview: Any = None  # the matrix view back to the parameter's layout


def _finish_polish(pending: list[Deferred], out: list, sharding, group: bool):
    """Write the updates ``R(V) − W`` of leaves deferred with a :class:`PolishPlan`: one
    polish step each, ``V·P`` with ``P`` the manifold's cheap factor if every matrix of the
    step certifies it, else its standard one; only if the standard one too falls short for
    some matrix, the manifold's fallback retraction for just those matrices.

    Two conditionals for the whole step, not a switch per matrix (on GPU a conditional reads
    its predicate back to the host). The first holds only the m×m factors, so the n×m×m
    products run outside any conditional. Same-shape leaves polish as one batch when
    ``group`` (:func:`run_grouped`)."""
    if not pending:
        return
    # Both predicates from one reduction over every matrix's flags (one kernel, not one per
    # leaf).
    flags = jnp.stack(
        [
            jnp.concatenate([jnp.ravel(p.plan.cheap_ok) for p in pending]),
            jnp.concatenate([jnp.ravel(p.plan.ok) for p in pending]),
        ]
    )
    cheap_all, ok_all = jnp.all(flags, axis=1)
    factors = jax.lax.cond(
        cheap_all,
        lambda plans: [
            p.manifold.polish_factor(q, True) for p, q in zip(pending, plans, strict=True)
        ],
        lambda plans: [
            p.manifold.polish_factor(q, False) for p, q in zip(pending, plans, strict=True)
        ],
        [p.plan for p in pending],
    )
    items = [((p.manifold, p.V.shape[1:]), (p.V, P)) for p, P in zip(pending, factors, strict=True)]
    polish = lambda key, V, P: (run_placed(key[0].apply_polish, sharding, V, P),)  # noqa: E731
    xs = [X for (X,) in run_grouped(polish, items, group, owns(sharding))]

    def fallback(arrays):
        news = []
        for p, (X, V) in zip(pending, arrays, strict=True):
            R = run_placed(p.manifold.fallback_retraction, sharding, V)
            news.append(jnp.where(p.plan.ok.reshape(p.plan.ok.shape + (1, 1)), X, R))
        return news

    arrays = [(X, p.V) for X, p in zip(xs, pending, strict=True)]
    # (The fallback runs only when the standard factor was taken: under the cheap one every
    # matrix is certified.)
    news = jax.lax.cond(cheap_all | ok_all, lambda a: [X for X, _ in a], fallback, arrays)
    for X, p in zip(news, pending, strict=True):
        out[p.index] = update_to(X, p.param, p.dtype, p.unview)


def _finish_blocks(pending: list[Deferred], out: list, sharding, group: bool, degree: int):
    """Write the updates of leaves deferred with a :class:`BlockPlan` into ``out`` and return
    their refreshed auxiliary states by leaf index. With ``group``, one
    :func:`~manifold_optax.linalg.warm_block.refine_warm_block` for all leaves whose Grams
    and blocks have the same shapes, whatever their matrices' shapes, then one
    :meth:`~manifold_optax.Manifold.finish_block_retraction` per group of same-shape
    matrices."""
    if not pending:
        return {}
    key = lambda p: (p.plan.S.shape[1:], p.plan.block.shape[1:], p.plan.S.dtype)
    refine = lambda S, block: refine_warm_block(S, block, degree)  # noqa: E731
    refined = run_grouped(
        lambda _, S, block: run_placed(refine, sharding if owns(sharding) else None, S, block),
        [(key(p), (p.plan.S, p.plan.block)) for p in pending],
        group,
        owns(sharding),
    )
    items = [
        ((p.manifold, p.V.shape[1:]), (p.V, *r)) for p, r in zip(pending, refined, strict=True)
    ]
    finished = run_grouped(
        lambda key, *a: run_placed(key[0].finish_block_retraction, sharding, *a),
        items,
        group,
        owns(sharding),
    )
    auxes = {}
    for p, (X, aux) in zip(pending, finished, strict=True):
        out[p.index] = update_to(X, p.param, p.dtype, p.unview)
        auxes[p.index] = aux
    return auxes


def finish_now(m: Manifold, V, aux, plan, degree: int):
    """``(X, aux)``: the retraction that :meth:`~manifold_optax.Manifold.begin_retraction`
    began, finished on this stack alone (where the stack is all a device holds: under the
    owner strategy, inside each device's share). A :class:`PolishPlan` takes the cheap
    factor if every matrix of the stack certifies it, else the standard one, and the
    fallback retraction only if some matrix certifies neither; a :class:`BlockPlan` refines
    its block with a filter of ``degree``."""
    if plan is None:
        return V, aux
    if isinstance(plan, BlockPlan):
        refined = refine_warm_block(plan.S, plan.block, degree)
        return m.finish_block_retraction(V, *refined)
    cheap_all = jnp.all(plan.cheap_ok)
    factor = jax.lax.cond(
        cheap_all, lambda q: m.polish_factor(q, True), lambda q: m.polish_factor(q, False), plan
    )
    X = m.apply_polish(V, factor)
    ok = plan.ok.reshape(plan.ok.shape + (1, 1))
    X = jax.lax.cond(
        cheap_all | jnp.all(plan.ok),
        lambda X, V: X,
        lambda X, V: jnp.where(ok, X, m.fallback_retraction(V)),
        X,
        V,
    )
    return X, aux


def finish_deferred(
    pending: list[Deferred], out: list, sharding=None, group: bool = False, degree: int = 0
) -> dict:
    """Write the updates ``R(V) − W`` of the deferred leaves into ``out``; return the
    auxiliary states that the retractions refreshed, by leaf index (leaves deferred with a
    :class:`~manifold_optax.manifolds.BlockPlan`, refined with a filter of ``degree``)."""
    _finish_polish([p for p in pending if isinstance(p.plan, PolishPlan)], out, sharding, group)
    blocks = [p for p in pending if isinstance(p.plan, BlockPlan)]
    return _finish_blocks(blocks, out, sharding, group, degree)
