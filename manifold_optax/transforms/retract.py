"""``retract``: the step that lands on the manifold, and ``project_params`` for fresh
parameters."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from manifold_optax._placement import like_params, placed
from manifold_optax.labels import path_to_str
from manifold_optax.manifolds._ops import working
from manifold_optax.sharding import owns, run_placed
from manifold_optax.transforms._deferred import Deferred, finish_deferred, finish_now
from manifold_optax.transforms._leaf_state import LeafState, leaf_states, state_trees
from manifold_optax.transforms._leaves import (
    group_default,
    leaf_view,
    reshaped,
    resolve_manifolds,
    run_grouped,
    static_int,
    update_leaves,
    update_to,
    view_specs,
)

__all__ = ["RetractState", "retract", "project_params"]


class RetractState(NamedTuple):
    """Per manifold leaf, the manifold's auxiliary state: a tree with the parameters'
    structure (``optax.MaskedNode()`` at the other leaves and where a manifold keeps
    none)."""

    aux: Any


def retract(
    manifold,
    *,
    power_iters: int | None = None,
    sharding=None,
    group: bool | None = None,
    weight_dimension_numbers=None,
) -> optax.GradientTransformationExtraArgs:
    r"""The update ``R(W + u) − W`` for every manifold leaf, so that ``optax.apply_updates``
    lands exactly on the manifold; it goes last in a chain (after the learning rate).

    Each manifold's retraction ``R`` (``docs/math.md``, Retractions): ``Sphere``
    ``r·V/‖V‖_F``; ``SpectralSphere`` ``r·V/‖V‖₂`` with ``‖V‖₂`` from a warm block refined by a
    degree-``power_iters`` Chebyshev filter; ``Stiefel`` the polar factor of ``V`` by one
    certified Newton–Schulz polish step (``V`` is within O(η²) of the manifold after a tangent
    step), with a fallback for matrices where it is not certified. Computed in float32 (float64
    for float64 parameters) at
    HIGHEST matmul precision; bfloat16 parameters are retracted in float32 and rounded.
    Leaves without a manifold pass through.

    Args:
      manifold: a Manifold, a tree prefix of ``Manifold | None``, or a callable returning one.
      power_iters: degree of the spectral sphere's warm block iteration per step (``None``:
        ``SolverConfig().power_iters``, 6).
      sharding: the many-device strategy (as in :func:`~manifold_optax.dual_ascent`).
      group: batching of same-shape leaves (as in :func:`~manifold_optax.dual_ascent`).
      weight_dimension_numbers: the matrix each leaf is (as in
        :func:`~manifold_optax.dual_ascent`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``; its
      state is a :class:`RetractState`.
    """

    power_iters = static_int(power_iters, "power_iters")

    def init_fn(params):
        dims = view_specs(weight_dimension_numbers, params)
        leaves = jax.tree.leaves(params)
        manifolds = resolve_manifolds(manifold, params, dims) if leaves else []
        auxes = []
        for i, (x, m) in enumerate(zip(leaves, manifolds, strict=True)):
            if m is None:
                auxes.append(None)
            else:
                W = leaf_view(working(x), None if dims is None else dims[i])[0]
                auxes.append(m.update_aux(W, m.init_aux(W), power_iters))
        return RetractState(_aux_tree(auxes, jax.tree.structure(params)))

    def update_fn(updates, state, params=None):
        dims, manifolds, u_leaves, treedef, w_leaves = update_leaves(
            "retract", manifold, weight_dimension_numbers, updates, params
        )
        items, where, unviews = [], [], {}
        state_aux = [s.aux for s in leaf_states(state.aux, state.aux, treedef)]
        for i, (u, w, m, aux) in enumerate(
            zip(u_leaves, w_leaves, manifolds, state_aux, strict=True)
        ):
            if m is None:
                continue
            V, unviews[i] = leaf_view(
                working(w) + u.astype(working(w).dtype).reshape(w.shape),
                None if dims is None else dims[i],
            )
            nb = V.ndim - 2
            args = jax.tree.map(lambda a, nb=nb: a.reshape((-1,) + a.shape[nb:]), (V, aux))
            key = (m, args[0].shape[1:], V.dtype, jax.tree.map(lambda a: a.shape[1:], args[1]))
            items.append((key, args))
            where.append(i)

        def group_retract(key, V, aux):
            m = key[0]
            if m.runs_sharded and not owns(sharding):
                return m.begin_retraction(V, aux, power_iters)
            if owns(sharding):  # each device's share retracted at once (as manifold_step)

                def owned(V, a):
                    X, a, plan = m.begin_retraction(V, a, power_iters)
                    return (*finish_now(m, X, a, plan, power_iters), None)

                return run_placed(owned, sharding, V, aux)
            # Block iterations and the polish's Gram on whole matrices (see dual_ascent).
            return run_placed(lambda V, a: m.begin_retraction(V, a, power_iters), sharding, V, aux)

        grouped = group_default(group, sharding)
        out, auxes, pending = list(u_leaves), list(state_aux), []
        for i, (new, aux, plan) in zip(
            where, run_grouped(group_retract, items, grouped, owns(sharding)), strict=True
        ):
            w, u = w_leaves[i], u_leaves[i]
            if plan is not None:  # retracted below, all such leaves together
                pending.append(Deferred(i, manifolds[i], new, plan, w, u.dtype, unviews[i]))
            else:
                out[i] = update_to(new, w, u.dtype, unviews[i])
            auxes[i] = reshaped(aux, state_aux[i])
        for i, aux in finish_deferred(pending, out, sharding, grouped, power_iters).items():
            auxes[i] = reshaped(aux, state_aux[i])
        return jax.tree.unflatten(treedef, out), RetractState(_aux_tree(auxes, treedef))

    return placed(optax.GradientTransformationExtraArgs(init_fn, update_fn), sharding)


def _aux_tree(auxes: list, treedef):
    """The auxiliary states (one per leaf, ``None`` where there is none) as a tree with the
    parameters' structure."""
    return state_trees([LeafState(None, a) for a in auxes], treedef)[1]


def project_params(params, manifold_spec, *, weight_dimension_numbers=None):
    """Put (freshly initialized) parameters onto their manifolds.

    Each manifold leaf is replaced by :meth:`~manifold_optax.Manifold.project`: the spheres
    rescale (the spectral sphere by the exact ``σ_max``), Stiefel takes the polar factor (the
    nearest point). Leaves without a manifold are returned unchanged; shapes and dtypes are
    kept.

    Args:
      params: a pytree of arrays.
      manifold_spec: a Manifold, a tree prefix of ``Manifold | None``, or a callable.
      weight_dimension_numbers: the matrix each leaf is, as in
        :func:`~manifold_optax.dual_ascent` (``None``: the last two axes).

    Returns:
      The projected pytree.

    Example:
      >>> import jax.numpy as jnp, manifold_optax as mo
      >>> p = mo.project_params({"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, mo.Sphere())
      >>> float(jnp.linalg.norm(p["w"])), p["b"].tolist()
      (1.0, [1.0, 1.0])
    """
    # One compiled program, not op-by-op dispatch: on arrays that span several processes
    # every process must run the same collectives in the same order.
    # (The checks read concrete values first: a reduction whose result every process holds.)
    _project_params(params, manifold_spec, weight_dimension_numbers, check_only=True)
    f = jax.jit(lambda p: _project_params(p, manifold_spec, weight_dimension_numbers))
    return like_params(f, params)


def _project_params(params, manifold_spec, weight_dimension_numbers, check_only=False):
    dims = view_specs(weight_dimension_numbers, params)
    manifolds = resolve_manifolds(manifold_spec, params, dims)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths, leaves = [p for p, _ in flat], [x for _, x in flat]
    out = []
    for i, (x, m) in enumerate(zip(leaves, manifolds, strict=True)):
        if m is None:
            out.append(x)
            continue
        W, unview = leaf_view(working(x), None if dims is None else dims[i])
        if check_only:
            m.check_point(W, path_to_str(paths[i]))
            continue
        out.append(unview(m.project(W)).astype(jnp.result_type(x)))
    return None if check_only else jax.tree.unflatten(treedef, out)
