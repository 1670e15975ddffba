"""Matrix-free Newton on the smoothed dual: the exact solve for large multipliers.

The smoothed dual of :mod:`~manifold_optax.manifolds.certified`,

.. math::

   f_μ(Y) = \\sum_i \\sqrt{σ_i(Z)^2 + μ^2},\\qquad Z = Ĝ + C_W^*(Y),\\qquad
   ∇f_μ(Y) = C_W(Φ_μ),\\quad Φ_μ = Z(Z^⊤Z + μ^2 I)^{-1/2},

has the Hessian ``∇²f_μ(Y)[D] = C_W(DΦ_μ(Z)[C_W*(D)])``, ``p×p`` for a multiplier of ``p``
entries (``m(m+1)/2`` for Stiefel ``n×m``). Newton's system is solved here without forming it:
preconditioned conjugate gradients on Hessian-vector products, each the linearization
(``jax.linearize``) of ``Y ↦ C_W(Φ_μ(Ĝ + C_W*(Y)))`` at the current multiplier, taken once per
Newton step, whose derivative of ``Φ_μ`` is the Daleckii–Krein form in the singular bases of
``Z`` (:func:`smoothed_polar`; stable at repeated and zero singular values, where the SVD's
own derivative divides by ``σ_i² − σ_j²``). One thin SVD per Newton step serves the gradient,
every product of its CG solve, the line search's objective and the certificate; memory stays
``O(nm)``.

CG stops at a relative residual ``η = min(½, √(‖∇f_μ‖/‖Ĝ‖_F))`` (inexact Newton with an
Eisenstat–Walker forcing term: superlinear near the solution), on nonpositive curvature (the
smoothed dual is convex; a zero curvature is a direction it does not see), or after
``config.cg_iters`` products. The preconditioner is the manifold's
(:meth:`~manifold_optax.manifolds.Manifold.dual_preconditioner`), the identity by default.

References:
  Dembo, Eisenstat & Steihaug, "Inexact Newton methods" (SIAM J. Numer. Anal., 1982);
  Nocedal & Wright, "Numerical Optimization", ch. 7 (Newton–CG), 2006; Lewis & Sendov,
  "Twice differentiable spectral functions" (SIAM J. Matrix Anal. Appl., 2001).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from manifold_optax.manifolds._ops import hp_matmul, inner, transpose

#: The continuation's factor on ``μ`` per stage.
SHRINK = 0.2

__all__ = [
    "relative_gap",
    "spectral_scales",
    "polar_derivative",
    "smoothed_polar",
    "pcg",
    "newton_cg",
]


def _dot(a, b):
    return jnp.sum(a * b)


def relative_gap(L, U):
    """``(U − L)/U`` (0 where ``U = 0``)."""
    return jnp.where(U > 0, (U - L) / jnp.where(U > 0, U, 1.0), 0.0)


def keep_best(best, Pf, L, Y, Ub):
    """The best certificate so far, ``(Φ, ⟨G, Φ⟩, Y, ‖G + C_W*(Y)‖_*)``: the primal of the
    larger value and the multiplier of the smaller dual bound, each kept separately; and
    whether the relative gap at least halved."""
    bPf, bL, bY, bU = best
    better_L, better_U = L > bL, Ub < bU
    before = relative_gap(bL, bU)
    best = (
        jnp.where(better_L, Pf, bPf),
        jnp.where(better_L, L, bL),
        jnp.where(better_U, Y, bY),
        jnp.where(better_U, Ub, bU),
    )
    return best, relative_gap(best[1], best[3]) < 0.5 * before


def spectral_scales(s, r, mu):
    """``(A, B)``, ``k×k``: the divided differences of ``g(σ) = σ/r``, ``r = √(σ² + μ²)``,
    that scale the symmetric part (``A_ij = (g_i − g_j)/(σ_i − σ_j)
    = μ²(σ_i + σ_j)/(r_i r_j (σ_i r_j + σ_j r_i))``) and the skew part
    (``B_ij = (g_i + g_j)/(σ_i + σ_j)``) of a direction in the singular bases; both finite at
    ``σ_i = σ_j``, including 0."""
    si, sj = s[:, None], s[None, :]
    ri, rj = r[:, None], r[None, :]
    den = si * rj + sj * ri
    ratio = jnp.where(den > 0, (si + sj) / jnp.where(den > 0, den, 1.0), 1.0 / ri)
    return mu * mu * ratio / (ri * rj), 1.0 / (ri * rj * ratio)


def polar_derivative(U, s, V, r, mu, D):
    """The derivative of ``Z ↦ Z(ZᵀZ + μ²I)^{-1/2}`` at ``Z = UΣVᵀ`` (thin SVD) along ``D``.

    In the singular bases (Daleckii–Krein), with ``g(σ) = σ/r``, ``r = √(σ² + μ²)``: the
    symmetric and skew parts of ``UᵀDV`` scale by the divided differences of
    :func:`spectral_scales`, and the parts of ``D`` outside the column (row) span by ``1/r``.
    """
    sym_scale, skew_scale = spectral_scales(s, r, mu)
    DV = hp_matmul(D, V)
    UtD = hp_matmul(transpose(U), D)
    Dt = hp_matmul(UtD, V)
    S, K = 0.5 * (Dt + transpose(Dt)), 0.5 * (Dt - transpose(Dt))
    inner_part = sym_scale * S + skew_scale * K
    # U·M·Vᵀ + (I − UUᵀ)D·V·diag(1/r)·Vᵀ + U·diag(1/r)·Uᵀ·D·(I − VVᵀ), two products fewer.
    left = hp_matmul(U, inner_part - Dt / r) + DV / r
    out = hp_matmul(left, transpose(V))
    return out + hp_matmul(U, (UtD - hp_matmul(Dt, transpose(V))) / r[:, None])


@jax.custom_jvp
def smoothed_polar(Z, U, s, V, mu):
    """``Φ_μ = Z(ZᵀZ + μ²I)^{-1/2} = U·diag(σ/√(σ² + μ²))·Vᵀ`` from the thin SVD ``Z = UΣVᵀ``
    (``U``, ``s``, ``V`` given, so one SVD serves every use). Differentiable in ``Z`` (and
    ``μ``) by :func:`polar_derivative`; the SVD arguments are the values at ``Z`` and carry no
    derivative of their own."""
    r = jnp.sqrt(s * s + mu * mu)
    return hp_matmul(U * (s / r), transpose(V))


@smoothed_polar.defjvp
def _smoothed_polar_jvp(primals, tangents):
    Z, U, s, V, mu = primals
    dZ, dmu = tangents[0], tangents[4]
    r = jnp.sqrt(s * s + mu * mu)
    out = hp_matmul(U * (s / r), transpose(V))
    d = polar_derivative(U, s, V, r, mu, dZ)
    d = d + hp_matmul(U * (-s * mu / r**3 * dmu), transpose(V))
    return out, d


def pcg(hvp, b, precond, rtol, maxiter: int):
    """Preconditioned conjugate gradients for ``H x = b`` from ``x = 0`` (``H`` symmetric
    positive semidefinite, given by ``hvp``; ``precond`` applies ``M⁻¹ ≈ H⁻¹``).

    Stops when ``‖b − Hx‖ ≤ rtol·‖b‖``, after ``maxiter`` products, or at a direction of
    nonpositive curvature (the iterate so far is kept; on the first product the
    preconditioned right-hand side is returned, a descent direction). Returns
    ``(x, products)``.
    """
    z = precond(b)
    bn = jnp.sqrt(_dot(b, b))

    def body(c):
        x, r, z, p, rz, k, _ = c
        Hp = hvp(p)
        pHp = _dot(p, Hp)
        curved = pHp > 0
        alpha = jnp.where(curved, rz / jnp.where(curved, pHp, 1.0), 0.0)
        x = jnp.where(curved, x + alpha * p, jnp.where(k == 0, z, x))
        r = r - alpha * Hp
        z = precond(r)
        rz_new = _dot(r, z)
        p = z + (rz_new / jnp.where(rz > 0, rz, 1.0)) * p
        return x, r, z, p, rz_new, k + 1, ~curved

    def go_on(c):
        _, r, _, _, rz, k, stop = c
        return (jnp.sqrt(_dot(r, r)) > rtol * bn) & (k < maxiter) & ~stop & (rz > 0)

    c = (jnp.zeros_like(b), b, z, z, _dot(b, z), 0, jnp.asarray(False))
    x, _, _, _, _, k, _ = jax.lax.while_loop(go_on, body, c)
    return x, k


def linearized_gradient(manifold, Gn, W, theta, Y, sv, mu):
    """``(∇f_μ(Y), lin, Φ_μ)`` for one matrix: the smoothed dual's gradient ``C_W(Φ_μ)``, its
    linearization ``lin(ΔY, Δμ)`` in the multiplier and ``μ`` (``jax.linearize``: the
    forward products are kept, each call costs the derivative's products only; ``lin(D, 0)``
    is the Hessian-vector product ``∇²f_μ(Y)·D``) and ``Φ_μ``. ``sv = (U, s, V)`` is the thin
    SVD of ``Ĝ + C_W*(Y)``."""

    def grad(Y, mu):
        Phi = smoothed_polar(Gn + manifold.adjoint(W, Y, theta), *sv, mu)
        return manifold.constraint(W, Phi, theta), Phi

    return jax.linearize(grad, Y, mu, has_aux=True)


def newton_cg(manifold, Gn, W, start, theta, config, tol: float):
    """Newton–CG with continuation on the smoothed dual, for one matrix.

    ``μ`` starts where the smoothing error ``μ·min(rows, cols)`` matches the starting gap (at
    most ``0.1``) and shrinks fivefold per stage. A Newton step solves
    ``∇²f_μ·Δ = −∇f_μ`` by :func:`pcg` and backtracks on ``f_μ`` (Armijo, ``¼`` of the
    decrement); the SVD at the accepted point is the next step's. A stage ends when the
    decrement ``−⟨∇f_μ, Δ⟩`` is below ``tol·μ``, after 8 steps, or when the step cannot
    decrease ``f_μ``. A new stage starts from the central path's tangent (:func:`pcg` on
    ``∇²f_μ·ΔY = −∂_μ∇f_μ·Δμ``, taken where it lowers the new ``f_μ``). After each stage
    its point is certified: the tangent projection ``P`` of ``Φ_μ`` (the gradient is its
    residual) divided by ``max(1, ‖P‖₂)`` is feasible, and ``Σσ`` is the dual value. The best
    bounds are kept; the solve stops at a relative gap ``≤ tol``, when four stages in a row
    have not halved it, after 30 stages or ``config.max_iters`` Newton steps.
    ``start = (Φ_f, L, Y, U)`` is the starting multiplier with its certificate.

    Returns ``(Φ_f, L, Y, U, steps)`` as :func:`~.certified.smoothed_newton` does.
    """
    dtype = Gn.dtype
    eps = float(jnp.finfo(dtype).eps)
    Cs = lambda Y: manifold.adjoint(W, Y, theta)
    gnorm = jnp.sqrt(_dot(Gn, Gn))

    def svd_at(Y):
        U, s, Vt = jnp.linalg.svd(Gn + Cs(Y), full_matrices=False)
        return U, s, transpose(Vt)

    def f_of(sv, mu):
        return jnp.sum(jnp.sqrt(sv[1] * sv[1] + mu * mu))

    def gradient(Y, sv, mu):
        return linearized_gradient(manifold, Gn, W, theta, Y, sv, mu)

    def newton_step(c):
        Y, sv, mu, _, k, _ = c
        g, lin, _ = gradient(Y, sv, mu)
        hvp = lambda d: lin(d, jnp.zeros_like(mu))
        precond = manifold.dual_preconditioner(W, theta, *sv, mu)
        gn = jnp.sqrt(_dot(g, g))
        rtol = jnp.minimum(0.5, jnp.sqrt(gn / gnorm))
        step, _ = pcg(hvp, -g, precond, rtol, config.cg_iters)
        dec = -_dot(g, step)
        f0 = f_of(sv, mu)

        def too_long(ct):
            t, _, ft = ct
            return (ft > f0 - 0.25 * t * dec) & (t > 1e-4)

        def shorten(ct):
            t = 0.5 * ct[0]
            sv_t = svd_at(Y + t * step)
            return t, sv_t, f_of(sv_t, mu)

        sv1 = svd_at(Y + step)
        one = jnp.asarray(1.0, dtype)
        t, sv1, f1 = jax.lax.while_loop(too_long, shorten, (one, sv1, f_of(sv1, mu)))
        ok = (dec > 0) & (f1 <= f0 - 0.25 * t * dec)
        Y = jnp.where(ok, Y + t * step, Y)
        sv = jax.tree.map(lambda a, b: jnp.where(ok, a, b), sv1, sv)
        return Y, sv, mu, jnp.where(ok, dec, 0.0), k + 1, ~ok

    def certificate(Y, sv, mu):
        g, _, Phi = gradient(Y, sv, mu)
        P = manifold.remove_normal(W, Phi, g, theta)
        # ‖P‖₂ ≤ max σ/r + ‖N‖_F needs no SVD, but the Frobenius norm of the normal part
        # overstates its spectral norm by up to √m; one singular value of P is exact.
        bound = jnp.linalg.svd(P, compute_uv=False)[0] * (1.0 + 64 * eps)
        Pf = P / jnp.maximum(bound, 1.0)
        return Pf, inner(Gn, Pf), jnp.sum(sv[1])

    def predict(Y, sv, mu_old, mu):
        """The central path's tangent: ``Y + (μ_old − μ)·H⁻¹∂_μ∇f_μ`` (CG to ``10⁻¹``), taken
        where it lowers ``f_μ``; returns the point and its SVD."""
        _, lin, _ = gradient(Y, sv, mu_old)
        dg = lin(jnp.zeros_like(Y), jnp.ones_like(mu))
        precond = manifold.dual_preconditioner(W, theta, *sv, mu_old)
        hvp = lambda d: lin(d, jnp.zeros_like(mu))
        x, _ = pcg(hvp, (mu_old - mu) * dg, precond, 0.1, config.cg_iters)
        sv_p = svd_at(Y + x)
        use = f_of(sv_p, mu) < f_of(sv, mu)
        pick = lambda a, b: jnp.where(use, a, b)
        return pick(Y + x, Y), jax.tree.map(pick, sv_p, sv)

    def stage(c):
        Y, sv, mu, best, k, j, stale = c
        Y, sv = jax.lax.cond(j > 0, lambda: predict(Y, sv, mu / SHRINK, mu), lambda: (Y, sv))

        def more(ci):
            _, _, mu_i, dec, ki, stuck = ci
            return (dec > tol * mu_i) & (ki - k < 8) & (ki < config.max_iters) & ~stuck

        inf = jnp.asarray(jnp.inf, dtype)
        Y, sv, _, _, k, _ = jax.lax.while_loop(
            more, newton_step, (Y, sv, mu, inf, k, jnp.asarray(False))
        )
        Pf, L, Ub = certificate(Y, sv, mu)
        best, improved = keep_best(best, Pf, L, Y, Ub)
        return Y, sv, mu * SHRINK, best, k, j + 1, jnp.where(improved, 0, stale + 1)

    def go_on(c):
        _, _, _, (_, L, _, U), k, j, stale = c
        return (relative_gap(L, U) > tol) & (j < 30) & (k < config.max_iters) & (stale < 4)

    _, L0, Y0, U0 = start
    mu0 = jnp.clip(relative_gap(L0, U0) * U0 / min(Gn.shape[-2:]), 10 * eps, 0.1)
    c = (Y0, svd_at(Y0), jnp.asarray(mu0, dtype), tuple(start), 0, 0, 0)
    _, _, _, (Pf, L, Y, U), k, _, _ = jax.lax.while_loop(go_on, stage, c)
    return Pf, L, Y, U, k
