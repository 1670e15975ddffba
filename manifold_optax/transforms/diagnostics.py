"""``diagnostics``: how far each manifold leaf is from its manifold, its multiplier, and how
tangent a direction is."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from manifold_optax._placement import _on, explicit_mesh
from manifold_optax.labels import path_to_str
from manifold_optax.manifolds import SolverConfig, certified
from manifold_optax.manifolds._ops import fro, working
from manifold_optax.transforms._leaf_state import leaf_states
from manifold_optax.transforms._leaves import (
    leaf_view,
    paths,
    resolve_manifolds,
    view_specs,
)
from manifold_optax.transforms.dual_ascent import DualAscentState
from manifold_optax.transforms.manifold_step import ManifoldStepState

__all__ = ["diagnostics"]


def _leaf_states(opt_state, treedef):
    """One :class:`LeafState` per parameter leaf from the first ``dual_ascent`` or
    ``manifold_step`` state inside ``opt_state``, else ``None``."""
    kinds = (DualAscentState, ManifoldStepState)
    for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds)):
        if isinstance(x, kinds):
            return leaf_states(x.y, x.aux, treedef)
    return None


def _certificate(m, G, W, phi):
    cfg = SolverConfig()
    sol = m.solve(G, W, "exact", config=cfg)
    gap = sol.info.duality_gap
    if phi is not None:
        # The direction's feasible value against the exact solve's dual value (both in
        # normalized-gradient units).
        Gn = G / jnp.maximum(fro(G) / math.sqrt(min(G.shape[-2:])), 1e-30)[..., None, None]
        theta = m.theta(W, sol.aux)
        info = certified.certified_solve(m, Gn, W, phi, sol.multiplier, theta, "given", cfg)[2]
        gap = info.duality_gap
    gap = jnp.max(gap)
    tol = certified.gap_tolerance(cfg, W.dtype)
    return {"duality_gap": gap, "converged": gap <= tol}


def diagnostics(
    params,
    manifold_spec,
    opt_state=None,
    directions=None,
    *,
    grads=None,
    weight_dimension_numbers=None,
) -> dict:
    """Per manifold leaf, keyed by its path: ``distance`` to the manifold
    (:meth:`~manifold_optax.Manifold.distance`), and, when given, the ``multiplier_norm``
    (the Frobenius norm of the multiplier in the ``dual_ascent`` or ``manifold_step`` state
    inside ``opt_state``) and the largest relative ``tangent_violation``
    ``‖C_W(Φ)‖_F/‖Φ‖_F`` of ``directions`` (e.g. the ``dual_ascent`` output) at ``params``.

    With ``grads`` (what the manifold step was given, e.g. the momentum), the certificate of
    :meth:`~manifold_optax.Manifold.solve`: ``duality_gap`` and ``converged`` (the largest
    gap and whether every matrix is within ``SolverConfig().gap_tol``) of ``directions`` —
    the value of their feasible version (tangent projection, ``‖·‖₂ ≤ 1``) against the dual
    value of the ``"exact"`` solve — or, without ``directions``, of the ``"exact"`` solve
    itself.

    Call it outside ``jit`` for logging, or inside and log the arrays. With
    ``weight_dimension_numbers`` (as given to the optimizer) the matrix views are those.

    Example:
      >>> import jax, manifold_optax as mo
      >>> w = jax.random.normal(jax.random.key(0), (3, 2))
      >>> p = mo.project_params({"w": w}, mo.Stiefel())
      >>> d = mo.diagnostics(p, mo.Stiefel())
      >>> float(d["w"]["distance"]) < 1e-5
      True
    """
    # One compiled program on Auto axes (as project_params): eager SVDs and Gram products
    # reject operands sharded on Explicit axes, and on arrays that span several processes
    # every process must run the same collectives in the same order.
    f = jax.jit(
        lambda p, s, d, g: _diagnostics(p, manifold_spec, s, d, g, weight_dimension_numbers)
    )
    args = (params, opt_state, directions, grads)
    mesh = explicit_mesh(params)
    if mesh is None:
        return f(*args)
    with _on(mesh):
        return jax.sharding.auto_axes(f, out_sharding=P())(*args)


def _diagnostics(params, manifold_spec, opt_state, directions, grads, weight_dimension_numbers):
    dims = view_specs(weight_dimension_numbers, params)
    manifolds = resolve_manifolds(manifold_spec, params, dims)
    leaves = jax.tree.leaves(params)
    treedef = jax.tree.structure(params)
    states = None if opt_state is None else _leaf_states(opt_state, treedef)
    d_leaves = jax.tree.leaves(directions) if directions is not None else None
    g_leaves = jax.tree.leaves(grads) if grads is not None else None
    out = {}
    for i, (p, x, m) in enumerate(zip(paths(params), leaves, manifolds, strict=True)):
        if m is None:
            continue
        W, _ = leaf_view(working(x), None if dims is None else dims[i])
        entry = {"distance": m.distance(W)}
        if states is not None:
            entry["multiplier_norm"] = jnp.linalg.norm(states[i].y)
        if d_leaves is not None:
            phi = jnp.asarray(d_leaves[i], W.dtype).reshape(jnp.shape(x))
            phi = leaf_view(phi, None if dims is None else dims[i])[0].reshape(W.shape)
            # The state's auxiliary state, refreshed at W (no warm iterations).
            aux = None if states is None else m.update_aux(W, states[i].aux, 0)
            entry["tangent_violation"] = jnp.max(m.tangent_violation(W, phi, aux))
        if grads is not None:
            G = jnp.asarray(g_leaves[i], W.dtype).reshape(jnp.shape(x))
            G = leaf_view(G, None if dims is None else dims[i])[0].reshape(W.shape)
            entry.update(_certificate(m, G, W, None if d_leaves is None else phi))
        out[path_to_str(p)] = entry
    return out
