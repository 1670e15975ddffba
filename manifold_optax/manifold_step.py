"""The fused manifold step: dual step, learning rate and retraction in one transformation.

``manifold_step(m, η)`` computes, per manifold leaf, ``W ← R(W − η·Φ)`` with
``Φ = msign(Ĝ + C_W*(Y))`` and the multiplier update, and returns ``R(W − η·Φ) − W`` (so
``optax.apply_updates`` lands on the manifold). It is the same update as the explicit chain
``dual_ascent(m) → optax.scale_by_learning_rate(η) → retract(m)`` (MATH.md §3), but the two
halves share what one computes for the other (issue 6, issue 7):

* spectral sphere: the retraction's block iteration finds the top singular pair of
  ``V = W − ηΦ``, which is exactly the top pair of the new ``W = r·V/‖V‖₂`` (a rescaling);
  it is kept in the state and gives the next step's ``Θ = u₁v₁ᵀ`` with no block iteration of
  its own (the chain runs a second, 2-iteration block for the dual step);
* sharded parameters: ``G``, ``W`` and the multiplier are gathered once and the dual step and
  the retraction both run on the gathered matrices (the chain gathers ``W`` again, as part of
  ``W − ηΦ``, for the retraction).

State: a step count (for learning-rate schedules) and per leaf the multiplier ``y``, and for the
spectral sphere the warm power block and the top singular pair of ``W``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from manifold_optax.manifold_transforms import (
    DEFAULT_INIT_TOLERANCE,
    NO_PLAN,
    PendingPolish,
    _empty,
    _initial_leaves,
    _matrix_items,
    _msign_fn,
    _online_step,
    _solver_config,
    _stiefel_updates,
    _update_to,
    group_default,
    resolve_manifolds,
    run_grouped,
)
from manifold_optax.manifolds import (
    Aux,
    Manifold,
    SolverConfig,
    SpectralSphere,
    Sphere,
    Stiefel,
)
from manifold_optax.sharding import run_replicated

__all__ = ["manifold_step", "ManifoldStepState", "StepLeafState"]


class StepLeafState(NamedTuple):
    y: Any  # multiplier (normalized-gradient units): [*batch] or [*batch, m, m]; None off-manifold
    v: Any  # spectral sphere: warm power block [*batch, min(rows, cols), p]; else None
    u: Any  # spectral sphere: top left singular vector of W [*batch, rows]; else None
    vec: Any  # spectral sphere: top right singular vector of W [*batch, cols]; else None


class ManifoldStepState(NamedTuple):
    count: jax.Array  # steps taken (the learning-rate schedule's argument)
    leaves: tuple  # one StepLeafState per parameter leaf


def _square_stiefel(m: Manifold, shape) -> bool:
    # Square Stiefel uses the closed form: its multiplier is an output only, never an input.
    return isinstance(m, Stiefel) and shape[-1] == shape[-2]


def manifold_step(
    manifold,
    learning_rate: optax.ScalarOrSchedule,
    solver: str = "online",
    *,
    dual_learning_rate: float | None = None,
    inner_steps: int = 20,
    ns_steps: int | None = None,
    ns_coeffs="polar_express",
    compute_dtype=None,
    exact_config: SolverConfig | None = None,
    power_iters: int = 6,
    init_tolerance: float | None = DEFAULT_INIT_TOLERANCE,
    sharding=None,
    group: bool | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Manifold leaves: ``R(W − η·Φ) − W`` with ``Φ = msign(Ĝ + C_W*(Y))`` and ``Y`` updated as
    in :func:`~manifold_optax.dual_ascent`; leaves without a manifold pass through unchanged.
    Needs ``params``; goes after the momentum, and takes the place of
    ``dual_ascent → scale_by_learning_rate → retract`` (the same update, fewer products: see
    the module docstring).

    Args:
      manifold: a Manifold, a tree prefix of ``Manifold | None``, or a callable returning one.
      learning_rate: η, a float or an optax schedule of the step count.
      solver, dual_learning_rate, inner_steps, ns_steps, ns_coeffs, compute_dtype,
        exact_config, init_tolerance, sharding, group: as in :func:`~manifold_optax.dual_ascent`.
      power_iters: the degree of the spectral sphere retraction's warm Chebyshev-filtered
        block iteration (as in :func:`~manifold_optax.retract`; each degree is an ``s×s``
        by ``s×p`` product with the Gram). Measured after every one of the digits demo's 600
        steps (``benchmarks/spectral_accuracy.py``), the worst ``|‖W‖₂ − r|/r``: 2.5e-5 with
        2, 7.4e-6 with 3, 4.5e-6 with 4, 4.4e-7 with 6 (the default), 2.8e-7 with 8; plain
        power steps left 6.1e-5 with 6 and 1.5e-5 with 10 (each run is one training
        trajectory, and round-off moves its worst step by up to 2× between versions). A lower
        degree buys little time: on step_bench's tree (2 CPU cores) the step measured 1.21×
        ``muon``'s with 2 (quartiles over rounds 1.07–1.49) and 1.21× with 6 (1.13–1.34).
    """
    cfg = _solver_config(solver, exact_config, inner_steps, dual_learning_rate)
    ms_kwargs = dict(steps=ns_steps, coeffs=ns_coeffs, compute_dtype=compute_dtype)

    def init_fn(params):
        out = []
        for leaf in _initial_leaves(manifold, params, init_tolerance, power_iters):
            if leaf is None:
                out.append(StepLeafState(_empty(), _empty(), _empty(), _empty()))
            else:
                y, aux = leaf
                out.append(StepLeafState(y, aux.v, aux.u, aux.vec))
        return ManifoldStepState(jnp.zeros([], jnp.int32), tuple(out))

    def direction(m, G, W, y, v):
        """``(Φ, Y)`` at ``W`` (whole matrices)."""
        if solver != "online":
            phi, y, _ = m.solve(G, W, solver, Y=y, aux=Aux(v), config=cfg)
            return phi, y
        return _online_step(m, G, W, y, m.theta(W), cfg, ms_kwargs)

    def group_step(key, G, W, y, v, u, vec, lr):
        m = key[0]
        if solver == "online" and isinstance(m, Sphere):
            # Elementwise except the msign and a few reductions (the fewest passes over the
            # matrices: Sphere.online_retracted_step); sharded, only the msign's input is
            # gathered, and the reductions become scalar all-reduces.
            eta = m.dual_step_size(cfg)
            new, y = m.online_retracted_step(G, W, y, lr, eta, _msign_fn(ms_kwargs, sharding))
            return new, y, v, u, vec, *NO_PLAN

        def leaf_step(G, W, y, v, u, vec, lr):
            if solver == "online" and isinstance(m, SpectralSphere):
                # Θ = uvᵀ is never formed (SpectralSphere.online_retracted_step).
                eta = m.dual_step_size(cfg)
                msign_fn = _msign_fn(ms_kwargs)
                aux = Aux(v, None, u, vec)
                new, y, aux = m.online_retracted_step(G, W, y, aux, lr, eta, msign_fn, power_iters)
                return new, y, aux.v, aux.u, aux.vec, *NO_PLAN
            phi, y = direction(m, G, W, y, v)
            V = W - lr * phi
            if isinstance(m, SpectralSphere):
                aux = m.update_aux(V, Aux(v), power_iters)
                return m.retract(V, aux), y, aux.v, aux.u, aux.vec, *NO_PLAN
            if isinstance(m, Stiefel):
                # The polish step's Gram here; the step itself, with one choice of p(A) for
                # all leaves, in _stiefel_updates.
                return V, y, v, u, vec, *m.polish_plan(V)
            return m.retract(V), y, v, u, vec, *NO_PLAN

        # Gather once, then the dual step and the retraction on whole matrices on every
        # device (see dual_ascent; the retraction reuses the gathered W).
        return run_replicated(leaf_step, sharding, G, W, y, v, u, vec, lr)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("manifold_step needs params: call update(updates, state, params)")
        manifolds = resolve_manifolds(manifold, params)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, jnp.float32)
        g_leaves, treedef = jax.tree.flatten(updates)
        w_leaves = jax.tree.leaves(params)
        items, where = _matrix_items(
            g_leaves,
            w_leaves,
            manifolds,
            state.leaves,
            # Square Stiefel's closed form reads no multiplier: it is not passed (or gathered).
            lambda m, W, ls: (None if _square_stiefel(m, W.shape) else ls.y, ls.v, ls.u, ls.vec),
        )

        def fn(key, *arrays):
            return group_step(key, *arrays, lr)

        grouped = group_default(group)
        new_u, new_s, pending = list(g_leaves), list(state.leaves), []
        for i, (new, y, v, u, vec, *plan) in zip(
            where, run_grouped(fn, items, grouped), strict=True
        ):
            w, ls = w_leaves[i], state.leaves[i]
            if plan[0] is not None:  # Stiefel: polished below, all leaves together
                pending.append(PendingPolish(i, manifolds[i], new, *plan, w, g_leaves[i].dtype))
            else:
                new_u[i] = _update_to(new, w, g_leaves[i].dtype)
            shaped = lambda a, like: None if a is None else a.reshape(like.shape)
            new_s[i] = StepLeafState(
                shaped(y, ls.y), shaped(v, ls.v), shaped(u, ls.u), shaped(vec, ls.vec)
            )
        _stiefel_updates(pending, new_u, sharding, grouped)
        count = optax.safe_increment(state.count)
        return jax.tree.unflatten(treedef, new_u), ManifoldStepState(count, tuple(new_s))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
