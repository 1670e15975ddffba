"""The warm block's refinement on accelerators: a scaled Chebyshev filter of the short-side
Gram, then Rayleigh–Ritz on the whitened block, with two batched eigensolves of ``p×p``
matrices and no loop, norm per step or per-matrix call.

It works on Gram matrices ``S`` (``[*batch, s, s]``) and blocks ``V`` (``[*batch, s, p]``)
alone, so the block iterations of matrices of different shapes whose short sides are equal
(a transformer's ``d×d``, ``d×4d`` and ``4d×d`` layers) run as one batch: the spectral
sphere's retraction forms each Gram with its group and refines all of them together
(``finish_deferred``). See ``docs/math.md`` (Top singular pair).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from manifold_optax.linalg._ops import matmul_tn, sums

__all__ = ["short_side_gram", "refine_warm_block", "other_side"]

HIGHEST = jax.lax.Precision.HIGHEST

#: Directions of the filtered block whose Gram eigenvalue is below this fraction of the
#: largest are scaled to norm ``√(D_j/(TOL·D_max)) < 1`` instead of 1 by the whitening: the
#: float32 Gram is accurate to about ``√s·ε·D_max`` (``10⁻⁶·D_max``), so below ``10⁻⁴`` a
#: whitened direction's length is not known to 1%, and a direction longer than it should be
#: would win the Rayleigh–Ritz step on its length. Shorter ones never win on it.
WHITENING_TOL = 1e-4


def short_side_gram(x):
    """``xxᵀ`` for wide ``x`` (rows ≤ cols), else ``xᵀx``: ``[*batch, s, s]``,
    ``s = min(rows, cols)``, at HIGHEST precision."""
    if x.shape[-2] <= x.shape[-1]:
        return jnp.matmul(x, jnp.swapaxes(x, -1, -2), precision=HIGHEST)
    return matmul_tn(x, x, HIGHEST)


def _chebyshev(S, V, degree: int):
    """``T_k(t(S))·V/T_k(τ)``, ``t(λ) = 2λ/b − 1``: the Chebyshev filter of
    ``linalg.spectral._chebyshev_filter`` (``b`` the mean Rayleigh quotient of ``V``'s
    columns), scaled by the polynomial's value ``T_k(τ)`` at the columns' largest Rayleigh
    quotient ``q`` (``τ = t(q)``) instead of normalized column by column: the scalars
    ``ρ_j = T_{j−1}(τ)/T_j(τ)`` follow ``ρ_{j+1} = 1/(2τ − ρ_j)`` (Zhou & Saad 2007, the
    scaled filter), so the block stays of the order of ``(λ₁/q)^k`` with no reduction per
    step. The two reductions that give ``b`` and ``q`` are the filter's only ones."""
    SV = jnp.matmul(S, V, precision=HIGHEST)
    vv, vsv = sums(V * V, V * SV, axis=(-2,), fused=True)
    q = vsv / jnp.where(vv > 0, vv, 1.0)  # [*b, p] the columns' Rayleigh quotients
    # (Zero columns count in the mean: b only has to stay below λ₁.)
    b, top = jax.lax.reduce(
        (q, q),
        (jnp.zeros((), q.dtype), jnp.array(-jnp.inf, q.dtype)),
        lambda a, c: (a[0] + c[0], jnp.maximum(a[1], c[1])),
        (q.ndim - 1,),
    )
    b = b / q.shape[-1]
    # b ≥ 10⁻³·q keeps τ ≤ 2·10³ (T_k(τ) within float32 for k ≤ 10); b < q keeps τ > 1.
    b = jnp.where(top > 0, jnp.clip(b, 1e-3 * top, (1 - 1e-3) * top), 1.0)[..., None, None]
    tau = jnp.where(top > 0, 2.0 * top / b[..., 0, 0] - 1.0, 2.0)[..., None, None]
    # Y_j = T_j(t(S))V/T_j(τ): Y_1 = t(S)V/τ, Y_{j+1} = ρ_{j+1}(2t(S)Y_j − ρ_j·Y_{j−1}).
    prev, cur = V, (2.0 * SV / b - V) / tau
    rho = 1.0 / tau
    for _ in range(degree - 1):
        rho_next = 1.0 / (2.0 * tau - rho)
        t_cur = 2.0 * jnp.matmul(S, cur, precision=HIGHEST) / b - cur
        prev, cur, rho = cur, rho_next * (2.0 * t_cur - rho * prev), rho_next
    return cur


