"""Small positive semidefinite and triangular matrices (``[*batch, p, p]``) with batched
matmuls only: the top eigenvector by repeated squaring and a triangular inverse. On CPU a
LAPACK eigensolver or triangular solve runs one matrix at a time; these run the whole batch
(see :func:`~manifold_optax.linalg.per_matrix`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from manifold_optax.linalg._ops import unroll_fixed_loops

__all__ = ["top_eigvec_psd", "lower_inverse", "squarings_between_normalizations"]


def squarings_between_normalizations(p: int) -> int:
    """How many squarings of a trace-normalized ``p×p`` PSD matrix stay in float32's normal
    range: after normalization its top eigenvalue is at least ``1/p``, after ``k`` more
    squarings at least ``p^(−2^k)``, kept above ``2^−100`` (the smallest normal float32 is
    ``2^−126``). 4 for ``p = 32``."""
    k = 1
    while 2 ** (k + 1) * math.log2(max(p, 2)) <= 100:
        k += 1
    return k


def top_eigvec_psd(H, squarings: int):
    """The top eigenvector of symmetric positive semidefinite ``H`` (``[*batch, p, p]``) by
    repeated squaring: ``A ← A²`` ``squarings`` times, renormalized to unit trace every
    :func:`squarings_between_normalizations` squarings (4 for ``p = 32``; each
    normalization is a reduction and a pass, a kernel launch each on a GPU), gives
    ``H^P/tr(H^P)``, ``P = 2^squarings``, whose column with the largest diagonal entry is the
    top eigenvector up to components of relative size ``√p·(λ_i/λ₁)^P``. Its Rayleigh
    quotient is then off by at most ``p·max_δ δ(1−δ)^{2P}·λ₁ ≈ p·λ₁/(2eP)`` (4e-7 relative
    for ``p = 32`` at 24 squarings), whatever the gaps: eigenvalues too close to separate
    are also too close to matter. Only batched matmuls (no per-matrix LAPACK call, which runs
    one matrix at a time on CPU: :func:`~manifold_optax.linalg.per_matrix`)."""
    hp = jax.lax.Precision.HIGHEST

    def normalized(A):
        t = jnp.trace(A, axis1=-2, axis2=-1)[..., None, None]
        return A / jnp.where(t > 0, t, 1.0)

    def squared(A, times):
        for _ in range(times):
            A = jnp.matmul(A, A, precision=hp)
        return normalized(A)

    k = min(squarings_between_normalizations(H.shape[-1]), max(squarings, 1))
    A = jax.lax.fori_loop(
        0,
        squarings // k,
        lambda _, A: squared(A, k),
        normalized(H),
        unroll=unroll_fixed_loops(),
    )
    A = squared(A, squarings % k) if squarings % k else A
    j = jnp.argmax(jnp.diagonal(A, axis1=-2, axis2=-1), axis=-1)
    c = jnp.take_along_axis(A, j[..., None, None], axis=-1)[..., 0]
    n = jnp.linalg.norm(c, axis=-1, keepdims=True)
    e0 = jnp.zeros_like(c).at[..., 0].set(1.0)
    return jnp.where(n > 0, c / jnp.where(n > 0, n, 1.0), e0)


def lower_inverse(L):
    """``L⁻¹`` for lower-triangular ``L`` (``[*b, p, p]``, nonzero diagonal) with matmuls only:
    ``L = (I + N)·D`` with ``N`` strictly lower, hence nilpotent, so
    ``(I + N)⁻¹ = (I − N)(I + N²)(I + N⁴)···`` (``⌈log₂ p⌉`` factors, exact)."""
    hp = jax.lax.Precision.HIGHEST
    p = L.shape[-1]
    eye = jnp.eye(p, dtype=L.dtype)
    d = jnp.diagonal(L, axis1=-2, axis2=-1)
    d = jnp.where(d != 0, d, 1.0)
    M = eye - L / d[..., None, :]  # −N
    inv = eye + M
    for _ in range(max(0, (p - 1).bit_length() - 1)):
        M = jnp.matmul(M, M, precision=hp)
        inv = jnp.matmul(inv, eye + M, precision=hp)
    return inv / d[..., :, None]
