"""Top singular values and vectors: power iteration, and the warm-started block (subspace)
iteration with a Chebyshev filter and Rayleigh–Ritz that the spectral sphere uses.

See ``docs/math.md`` (Top singular pair). Shapes are ``[*batch, rows, cols]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from manifold_optax._platform import on_cpu
from manifold_optax.linalg._ops import (
    accum_dtype,
    check_matrix,
    matmul_tn,
    per_matrix,
    unroll_fixed_loops,
)
from manifold_optax.linalg._small import lower_inverse, top_eigvec_psd
from manifold_optax.linalg.warm_block import other_side, refine_warm_block

__all__ = ["top_singular_pair", "top_singular_subspace"]


def top_singular_pair(x: jax.Array, v0: jax.Array | None = None, iters: int = 30):
    """Top singular triple ``(σ₁, u₁, v₁)`` of ``x`` by power iteration on ``xᵀx``.

    ``v ← xᵀxv/‖xᵀxv‖``; ``σ₁ = ‖xv‖``, ``u₁ = xv/σ₁``. Warm-start it with the previous ``v``
    (``v0``, shape ``[*batch, cols]``) and a handful of iterations suffice during training; from
    cold (``v0=None``) it starts at the largest row of ``x``. The error in ``v`` shrinks like
    ``(σ₂/σ₁)^{2k}``. A zero matrix returns ``σ = 0`` and unit vectors.

    Returns:
      ``(sigma [*batch], u [*batch, rows], v [*batch, cols])`` in float32 (float64 for float64).
    """
    x = jnp.asarray(x)
    check_matrix(x)
    acc = accum_dtype(x.dtype)
    xa = x.astype(acc)
    hp = jax.lax.Precision.HIGHEST
    if v0 is None:
        row_norms = jnp.sum(xa * xa, axis=-1)
        idx = jnp.argmax(row_norms, axis=-1)
        v = jnp.take_along_axis(xa, idx[..., None, None], axis=-2)[..., 0, :]
        v = v + 1e-3 * jnp.linalg.norm(v, axis=-1, keepdims=True) / np.sqrt(x.shape[-1])
    else:
        v = jnp.asarray(v0, dtype=acc)

    def _unit(vec, fallback):
        nrm = jnp.linalg.norm(vec, axis=-1, keepdims=True)
        return jnp.where(nrm > 0, vec / jnp.where(nrm > 0, nrm, 1.0), fallback)

    ones_cols = jnp.ones(x.shape[:-2] + x.shape[-1:], acc) / np.sqrt(x.shape[-1])
    ones_rows = jnp.ones(x.shape[:-1], acc) / np.sqrt(x.shape[-2])
    v = _unit(v, ones_cols)

    def body(_, v):
        xv = jnp.einsum("...ij,...j->...i", xa, v, precision=hp)
        return _unit(jnp.einsum("...ij,...i->...j", xa, xv, precision=hp), v)

    v = jax.lax.fori_loop(0, int(iters), body, v)
    xv = jnp.einsum("...ij,...j->...i", xa, v, precision=hp)
    sigma = jnp.linalg.norm(xv, axis=-1)
    u = _unit(xv, ones_rows)
    return sigma, u, v


def _chebyshev_filter(apply, V, degree: int, col_norms):
    """``T_k(t(A))·V`` with ``t(λ) = 2λ/b − 1`` (degree ``k``, ``apply(V) = A·V``, ``A``
    positive semidefinite): the Chebyshev polynomial that stays within ±1 on ``[0, b]`` and
    grows fastest above it (Zhou & Saad 2007, Chebyshev-filtered subspace iteration). ``b``
    is the mean Rayleigh quotient of the columns of ``V`` (≤ λ₁ for any ``V``): directions
    above it are amplified by ``T_k(2λ/b − 1) ≈ e^{2k√(λ/b − 1)}`` against at most 1 for
    everything below, where ``k`` power steps give only ``(λ/b)^k``. Columns are rescaled
    every step (the recurrence is linear per column, so rescaling both of the last two
    iterates by the same factor changes nothing but the scale)."""
    AV = apply(V)
    vv = jnp.sum(V * V, axis=-2, keepdims=True)
    q = jnp.sum(V * AV, axis=-2, keepdims=True) / jnp.where(vv > 0, vv, 1.0)
    b = jnp.mean(q, axis=-1, keepdims=True)
    b = jnp.where(b > 0, b, 1.0)
    prev, cur = V, 2.0 * AV / b - V

    def step(_, c):
        prev, cur = c
        nxt = 4.0 * apply(cur) / b - 2.0 * cur - prev
        n = col_norms(nxt)
        return cur / n, nxt / n

    return jax.lax.fori_loop(0, degree - 1, step, (prev, cur), unroll=unroll_fixed_loops())[1]


def _ritz_top(V, SV, squarings: int = 24):
    """Rayleigh–Ritz for the top eigenpair of a PSD ``S`` on ``span(V)`` (``V``: ``[*b, s, p]``,
    ``SV = S·V``), with no QR or eigensolver of the ``s×p`` block.

    ``B = VᵀV`` gets a shifted Cholesky factor ``B + δI = LLᵀ`` (``δ = 3·10⁻⁶·tr(B)/p``: the
    filtered block may be nearly rank-deficient), so ``Q = V·L⁻ᵀ`` spans ``span(V)`` with
    ``QᵀQ ≈ I``; the top eigenvector ``c`` of ``Ĥ = L⁻¹(VᵀSV)L⁻ᵀ`` (``QᵀSQ``) comes from
    :func:`~manifold_optax.linalg._small.top_eigvec_psd`, and the eigenvalue is the exact Rayleigh quotient of
    ``z = Qc = Vw`` (``w = L⁻ᵀc``): ``wᵀ(VᵀSV)w / wᵀBw`` (a lower bound of ``λ₁(S)``,
    quadratically accurate in the angle of ``z``, whatever the orthonormality of ``Q``).
    On CPU only the ``p×p`` Cholesky is a LAPACK call; the triangular inverse is matmuls
    (:func:`~manifold_optax.linalg._small.lower_inverse`, batched, where a LAPACK triangular solve runs per matrix). On
    accelerators (``mo.lowering_for``) the Cholesky of both shifts, the triangular inverse
    and the ``p×p`` eigenvector are one batched solver call each instead of the matmuls.
    Returns ``(λ [*b], z/‖z‖ [*b, s], Q)``;
    ``Q`` is the next warm start (it spans the same subspace as ``V``)."""
    hp = jax.lax.Precision.HIGHEST
    mm = lambda a, b: jnp.matmul(a, b, precision=hp)
    t = lambda a: jnp.swapaxes(a, -1, -2)
    p = V.shape[-1]
    eye = jnp.eye(p, dtype=V.dtype)
    B = matmul_tn(V, V, hp)
    H = matmul_tn(V, SV, hp)  # (wᵀHw below needs no symmetrization; Ĥ is symmetrized once)
    tr = jnp.trace(B, axis1=-2, axis2=-1)[..., None, None]
    scale = jnp.where(tr > 0, tr, 1.0) / p  # the mean squared column norm

    # Shift 3e-6: directions of V above ~2e-3 of the columns' scale keep full weight in Q, as
    # with a QR. Should the float32 Gram's round-off make that indefinite, shift 1e-3.
    def cholesky(B, scale):
        L = jnp.linalg.cholesky(B + 3e-6 * scale * eye)
        ok = jnp.all(jnp.isfinite(L), axis=(-2, -1), keepdims=True)
        return jnp.where(ok, L, jnp.linalg.cholesky(B + 1e-3 * scale * eye))

    if on_cpu():
        Li = lower_inverse(per_matrix(cholesky, B, scale))
    else:
        both = jnp.linalg.cholesky(jnp.stack([B + 3e-6 * scale * eye, B + 1e-3 * scale * eye]))
        ok = jnp.all(jnp.isfinite(both[0]), axis=(-2, -1), keepdims=True)
        L = jnp.where(ok, both[0], both[1])
        Li = jax.lax.linalg.triangular_solve(
            L, jnp.broadcast_to(eye, L.shape), left_side=True, lower=True
        )
    Hq = mm(mm(Li, H), t(Li))
    Hs = 0.5 * (Hq + t(Hq))
    if on_cpu():
        c = top_eigvec_psd(Hs, squarings)
    else:
        c = jnp.linalg.eigh(Hs)[1][..., :, -1]
    # z = Qc = V·w with w = L⁻ᵀc, so ‖z‖² = wᵀBw and zᵀSz = wᵀHw: no p×p products with B.
    w = jnp.einsum("...ji,...j->...i", Li, c, precision=hp)
    quad = lambda M: jnp.einsum("...i,...ij,...j->...", w, M, w, precision=hp)
    cb = quad(B)
    cb = jnp.where(cb > 0, cb, 1.0)
    lam = quad(H) / cb
    z = jnp.einsum("...ij,...j->...i", V, w, precision=hp) / jnp.sqrt(cb)[..., None]
    return jnp.maximum(lam, 0.0), z, mm(V, t(Li))


def _best_column(V, SV):
    """The column of ``V`` (``[*b, s, p]``, ``SV = S·V``) with the largest Rayleigh quotient
    ``vᵀSv/vᵀv``: ``[*b, s]``, unnormalized. Each quotient reads one column, so it is as
    accurate as the column, however close the columns are to each other."""
    q = _rayleigh_quotients(V, SV)
    j = jnp.argmax(q, axis=-1)
    return jnp.take_along_axis(V, j[..., None, None], axis=-1)[..., 0]


def _rayleigh_quotients(X, Y):
    """``xᵀSx/xᵀx`` for each column of ``X`` (``Y = S·X``; 0 for a zero column)."""
    xx = jnp.sum(X * X, axis=-2)
    return jnp.sum(X * Y, axis=-2) / jnp.where(xx > 0, xx, 1.0)


# Rayleigh quotients closer than this (relative) are a tie, broken by the residual (float32
# round-off in a quotient is ~1e-7: it cannot rank two vectors within ~5e-4 of the top one).
_QUOTIENT_TIE = 3e-7


def _checked_power_step(apply, z, fallback, steps: int = 2):
    """``steps`` power steps from the better of two vectors: ``(λ, y/‖y‖)`` with ``y = S·x``
    the last iterate and ``λ = ‖Sx‖²/xᵀSx`` (a Rayleigh quotient of ``S^{1/2}x``: a lower bound
    of ``λ₁(S)``, at least ``xᵀSx/xᵀx``, whatever the scale of ``x``). The start is whichever of
    ``z`` (the Ritz vector) and ``fallback`` (:func:`_best_column`) has the larger Rayleigh
    quotient, each computed from its own vector; quotients within 3e-7 of each other (their
    float32 round-off; the quotient is second order in the angle to the top vector) are a
    tie, which the smaller residual ``‖Sx − qx‖/‖x‖`` (first order) breaks.

    Why the guard: a block the filter has collapsed onto the top direction (a top singular
    value well above the rest, e.g. σ₁ = 3σ₂) has a numerically rank-one ``VᵀV``, and the
    whitened ``QᵀSQ`` of :func:`_ritz_top` then carries spurious eigenvalues of either sign,
    as large as ``λ₁``, whose eigenvectors are noise; the block's best column stays accurate.
    Why the power steps: they divide the error of either start by ``λ₁/λ₂`` each (nothing is
    lost in a flat top cluster, where any vector of the cluster will do). The suite checks
    ``Θ = u₁v₁ᵀ`` against a float64 SVD at several gaps ``σ₁/σ₂``. ``S`` positive
    semidefinite (``apply`` multiplies ``[*b, s, k]`` blocks by it); ``z``, ``fallback``:
    ``[*b, s]``."""
    X = jnp.stack([z, fallback], axis=-1)
    Y = apply(X)
    # From the vectors themselves (the Ritz vector's Gram-based norm is off by up to ~3e-4 in
    # a collapsed block: enough to win against a worse vector).
    xx = jnp.sum(X * X, axis=-2)
    xx = jnp.where(xx > 0, xx, 1.0)
    q = jnp.sum(X * Y, axis=-2) / xx
    R = Y - q[..., None, :] * X
    res = jnp.sum(R * R, axis=-2) / xx
    close = jnp.abs(q[..., 0] - q[..., 1]) <= _QUOTIENT_TIE * jnp.maximum(q[..., 0], q[..., 1])
    ritz = jnp.where(close, res[..., 0] <= res[..., 1], q[..., 0] >= q[..., 1])[..., None]
    x = jnp.where(ritz, X[..., 0], X[..., 1])
    y = jnp.where(ritz, Y[..., 0], Y[..., 1])

    def unit(a):
        n = jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True))
        return a / jnp.where(n > 0, n, 1.0)

    for _ in range(steps - 1):
        x = unit(y)
        y = apply(x[..., None])[..., 0]
    xy, yy = jnp.sum(x * y, axis=-1), jnp.sum(y * y, axis=-1)
    lam = jnp.where(xy > 0, yy / jnp.where(xy > 0, xy, 1.0), 0.0)
    return lam, jnp.where(yy[..., None] > 0, unit(y), unit(x))


def top_singular_subspace(
    x: jax.Array,
    v0: jax.Array | None = None,
    iters: int = 10,
    block: int = 8,
    *,
    gram: bool = True,
    chebyshev: bool = True,
):
    """Top singular triple by block power (subspace) iteration with Rayleigh–Ritz.

    The block lives on the short side ``s = min(rows, cols)`` (right singular vectors for tall
    ``x``, left for wide and square: its products are the cheap ones, and the square Gram
    ``xxᵀ`` is the form XLA:CPU multiplies fastest, see :func:`matmul_tn`):
    ``Y ← AᵀA·Y`` for ``iters`` steps on a ``[*batch, s, p]`` block
    (``p = min(block, rows, cols)``, ``A = x`` or ``xᵀ``), with the columns rescaled to unit
    norm each step (subspace iteration orthonormalizes only for numerics; directions more
    than ~10⁶ below the top in ``(σ_j/σ₁)^{2·iters}`` are lost, and none of them matter for
    the top singular value). Rayleigh–Ritz on the block then
    gives ``σ₁`` and the top pair (:func:`_ritz_top`: a shifted Cholesky of the ``p×p``
    block Gram and the top eigenvector of ``QᵀAᵀAQ`` by repeated squaring: batched matmuls,
    no per-matrix QR or eigensolver), then
    two power steps from the better of the Ritz vector and the block's best column
    (:func:`_checked_power_step`: a block collapsed onto a well-separated top direction
    defeats the Cholesky; ``σ₁`` is the Rayleigh quotient of ``S^{1/2}x``, a lower bound).
    Unlike a single vector, the block resolves a cluster of up to ``p`` nearly equal top
    singular values (which the spectral sphere produces), so ``σ₁`` stays accurate there.
    Warm-start with the previous block (it need not be orthonormal).

    ``chebyshev=True`` (warm starts): instead of ``iters`` power steps, a degree-``iters``
    Chebyshev filter that stays within ±1 below the block's mean Rayleigh quotient ``b`` and
    grows like ``e^{2k√(λ/b−1)}`` above it, where power steps grow like ``(λ/b)^k`` (Zhou &
    Saad 2007); the same products. With the flat top spectrum the spectral sphere produces,
    this is what makes a few steps enough (``benchmarks/spectral_accuracy.py`` measures the
    worst ``|σ̂₁ − σ₁|/σ₁`` over a training run for either choice). Cold starts always take
    power steps (with a QR every 4).

    On accelerators (``mo.lowering_for``) a warm start with ``chebyshev`` and ``gram`` takes
    :func:`~manifold_optax.linalg.warm_block.refine_warm_block` instead: the filter scaled by
    scalars rather than normalized every step, and Rayleigh–Ritz on the whitened block by two
    batched ``p×p`` eigensolves (``degree + 4`` products and three reductions in all, for
    any batch).

    ``gram=True`` forms the short-side Gram ``AᵀA`` once (one compute-bound product) and
    iterates with it: each step is then an ``s×s`` by ``s×p`` product instead of two thin
    products with ``A``, which run far below the matmul rate on CPUs (memory-bound). The
    eigenvalues of the float32 Gram are accurate to ``‖A‖²·ε``, so ``σ₁`` keeps float32
    accuracy (the suite checks it against a float64 SVD).

    Returns ``(sigma [*batch], u [*batch, rows], v [*batch, cols], Q [*batch, s, p])``.
    """
    x = jnp.asarray(x)
    check_matrix(x)
    acc = accum_dtype(x.dtype)
    xa = x.astype(acc)
    wide = x.shape[-2] <= x.shape[-1]
    s_dim, l_dim = (x.shape[-2], x.shape[-1]) if wide else (x.shape[-1], x.shape[-2])
    p = max(1, min(block, s_dim))
    hp = jax.lax.Precision.HIGHEST
    # Products with x as stored (no transposed copy). "s" is the short side, "l" the long
    # one.
    xs = "...sl" if wide else "...ls"
    ein = lambda spec, *ops: jnp.einsum(spec, *ops, precision=hp)
    to_long = lambda V: ein(f"{xs},...sp->...lp", xa, V)  # A·V
    to_short = lambda Y: ein(f"{xs},...lp->...sp", xa, Y)  # Aᵀ·Y
    if v0 is None:
        # Cold start: the p largest long-side slices (deterministic), plus a fixed
        # pseudo-random block.
        key = jax.random.PRNGKey(0)
        first = xa[..., :p, :] if not wide else jnp.swapaxes(xa[..., :, :p], -1, -2)
        V = jnp.swapaxes(first, -1, -2) + jax.random.normal(key, x.shape[:-2] + (s_dim, p), acc) * (
            1e-2 * jnp.max(jnp.abs(xa), axis=(-2, -1), keepdims=True) + 1e-30
        )
        # A whole number of 4-step chunks, so the block is orthonormal when Rayleigh–Ritz
        # starts: power steps after the last QR collapse the columns onto the top direction
        # (e.g. 2 steps at σ₂²/σ₁² = 0.46), and the shifted Cholesky in _ritz_top then
        # cannot resolve the top vector within that near-rank-one block (σ₁, a Rayleigh
        # quotient, is unharmed).
        iters = 4 * math.ceil(max(int(iters), 30) / 4)
    else:
        V = jnp.asarray(v0, acc)

    if gram:
        # (Not symmetrized: only the p×p Rayleigh quotient below needs exact symmetry.)
        S = ein(f"{xs},{xs.replace('s', 't')}->...st", xa, xa) if wide else matmul_tn(xa, xa, hp)
        apply = lambda V: jnp.matmul(S, V, precision=hp)
    else:
        apply = lambda V: to_short(to_long(V))

    def col_norms(Y):
        n = jnp.sqrt(jnp.sum(Y * Y, axis=-2, keepdims=True))
        return jnp.where(n > 0, n, 1.0)

    def unit_columns(Y):
        return Y / col_norms(Y)

    def body(_, V):
        return unit_columns(apply(V))

    # Cold starts take many steps: orthonormalize every 4 so no direction is lost on the way.
    def chunk(_, V):
        return per_matrix(jnp.linalg.qr, jax.lax.fori_loop(0, 4, body, V))[0]

    if gram and v0 is not None and chebyshev and int(iters) > 0 and not on_cpu():
        # Accelerators: no loop, per-step norm or checked power step (see warm_block).
        lam, short, Q = refine_warm_block(S, V, int(iters))
        long = other_side(xa, short, lam)
        return (jnp.sqrt(lam),) + ((short, long) if wide else (long, short)) + (Q,)
    V = unit_columns(V)
    if v0 is None:
        V = jax.lax.fori_loop(0, int(iters) // 4, chunk, V)
    rest = int(iters) % 4 if v0 is None else int(iters)
    if v0 is not None and chebyshev and rest > 0:
        V = _chebyshev_filter(apply, V, rest, col_norms)
    else:
        V = jax.lax.fori_loop(0, rest, body, V)
    SV = apply(V)
    _, z, Q = _ritz_top(V, SV)
    lam, v = _checked_power_step(apply, z, _best_column(V, SV))
    V = Q
    sigma = jnp.sqrt(lam)
    u = ein(f"{xs},...s->...l", xa, v)
    n_u = jnp.sqrt(jnp.sum(u * u, axis=-1, keepdims=True))
    u = u / jnp.where(n_u > 0, n_u, 1.0)
    if wide:
        u, v = v, u
    return sigma, u, v, V