def _whiten(Y):
    """``Q = Y·U·diag(1/√max(D_j, TOL·D_max))`` from ``YᵀY = U·diag(D)·Uᵀ`` (one batched
    eigensolve): orthonormal columns along the well-determined directions of ``span(Y)``,
    shorter ones along the rest (:data:`WHITENING_TOL`); no direction is dropped, so the next
    step's block keeps its rank."""
    D, U = jnp.linalg.eigh(matmul_tn(Y, Y, HIGHEST))  # ascending
    floor = WHITENING_TOL * jnp.maximum(D[..., -1:], 0.0)
    floor = jnp.where(floor > 0, floor, 1.0)
    M = U * jax.lax.rsqrt(jnp.maximum(D, floor))[..., None, :]
    return jnp.matmul(Y, M, precision=HIGHEST)


def refine_warm_block(S, V, degree: int):
    """The top eigenpair of each positive semidefinite ``S`` (``[*batch, s, s]``, a short-side
    Gram) from a warm block ``V`` (``[*batch, s, p]``, e.g. the previous step's ``Q``).

    .. math::

       Y = \\frac{T_k(2S/b − 1)\\,V}{T_k(2q/b − 1)},\\quad Q = \\operatorname{whiten}(Y),\\quad
       QᵀSQ\\,c = θ_{\\max}c,\\quad z = Qc,\\quad λ = \\frac{zᵀSz}{zᵀz},

    with ``b`` the mean and ``q`` the largest Rayleigh quotient of ``V``'s columns. The
    projected matrix is formed from ``SQ`` after the whitening, so its round-off is
    ``ε·λ₁``, not ``ε·λ₁/D_min`` (whitening ``YᵀSY`` amplifies it into spurious eigenvalues as
    large as ``λ₁``); ``λ`` is the exact Rayleigh quotient of ``z`` from ``z`` and ``Sz``, a
    lower bound of ``λ₁(S)``. Operations (any batch size): ``degree + 4`` products with
    ``S``-sized or block-sized operands, two ``p×p`` products, two batched eigensolves and
    three reductions.

    Args:
      S: ``[*batch, s, s]`` symmetric positive semidefinite (float32 or float64).
      V: ``[*batch, s, p]`` the warm block (any column scaling; not all zero).
      degree: the filter's degree ``k ≥ 1``.

    Returns:
      ``(λ [*batch], z [*batch, s], Q [*batch, s, p])``: the Rayleigh quotient ``zᵀSz`` of
      the unit Ritz vector ``z`` (0 for ``S = 0``, with ``z = e₀``) and the next warm
      block.
    """
    V = V.astype(S.dtype)
    Q = _whiten(_chebyshev(S, V, max(int(degree), 1)))
    SQ = jnp.matmul(S, Q, precision=HIGHEST)
    Hq = matmul_tn(Q, SQ, HIGHEST)
    c = jnp.linalg.eigh(0.5 * (Hq + jnp.swapaxes(Hq, -1, -2)))[1][..., -1]
    zs = jnp.einsum(
        "...ip,...p->...i", jnp.stack([Q, SQ], axis=-3), c[..., None, :], precision=HIGHEST
    )
    z, Sz = zs[..., 0, :], zs[..., 1, :]
    zz, zsz = sums(z * z, z * Sz, axis=(-1,), fused=True)
    ok = zz > 0
    lam = jnp.where(ok, jnp.maximum(zsz, 0.0) / jnp.where(ok, zz, 1.0), 0.0)
    e0 = jnp.zeros_like(z).at[..., 0].set(1.0)
    unit = jnp.where(ok[..., None], z * jax.lax.rsqrt(jnp.where(ok, zz, 1.0))[..., None], e0)
    return lam, unit, Q


def other_side(x, z, lam):
    """The top singular vector on ``x``'s long side from the unit short-side one ``z``:
    ``xᵀz/‖xᵀz‖`` (wide ``x``) or ``xz/‖xz‖`` (tall), with ``‖xᵀz‖² = zᵀSz = λ`` (``S`` the
    short-side Gram; :func:`refine_warm_block`'s ``λ``), so no reduction. A zero ``x`` gives
    a zero vector.

    Args:
      x: ``[*batch, rows, cols]``.
      z: ``[*batch, s]`` unit, ``s = min(rows, cols)``.
      lam: ``[*batch]`` ``zᵀSz``.
    """
    wide = x.shape[-2] <= x.shape[-1]
    spec = "...sl,...s->...l" if wide else "...ls,...s->...l"
    y = jnp.einsum(spec, x.astype(z.dtype), z, precision=HIGHEST)
    return y * jnp.where(lam > 0, jax.lax.rsqrt(jnp.where(lam > 0, lam, 1.0)), 0.0)[..., None]
