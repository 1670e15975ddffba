"""``dual_ascent``: per manifold leaf, the steepest tangent direction and its multiplier."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from manifold_optax._placement import placed
from manifold_optax.manifolds import SolverConfig
from manifold_optax.sharding import owns, run_placed
from manifold_optax.transforms._leaf_state import (
    LeafState,
    initial_leaves,
    leaf_states,
    state_trees,
)
from manifold_optax.transforms._leaves import (
    DEFAULT_INIT_TOLERANCE,
    group_default,
    matrix_items,
    msign_fn,
    reshaped,
    run_grouped,
    solver_config,
    update_leaves,
    view_specs,
)

__all__ = ["DualAscentState", "dual_ascent"]


class DualAscentState(NamedTuple):
    """Per manifold leaf, its multiplier ``y`` and the manifold's auxiliary state ``aux``:
    two trees with the parameters' structure (``optax.MaskedNode()`` at the other
    leaves)."""

    y: Any
    aux: Any


def dual_ascent(
    manifold,
    solver: str = "online",
    *,
    dual_learning_rate: float | None = None,
    inner_steps: int | None = None,
    ns_steps: int | None = None,
    ns_coeffs="polar_express",
    compute_dtype=None,
    exact_config: SolverConfig | None = None,
    init_tolerance: float | None = DEFAULT_INIT_TOLERANCE,
    sharding=None,
    group: bool | None = None,
    weight_dimension_numbers=None,
) -> optax.GradientTransformationExtraArgs:
    r"""Per manifold leaf, the steepest tangent direction and the multiplier update.

    .. math::

       Φ = \operatorname{msign}(Ĝ + C_W^*(Y)),\qquad Y ← Y − η_2\,C_W(Φ),\qquad
       Ĝ = G/\mathrm{RMS}σ(G),

    with the multiplier ``Y`` in the state (``docs/math.md``, The dual problem and Solvers).
    Solvers: ``"online"``, one dual step per training step (one msign); ``"dual_ascent"``,
    ``inner_steps`` such steps with a linearly decaying step, warm-started from the state;
    ``"exact"`` / ``"fixed_point"``, solved to ``exact_config.tol``
    (:meth:`~manifold_optax.Manifold.solve`). Returns the positive direction ``Φ``
    (``optax.scale_by_learning_rate`` negates it); leaves without a manifold pass through.

    Args:
      manifold: a Manifold, a tree prefix of ``Manifold | None``, or a callable returning one.
      solver: ``"online"``, ``"dual_ascent"``, ``"exact"`` or ``"fixed_point"``.
      dual_learning_rate: ``η₂``, in units of the normalized gradient; ``None`` takes the
        manifold's ``default_dual_learning_rate``.
      inner_steps: dual steps per call for ``"dual_ascent"``.
      ns_steps: Newton–Schulz steps of the online direction's msign (default: 5, as ``muon``).
      ns_coeffs: that msign's schedule (default: Polar Express, as ``muon``).
      compute_dtype: dtype of the online msign's matmuls (e.g. ``jnp.bfloat16``; coefficients,
        normalization and accumulation stay float32). The multiplier update, the tangent
        projection and the retraction always run in float32, and the iterative solvers keep
        float32 throughout.
      exact_config: :class:`~manifold_optax.SolverConfig` of the iterative solvers;
        ``inner_steps`` and ``dual_learning_rate``, when given (not ``None``), override its
        fields, left at ``None`` they keep them.
      init_tolerance: ``init`` raises, naming the leaf, if a concrete parameter is farther
        than this (relative; at least 4× its dtype's epsilon) from its manifold; traced
        parameters are not checked; ``None`` disables the check.
      sharding: a :class:`~manifold_optax.MsignSharding` for sharded parameters:
        ``"gather"`` computes whole matrices on every device, ``"owner"`` deals them to the
        devices (each computes ``⌈B/N⌉`` of a same-shape group of ``B``, every solver).
      group: run same-shape leaves with the same manifold as one batch; ``None`` does so
        except on CPU (and always under ``"owner"``). Results agree with one leaf at a time
        to float32 round-off.
      weight_dimension_numbers: the matrix each leaf is (a ``MuonDimensionNumbers`` or
        :class:`~manifold_optax.MatrixSpec`, a spec tree such as
        :func:`~manifold_optax.flax_dimension_numbers`'s, or a callable); the manifold
        constrains that matrix view (conv kernels, attention projections, split heads). A single
        ``Manifold`` then applies to the leaves with a spec. ``None``: the last two axes.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``; its
      state is a :class:`DualAscentState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, manifold_optax as mo
      >>> w0 = jax.random.normal(jax.random.key(0), (4, 3))
      >>> params = mo.project_params({"w": w0}, mo.Stiefel())
      >>> tx = optax.chain(mo.dual_ascent(mo.Stiefel()), optax.scale_by_learning_rate(0.1),
      ...                  mo.retract(mo.Stiefel()))
      >>> state = tx.init(params)
      >>> grads = {"w": jax.random.normal(jax.random.key(1), (4, 3))}
      >>> updates, state = tx.update(grads, state, params)
      >>> w = optax.apply_updates(params, updates)["w"]
      >>> bool(jnp.allclose(w.T @ w, jnp.eye(3), atol=1e-5))
      True

    References:
      Su Jianlin, "Steepest descent on manifolds", part 5 (kexue.fm, 2025).
    """
    cfg = solver_config(solver, exact_config, inner_steps, dual_learning_rate)
    ms_kwargs = dict(steps=ns_steps, coeffs=ns_coeffs, compute_dtype=compute_dtype)

    def init_fn(params):
        dims = view_specs(weight_dimension_numbers, params)
        leaves = initial_leaves(manifold, params, init_tolerance, cfg.power_iters, dims)
        return DualAscentState(*state_trees(leaves, jax.tree.structure(params)))

    def update_fn(updates, state, params=None):
        dims, manifolds, g_leaves, treedef, w_leaves = update_leaves(
            "dual_ascent", manifold, weight_dimension_numbers, updates, params
        )
        states = leaf_states(state.y, state.aux, treedef)
        items, where, unviews = matrix_items(g_leaves, w_leaves, manifolds, states, dims=dims)

        def group_step(key, G, W, y, aux):
            m = key[0]
            eta, iters = m.dual_step_size(cfg), cfg.power_iters
            if solver == "online" and m.runs_sharded and not owns(sharding):
                # Elementwise apart from the msign, whose input alone is gathered.
                fn = msign_fn(ms_kwargs, sharding)
                return m.online_direction(G, W, y, aux, eta, fn, iters)

            def leaf_step(G, W, y, aux):
                if solver == "online":
                    return m.online_direction(G, W, y, aux, eta, msign_fn(ms_kwargs), iters)
                return m.solve(G, W, solver, Y=y, aux=aux, config=cfg, certify=False)[:3]

            # Otherwise whole matrices, gathered once on every device or dealt to their owners:
            # split matrices would turn the block and polar iterations into many small
            # collectives.
            return run_placed(leaf_step, sharding, G, W, y, aux)

        new_u, new_s = list(g_leaves), list(states)
        for i, (phi, y, aux) in zip(
            where,
            run_grouped(group_step, items, group_default(group, sharding), owns(sharding)),
            strict=True,
        ):
            w, ls = w_leaves[i], states[i]
            new_u[i] = unviews[i](phi).astype(w.dtype)
            new_s[i] = LeafState(reshaped(y, ls.y), reshaped(aux, ls.aux))
        return jax.tree.unflatten(treedef, new_u), DualAscentState(*state_trees(new_s, treedef))

    return placed(optax.GradientTransformationExtraArgs(init_fn, update_fn), sharding)
