"""The certified exact solver: a duality gap for any multiplier, and Newton's method on the
smoothed dual with continuation for the degenerate duals the fixed points cannot solve
(``docs/math.md``, Degenerate duals).

For a multiplier ``Y`` and a direction ``Φ``, the tangent projection of ``Φ`` rescaled to
``‖·‖₂ ≤ 1`` is feasible, so its value ``L = ⟨Ĝ, Φ_f⟩`` is a lower bound of the optimum, and
the dual value ``U = ‖Ĝ + C_W*(Y)‖_*`` an upper bound (weak duality): the relative gap
``(U − L)/U`` certifies both.

At a dual minimizer ``Z* = Ĝ + C_W*(Y*)`` may be rank-deficient; the nuclear norm is not
differentiable there and ``msign(Z*)`` is not the primal solution. The smoothed dual

.. math::

   f_μ(Y) = \\sum_i \\sqrt{σ_i(Ĝ + C_W^*(Y))^2 + μ^2}
          = \\max_{‖Φ‖_2 ≤ 1,\\ C_W(Φ) = 0} ⟨Ĝ, Φ⟩ + μ\\sum_i \\sqrt{1 - s_i(Φ)^2}

is smooth and convex, with gradient ``C_W(Φ_μ)``, ``Φ_μ = Z(ZᵀZ + μ²I)^{-1/2}``; its minimizer's
``Φ_μ`` is feasible and within ``μ·min(rows, cols)`` of the optimum. Newton's method (the
Hessian from the derivative of the spectral function ``σ ↦ σ/√(σ² + μ²)``, Daleckii–Krein)
with ``μ`` decreasing geometrically tracks the smoothed minimizers, and the best lower and
upper bounds seen stop it on the gap. The Hessian is dense in the multiplier (``p×p`` from
``p`` directional derivatives): above ``SolverConfig.smoothing_max_size`` entries the Newton
system is solved matrix-free instead (:func:`~manifold_optax.manifolds.newton_cg.newton_cg`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from manifold_optax.manifolds._ops import hp_matmul, inner, merge_batch, transpose
from manifold_optax.manifolds.newton_cg import (
    keep_best,
    newton_cg,
    polar_derivative,
    relative_gap,
)

__all__ = ["SolveInfo", "certify", "certified_solve", "smoothed_newton", "gap_tolerance"]


class SolveInfo(NamedTuple):
    """What a solve certifies, per matrix.

    Attributes:
      converged: the relative duality gap is within the tolerance.
      duality_gap: ``(U − L)/U`` with ``L = ⟨Ĝ, Φ⟩`` the returned (feasible) direction's value
        and ``U = ‖Ĝ + C_W*(Y)‖_*`` the dual value at the returned multiplier (``Ĝ`` the
        normalized gradient); 0 for a zero gradient.
      iterations: Newton steps of the smoothed dual (0 when the fixed point was certified).
    """

    converged: Any
    duality_gap: Any
    iterations: Any


def gap_tolerance(config, dtype) -> float:
    """The relative gap ``exact`` stops at: ``config.gap_tol``, at least ``256·ε`` of the
    working precision (the SVDs of the certificate are accurate to some ``64·ε``; float32
    cannot certify below)."""
    return max(config.gap_tol, 256 * float(jnp.finfo(dtype).eps))


def _svd(Z):
    U, s, Vt = jnp.linalg.svd(Z, full_matrices=False)
    return U, s, transpose(Vt)


def feasible(manifold, W, Phi, theta):
    """The tangent projection of ``Φ`` divided by ``max(1, ‖·‖₂)`` (single matrix; ``‖·‖₂``
    from an SVD, raised by ``64·ε`` to cover its round-off)."""
    P = manifold.remove_normal(W, Phi, manifold.constraint(W, Phi, theta), theta)
    s1 = jnp.linalg.svd(P, compute_uv=False)[0] * (1.0 + 64 * jnp.finfo(P.dtype).eps)
    return P / jnp.maximum(s1, 1.0)


def certify(manifold, Gn, W, Phi, Y, theta):
    """``(Φ_f, L, U)`` for one matrix: the feasible version of ``Φ``, its value and the dual
    value at ``Y``."""
    Pf = feasible(manifold, W, Phi, theta)
    U = jnp.sum(jnp.linalg.svd(Gn + manifold.adjoint(W, Y, theta), compute_uv=False))
    return Pf, inner(Gn, Pf), U


def _smoothed_direction(U, s, V, r):
    return hp_matmul(U * (s / r), transpose(V))


def smoothed_newton(manifold, Gn, W, start, theta, config, tol: float):
    """Newton's method with continuation on the smoothed dual, for one matrix.

    ``μ`` starts where the smoothing error ``μ·min(rows, cols)`` matches the starting gap (at
    most ``0.1``: ``Ĝ`` has unit RMS singular value) and shrinks fivefold per stage;
    each stage takes damped Newton steps (backtracking on ``f_μ``; the Hessian, ``p×p`` for a
    multiplier of ``p`` entries, built from ``p`` directional derivatives and inverted on its
    numerically nonzero eigenvalues) until the Newton decrement is below ``tol·μ`` (at most 12).
    After each stage the smoothed direction is certified (:func:`certify`); the best lower
    and upper bounds are kept, and the solve stops once their relative gap is ``≤ tol``, when
    four stages in a row have not halved it (the working precision's floor), after 30 stages,
    or after ``config.max_iters`` Newton steps. ``start = (Φ_f, L, Y, U)`` is the
    starting multiplier with its certificate (:func:`certify`).

    Returns ``(Φ_f, L, Y, U, steps)``: the best feasible direction and its value, the
    multiplier of the best dual value and that value, and the number of Newton steps.
    """
    dtype = Gn.dtype
    Y0 = start[2]
    shape = Y0.shape
    p = max(1, int(jnp.size(Y0)))
    basis = jnp.eye(p, dtype=dtype).reshape((p,) + shape)
    eps = float(jnp.finfo(dtype).eps)
    cut = eps * p
    C = lambda Phi: manifold.constraint(W, Phi, theta)
    Cs = lambda Y: manifold.adjoint(W, Y, theta)

    def f_mu(Y, mu):
        s = jnp.linalg.svd(Gn + Cs(Y), compute_uv=False)
        return jnp.sum(jnp.sqrt(s * s + mu * mu))

    def newton_step(c):
        Y, mu, _, k = c
        U, s, V = _svd(Gn + Cs(Y))
        r = jnp.sqrt(s * s + mu * mu)
        g = C(_smoothed_direction(U, s, V, r)).reshape(-1)
        hvp = lambda d: C(polar_derivative(U, s, V, r, mu, Cs(d))).reshape(-1)
        H = jax.vmap(hvp)(basis)
        lam, Q = jnp.linalg.eigh(0.5 * (H + transpose(H)))
        keep = lam > cut * jnp.maximum(lam[-1], 0.0)
        inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
        step = -hp_matmul(Q, inv * hp_matmul(g, Q))
        dec = -jnp.sum(g * step)
        f0 = f_mu(Y, mu)

        def shorten(t):
            return t * 0.5

        def too_long(t):
            trial = f_mu(Y + t * step.reshape(shape), mu)
            return (trial > f0 - 0.25 * t * dec) & (t > 1e-8)

        t = jax.lax.while_loop(too_long, shorten, jnp.asarray(1.0, dtype))
        Y = jnp.where(dec > 0, Y + t * step.reshape(shape), Y)
        return Y, mu, dec, k + 1

    def stage(c):
        Y, mu, best, k, j, stale = c

        def more(ci):
            _, mu_i, dec, ki = ci
            return (dec > tol * mu_i) & (ki - k < 12) & (ki < config.max_iters)

        Y, _, _, k = jax.lax.while_loop(more, newton_step, (Y, mu, jnp.asarray(jnp.inf, dtype), k))
        U, s, V = _svd(Gn + Cs(Y))
        Phi = _smoothed_direction(U, s, V, jnp.sqrt(s * s + mu * mu))
        Pf, L, Ub = certify(manifold, Gn, W, Phi, Y, theta)
        best, improved = keep_best(best, Pf, L, Y, Ub)
        return Y, mu * 0.2, best, k, j + 1, jnp.where(improved, 0, stale + 1)

    def go_on(c):
        _, _, (_, L, _, U), k, j, stale = c
        return (relative_gap(L, U) > tol) & (j < 30) & (k < config.max_iters) & (stale < 4)

    # The smoothing costs at most μ per singular value: start where that matches the gap left.
    _, L0, _, U0 = start
    mu0 = jnp.clip(relative_gap(L0, U0) * U0 / min(Gn.shape[-2:]), 10 * eps, 0.1)
    c = (Y0, jnp.asarray(mu0, dtype), tuple(start), 0, 0, 0)
    _, _, (Pf, L, Y, U), k, _, _ = jax.lax.while_loop(go_on, stage, c)
    return Pf, L, Y, U, k


def certified_solve(manifold, Gn, W, Phi, Y, theta, solver: str, config):
    """Per matrix of ``[*batch, rows, cols]``: the feasible version of ``Φ``, the multiplier
    and a :class:`SolveInfo` certifying them; for ``solver="exact"`` Newton's method on the
    smoothed dual continues where the gap is above :func:`gap_tolerance`:
    :func:`smoothed_newton` for multipliers of at most ``config.smoothing_max_size`` entries,
    :func:`~manifold_optax.manifolds.newton_cg.newton_cg` above."""
    tol = gap_tolerance(config, W.dtype)
    per_y = int(math.prod(Y.shape[W.ndim - 2 :]))
    newton = solver == "exact"
    second_order = smoothed_newton if per_y <= config.smoothing_max_size else newton_cg

    def one(Gn, W, Phi, Y, theta):
        Pf, L, U = certify(manifold, Gn, W, Phi, Y, theta)
        k = jnp.asarray(0, jnp.int32)
        if newton:

            def refine(_):
                *best, kn = second_order(manifold, Gn, W, (Pf, L, Y, U), theta, config, tol)
                return (*best, jnp.asarray(kn, jnp.int32))

            Pf, L, Y, U, k = jax.lax.cond(
                relative_gap(L, U) > tol, refine, lambda _: (Pf, L, Y, U, k), None
            )
        gap = relative_gap(L, U)
        return Pf, Y, SolveInfo(gap <= tol, gap, k)

    out = jax.lax.map(lambda a: one(*a), merge_batch(Gn, W, Phi, Y, theta))
    batch = W.shape[:-2]
    return jax.tree.map(lambda o: o.reshape(batch + o.shape[1:]), out)
