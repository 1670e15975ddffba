"""The multiplier solvers over the manifold template (``docs/math.md``, The dual problem).

A manifold supplies the constraint ``C_W``, its adjoint ``C_W*`` and the msign; the solvers
find the multiplier ``Y`` minimizing the dual ``‖Ĝ + C_W*(Y)‖_*`` (``Ĝ`` the gradient
normalized to unit RMS singular value), whose gradient is the residual ``C_W(Φ)`` with
``Φ = msign(Ĝ + C_W*(Y))``:

* :func:`dual_ascent` — ``k`` steps ``Y ← Y − η₂·C_W(Φ)`` (step size decaying linearly to
  ``η₂/(k + 1)``); ``k = 1`` is the online solver;
* :func:`scalar_root` — for a scalar multiplier along a fixed normal ``Θ``: the root of the
  nondecreasing ``h(λ) = ⟨Θ, msign(Ĝ + λΘ)⟩`` by safeguarded regula falsi (Illinois);
* :func:`scalar_fixed_point` — Su's ``Q⁻¹``-free fixed point for a scalar multiplier;
* :func:`fixed_point` and :func:`anderson` — a manifold's fixed-point map ``X ↦ F(X)`` iterated
  plainly or with Anderson mixing (type II), stopping at a residual tolerance.

Each works on one group of same-shape matrices; the manifolds call them from
:meth:`~manifold_optax.manifolds.Manifold.solve_multiplier`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from manifold_optax.manifolds._ops import apply_sym, cross, fro, hp_matmul, inner, sym, transpose

__all__ = ["dual_ascent", "scalar_root", "scalar_fixed_point", "fixed_point", "anderson"]


def dual_ascent(manifold, Gn, W, Y, theta, steps: int, config):
    """``steps`` dual steps from ``Y``, then the direction at the final multiplier.

    Returns ``(Φ, Y)`` with ``Φ = msign(Ĝ + C_W*(Y))`` (``config.ns_steps`` Newton–Schulz
    steps at HIGHEST precision).
    """
    eta = manifold.dual_step_size(config)

    def body(k, Y):
        Phi = manifold.solver_msign(Gn + manifold.adjoint(W, Y, theta), config)
        lr = eta * (1.0 - k / (steps + 1.0)) if steps > 1 else eta
        return Y - lr * manifold.constraint(W, Phi, theta)

    Y = jax.lax.fori_loop(0, steps, body, Y)
    Phi = manifold.solver_msign(Gn + manifold.adjoint(W, Y, theta), config)
    return Phi, Y


def scalar_root(manifold, Gn, theta, config):
    """Illinois regula falsi on ``h(λ) = ⟨Θ, msign(Ĝ + λΘ)⟩`` (nondecreasing in ``λ``, with
    ``h(±∞) = ±‖Θ‖_*``), per matrix of the batch.

    The bracket ``[λ₀ − w, λ₀ + w]`` around the projection multiplier ``λ₀ = −⟨Θ, Ĝ⟩/‖Θ‖²``
    doubles until ``h`` changes sign; regula falsi then stops when ``min |h|/‖Θ‖ ≤ tol`` or the
    bracket is ``1e-7`` relative (``1e-15`` in float64) (at most ``config.max_iters`` steps), and one last
    interpolation gives ``λ``. Returns ``(Φ, λ)``.
    """
    t2 = jnp.maximum(inner(theta, theta), 1e-30)
    h = lambda lam: inner(theta, manifold.solver_msign(Gn + lam[..., None, None] * theta, config))
    lam0 = -inner(theta, Gn) / t2
    width = (fro(Gn) + 1.0) / jnp.sqrt(t2)

    def grow(c):
        w, lo, hi, hlo, hhi, i = c
        w = jnp.where((hlo > 0) | (hhi < 0), 2 * w, w)
        lo, hi = lam0 - w, lam0 + w
        return w, lo, hi, h(lo), h(hi), i + 1

    lo, hi = lam0 - width, lam0 + width
    c = (width, lo, hi, h(lo), h(hi), 0)
    c = jax.lax.while_loop(lambda c: jnp.any((c[3] > 0) | (c[4] < 0)) & (c[5] < 60), grow, c)
    _, lo, hi, hlo, hhi, _ = c

    def step(c):
        lo, hi, hlo, hhi, side, i = c
        mid = (lo * hhi - hi * hlo) / jnp.where(hhi - hlo > 0, hhi - hlo, 1.0)
        mid = jnp.where((mid > lo) & (mid < hi), mid, 0.5 * (lo + hi))
        hm = h(mid)
        go_lo = hm > 0  # root in [lo, mid]
        new_lo = jnp.where(go_lo, lo, mid)
        new_hi = jnp.where(go_lo, mid, hi)
        new_hlo = jnp.where(go_lo, jnp.where(side == 1, 0.5 * hlo, hlo), hm)
        new_hhi = jnp.where(go_lo, hm, jnp.where(side == -1, 0.5 * hhi, hhi))
        side = jnp.where(go_lo, -1, 1).astype(side.dtype)  # int32 under x64 too
        return new_lo, new_hi, new_hlo, new_hhi, side, i + 1

    def not_done(c):
        lo, hi, hlo, hhi, _, i = c
        err = jnp.minimum(jnp.abs(hlo), jnp.abs(hhi)) / jnp.sqrt(t2)
        return jnp.any((err > config.tol) & (hi - lo > rel * (jnp.abs(hi) + jnp.abs(lo)))) & (
            i < config.max_iters
        )

    rel = 1e-7 if Gn.dtype == jnp.float32 else 1e-15  # the bracket's resolution
    side = jnp.zeros_like(lo, jnp.int32)
    lo, hi, hlo, hhi, _, _ = jax.lax.while_loop(not_done, step, (lo, hi, hlo, hhi, side, 0))
    lam = jnp.where(jnp.abs(hlo) < jnp.abs(hhi), lo, hi)
    # Interpolate once more inside the final bracket for the last digits.
    lam = jnp.where(
        hhi - hlo > 0, (lo * hhi - hi * hlo) / jnp.where(hhi - hlo > 0, hhi - hlo, 1.0), lam
    )
    lam = jnp.clip(lam, lo, hi)
    Phi = manifold.solver_msign(Gn + lam[..., None, None] * theta, config)
    return Phi, lam


def scalar_fixed_point(manifold, Gn, theta, config):
    """Su's fixed point for a scalar multiplier along ``Θ``, per matrix of the batch.

    At the optimum ``Z = Ĝ + λΘ = Φ·Q`` (polar decomposition, ``Q = ZᵀΦ`` on the short side)
    with ``⟨Θ, Φ⟩ = 0``; taking the inner product with ``Θ`` gives the map

    .. math::

       λ ← \frac{⟨Θ, ΦQ⟩ − ⟨Θ, Φ⟩\\operatorname{tr}(Q)/m − ⟨Θ, Ĝ⟩}{‖Θ‖_F^2}

    (the middle term vanishes at the solution and makes the map contract), from the
    projection's ``λ₀ = −⟨Θ, Ĝ⟩/‖Θ‖²``. Stops when every ``|⟨Θ, Φ⟩|/‖Θ‖ ≤ tol`` or after
    ``config.max_iters`` steps; each matrix keeps its iterate of smallest residual. Returns
    ``(Φ, λ)``.
    """
    m = min(Gn.shape[-2:])
    t2 = jnp.maximum(inner(theta, theta), 1e-30)
    tg = inner(theta, Gn)

    def step(lam):
        Z = Gn + lam[..., None, None] * theta
        Phi = manifold.solver_msign(Z, config)
        Q = sym(cross(Z, Phi))
        tp = inner(theta, Phi)
        trq = jnp.trace(Q, axis1=-2, axis2=-1)
        new = (inner(theta, apply_sym(Phi, Q)) - tp * trq / m - tg) / t2
        return new, Phi, jnp.abs(tp) / jnp.sqrt(t2)

    def body(c):
        lam, k, best = c
        new, Phi, res = step(lam)
        better = res < best[0]
        best = (
            jnp.where(better, res, best[0]),
            jnp.where(better[..., None, None], Phi, best[1]),
            jnp.where(better, lam, best[2]),
        )
        new = jnp.where(jnp.isfinite(new), new, lam)
        return new, k + 1, best

    def go_on(c):
        _, k, best = c
        return jnp.any(best[0] > config.tol) & (k < config.max_iters)

    lam0 = -tg / t2
    best = (jnp.full_like(lam0, jnp.inf), jnp.zeros_like(Gn), lam0)
    _, _, (_, Phi, lam) = jax.lax.while_loop(go_on, body, (lam0, 0, best))
    return Phi, lam


def fixed_point(step, X0, phi0, config):
    """Iterate ``X ← F(X)`` for one matrix problem until the residual is at most
    ``config.tol``, ``config.max_iters`` steps, or a non-finite residual.

    ``step(X)`` returns ``(F(X), Φ(X), residual(X))``; ``phi0`` is a zero direction of ``Φ``'s
    shape. Returns the iterate of the smallest residual as ``(Φ, X, iterations)``.
    """

    def body(c):
        X, k, res, best = c
        Fx, Phi, res = step(X)
        improved = res < best[0]
        best = jax.tree.map(lambda new, old: jnp.where(improved, new, old), (res, Phi, X), best)
        return Fx, k + 1, res, best

    def go_on(c):
        _, k, res, _ = c
        return (res > config.tol) & jnp.isfinite(res) & (k < config.max_iters)

    inf = jnp.asarray(jnp.inf, X0.dtype)
    big = jnp.asarray(jnp.finfo(X0.dtype).max, X0.dtype)  # finite: the loop starts
    c = (X0, 0, big, (inf, phi0, X0))
    c = jax.lax.while_loop(go_on, body, c)
    _, Phi, X = c[3]
    return Phi, X, c[1]


def anderson(step, X0, phi0, config, depth: int = 12):
    """The fixed point of ``X ↦ F(X)`` (symmetric ``m×m`` iterates) by Anderson mixing, type II,
    over the last ``depth`` iterates, for one matrix problem.

    ``step(X)`` returns ``(F(X), Φ(X), residual(X))``. The mixing coefficients solve the least
    squares problem ``min‖f − ΔF·γ‖`` by QR (normal equations would square its conditioning).
    History lives in fixed-size buffers, so the loop compiles once. The iteration stops at
    ``config.tol``, at ``config.max_iters``, or when 15 steps in a row failed to improve the
    best residual (round-off has stalled it); the best iterate is returned as
    ``(Φ, X, iterations)``.
    """
    m = X0.shape[-1]
    d = depth
    dtype = X0.dtype
    Xh = jnp.zeros((d + 1, m * m), dtype)
    Fh = jnp.zeros((d + 1, m * m), dtype)

    def body(c):
        X, Xh, Fh, k, best = c
        Fx, Phi, res = step(X)
        improved = res < best[0]
        best = jax.tree.map(lambda new, old: jnp.where(improved, new, old), (res, Phi, X, k), best)
        x, f = X.reshape(-1), (Fx - X).reshape(-1)
        Xh = jnp.roll(Xh, -1, axis=0).at[-1].set(x)
        Fh = jnp.roll(Fh, -1, axis=0).at[-1].set(f)
        dX, dF = (Xh[1:] - Xh[:-1]).T, (Fh[1:] - Fh[:-1]).T  # (m², d)
        valid = (jnp.arange(d) >= d - k).astype(dtype)
        dX, dF = dX * valid, dF * valid
        # Unused columns are unit vectors → γ = 0 there.
        pad = jnp.zeros((d, d), dtype).at[jnp.arange(d), jnp.arange(d)].set(1.0 - valid)
        Qf, Rf = jnp.linalg.qr(jnp.concatenate([dF, pad], axis=0))
        Rf = Rf + jnp.diag(1e-12 * (jnp.abs(jnp.diag(Rf)).max() + 1e-30) * jnp.ones(d, dtype))
        rhs = hp_matmul(transpose(Qf), jnp.concatenate([f, jnp.zeros(d, dtype)])[:, None])
        gamma = jax.scipy.linalg.solve_triangular(Rf, rhs, lower=False)[:, 0] * valid
        xn = x + f - hp_matmul(dX + dF, gamma[:, None])[:, 0]
        return sym(xn.reshape(m, m)), Xh, Fh, k + 1, best

    def go_on(c):
        _, _, _, k, (res, _, _, k_best) = c
        return (res > config.tol) & (k < config.max_iters) & (k - k_best <= 15)

    best = (jnp.asarray(jnp.inf, dtype), phi0, X0, 0)
    c = jax.lax.while_loop(go_on, body, (X0, Xh, Fh, 0, best))
    _, Phi, Xb, _ = c[4]
    return Phi, Xb, c[3]
