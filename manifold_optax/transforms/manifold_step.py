"""``manifold_step``: the dual step, the learning rate and the retraction in one
transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from manifold_optax._placement import placed
from manifold_optax.manifolds import SolverConfig
from manifold_optax.sharding import owns, run_placed
from manifold_optax.transforms._deferred import Deferred, finish_deferred, finish_now
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
    update_to,
    view_specs,
)

__all__ = ["manifold_step", "ManifoldStepState"]


class ManifoldStepState(NamedTuple):
    """The step count (the learning-rate schedule's argument), and per manifold leaf its
    multiplier ``y`` and the manifold's auxiliary state ``aux``: two trees with the
    parameters' structure (``optax.MaskedNode()`` at the other leaves)."""

    count: jax.Array
    y: Any
    aux: Any


def manifold_step(
    manifold,
    learning_rate: optax.ScalarOrSchedule,
    solver: str = "online",
    *,
    dual_learning_rate: float | None = None,
    inner_steps: int | None = None,
    ns_steps: int | None = None,
    ns_coeffs="polar_express",
    compute_dtype=None,
    exact_config: SolverConfig | None = None,
    power_iters: int | None = None,
    init_tolerance: float | None = DEFAULT_INIT_TOLERANCE,
    sharding=None,
    group: bool | None = None,
    weight_dimension_numbers=None,
) -> optax.GradientTransformationExtraArgs:
    r"""Per manifold leaf, the update ``R(W − η·Φ) − W`` with ``Φ`` and ``Y`` as in
    :func:`~manifold_optax.dual_ascent`; leaves without a manifold pass through unchanged.

    .. math::

       Φ = \operatorname{msign}(Ĝ + C_W^*(Y)),\qquad Y ← Y − η_2\,C_W(Φ),\qquad
       W ← R(W − ηΦ).

    The same update as the chain ``dual_ascent → optax.scale_by_learning_rate(η) → retract``
    (``docs/math.md``, The fused step), with fewer products: each manifold's
    :meth:`~manifold_optax.Manifold.online_retracted_step` shares what the dual step computes
    with the retraction (the spectral sphere's retraction finds the top singular pair of
    ``V``, which is that of the new ``W`` and gives the next step's ``Θ``; the sphere never
    forms ``Θ`` or ``V``), and sharded parameters are gathered once for both halves. It goes
    after the momentum.

    Args:
      manifold: a Manifold, a tree prefix of ``Manifold | None``, or a callable returning one.
      learning_rate: ``η``, a float or an optax schedule of the step count.
      solver: ``"online"``, ``"dual_ascent"``, ``"exact"`` or ``"fixed_point"`` (as in
        :func:`~manifold_optax.dual_ascent`).
      dual_learning_rate: ``η₂`` of the dual step (as in :func:`~manifold_optax.dual_ascent`).
      inner_steps: dual steps per call of ``"dual_ascent"``.
      exact_config: a :class:`~manifold_optax.SolverConfig`; the keywords above and
        ``power_iters``, when given (not ``None``), override its fields.
      ns_steps: Newton–Schulz steps of the online msign.
      ns_coeffs: the online msign's schedule.
      compute_dtype: the online msign's matmul input dtype.
      init_tolerance: as in :func:`~manifold_optax.dual_ascent`.
      sharding: the many-device strategy (as in :func:`~manifold_optax.dual_ascent`).
      group: batching of same-shape leaves (as in :func:`~manifold_optax.dual_ascent`).
      weight_dimension_numbers: the matrix each leaf is (as in
        :func:`~manifold_optax.dual_ascent`).
      power_iters: the degree of the spectral sphere retraction's warm Chebyshev-filtered
        block iteration (as in :func:`~manifold_optax.retract`);
        ``benchmarks/spectral_accuracy.py`` measures ``|‖W‖₂ − r|/r`` over a training run
        for each degree.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``; its
      state is a :class:`ManifoldStepState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, manifold_optax as mo
      >>> w0 = jax.random.normal(jax.random.key(0), (4, 3))
      >>> params = mo.project_params({"w": w0}, mo.Stiefel())
      >>> tx = mo.manifold_step(mo.Stiefel(), 0.1)
      >>> state = tx.init(params)
      >>> grads = {"w": jax.random.normal(jax.random.key(1), (4, 3))}
      >>> updates, state = tx.update(grads, state, params)
      >>> w = optax.apply_updates(params, updates)["w"]
      >>> bool(jnp.allclose(w.T @ w, jnp.eye(3), atol=1e-5))
      True
    """
    cfg = solver_config(solver, exact_config, inner_steps, dual_learning_rate, power_iters)
    power_iters = cfg.power_iters
    ms_kwargs = dict(steps=ns_steps, coeffs=ns_coeffs, compute_dtype=compute_dtype)

    def group_step(key, G, W, y, aux, lr):
        m = key[0]
        eta = m.dual_step_size(cfg)
        lr = lr.astype(W.dtype)  # (float64 parameters: every product in float64)
        if solver == "online" and m.runs_sharded and not owns(sharding):
            # Elementwise apart from the msign, whose input alone is gathered, and a few
            # reductions (scalar all-reduces on sharded parameters).
            fn = msign_fn(ms_kwargs, sharding)
            return m.online_retracted_step(G, W, y, aux, lr, eta, fn, power_iters)

        def leaf_step(G, W, y, aux, lr):
            if solver == "online":
                fn = msign_fn(ms_kwargs)
                return m.online_retracted_step(G, W, y, aux, lr, eta, fn, power_iters)
            phi, y, _, _ = m.solve(G, W, solver, Y=y, aux=aux, config=cfg, certify=False)
            X, aux, plan = m.begin_retraction(W - lr * phi, aux, power_iters)
            return X, y, aux, plan

        def owned_step(G, W, y, aux, lr):
            # Each device's share retracted at once: deferring would split the stacks back
            # into leaves between the two halves.
            X, y, aux, plan = leaf_step(G, W, y, aux, lr)
            X, aux = finish_now(m, X, aux, plan, power_iters)
            return X, y, aux, None

        if owns(sharding):
            return run_placed(lambda *a: owned_step(*a, lr), sharding, G, W, y, aux)

        # Whole matrices: gathered once and computed on every device ("gather"), or dealt to
        # their owners ("owner"); the retraction reuses the gathered W.
        return run_placed(lambda *a: leaf_step(*a, lr), sharding, G, W, y, aux)

    def update_fn(updates, state, params=None):
        dims, manifolds, g_leaves, treedef, w_leaves = update_leaves(
            "manifold_step", manifold, weight_dimension_numbers, updates, params
        )
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, jnp.float32)
        # A manifold that reads no multiplier (square Stiefel) does not get it (or gather it).
        states = leaf_states(state.y, state.aux, treedef)
        items, where, unviews = matrix_items(
            g_leaves, w_leaves, manifolds, states, reads_multiplier=True, dims=dims
        )

        def fn(key, *arrays):
            return group_step(key, *arrays, lr)

        grouped = group_default(group, sharding)
        results = run_grouped(fn, items, grouped, batched=owns(sharding))
        new_u, new_s, pending = list(g_leaves), list(states), []
        for i, (new, y, aux, plan) in zip(where, results, strict=True):
            w, ls, dtype = w_leaves[i], states[i], g_leaves[i].dtype
            if plan is not None:  # retracted below, all such leaves together
                pending.append(Deferred(i, manifolds[i], new, plan, w, dtype, unviews[i]))
            else:
                new_u[i] = update_to(new, w, dtype, unviews[i])
            new_s[i] = LeafState(reshaped(y, ls.y), reshaped(aux, ls.aux))
        for i, aux in finish_deferred(pending, new_u, sharding, grouped, power_iters).items():
            new_s[i] = LeafState(new_s[i].y, reshaped(aux, states[i].aux))
        count = optax.safe_increment(state.count)
        new_state = ManifoldStepState(count, *state_trees(new_s, treedef))
        return jax.tree.unflatten(treedef, new_u), new_state

    def init_fn(params):
        dims = view_specs(weight_dimension_numbers, params)
        leaves = initial_leaves(manifold, params, init_tolerance, power_iters, dims)
        trees = state_trees(leaves, jax.tree.structure(params))
        return ManifoldStepState(jnp.zeros([], jnp.int32), *trees)

    return placed(optax.GradientTransformationExtraArgs(init_fn, update_fn), sharding)
