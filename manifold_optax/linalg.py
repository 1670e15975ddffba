"""Matrix functions: the polar factor ``msign`` by Newton–Schulz, its SVD reference, and norms.

``msign(G) = UVᵀ`` for the thin SVD ``G = UΣVᵀ``; it is the gradient of the nuclear norm and the
steepest-descent direction under the spectral norm (MATH.md §1–2). Shapes follow the jaxtyping
convention ``[*batch, rows, cols]``: the last two axes are the matrix and any leading axes are a
batch.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from manifold_optax import schedules

__all__ = [
    "msign",
    "msign_svd",
    "nuclear_norm",
    "spectral_norm",
    "top_singular_pair",
    "newton_schulz_flops",
]

Normalization = Literal["schatten8", "frobenius"]
_NORMALIZATIONS = ("schatten8", "frobenius")


def _check_matrix(x: jax.Array, name: str = "x") -> None:
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 axes (the last two are the matrix), got shape {x.shape}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must have a real floating dtype, got {x.dtype}")


def _accum_dtype(dtype) -> jnp.dtype:
    """Reductions and coefficients: float64 for float64 inputs, float32 otherwise."""
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _mm(a, b, precision, out_dtype):
    return jnp.matmul(a, b, precision=precision, preferred_element_type=out_dtype)


def matmul_tn(a, b, precision=None, out_dtype=None):
    """``aᵀb`` (both contracted over their row axis). On CPU ``aᵀ`` is first materialized (a
    copy; the optimization barrier keeps XLA from folding the transpose back into the product),
    because XLA:CPU ran a product that contracts the lhs's leading axis slowly (first measured
    on 2 cores: 1.2–2.2× slower than ``ab`` for 256×256, 15% for 1024×256 by 256). Re-measured
    with jaxlib 0.10.2, the copy no longer pays in isolation (the 1024×256 Gram: 0.64 ms without
    it, 0.84 ms with it), and in the whole optimizer steps dropping it changed nothing
    measurable (step_bench's tree, one process, 15 rounds, new/old: ``muon`` 0.995, spectral
    sphere 1.019, Stiefel 0.994, each inside its ±3–5% quartiles), so it stays. Other backends
    take the transpose for free."""
    t = jnp.swapaxes(a, -1, -2)
    if jax.default_backend() == "cpu":
        t = jax.lax.optimization_barrier(t)
    return jnp.matmul(t, b, precision=precision, preferred_element_type=out_dtype)


def _gram(x, precision, out_dtype, tall: bool = False):
    """The short-side Gram matrix: ``XXᵀ`` (wide ``x``) or ``XᵀX`` (``tall``)."""
    if tall:
        return matmul_tn(x, x, precision, out_dtype)
    return _mm(x, jnp.swapaxes(x, -1, -2), precision, out_dtype)


def _left(B, x, precision, out_dtype, tall: bool = False):
    """``B·X`` in the wide view of ``x``: ``B·X`` (wide) or ``X·B`` (``tall``), where ``B`` is
    symmetric (``X·B = (B·Xᵀ)ᵀ``) or, in the Gram iteration, already the transposed factor; no
    transpose anywhere (XLA:CPU turned ``X·Bᵀ`` with ``B = P·Q`` into products of transposed
    m×m operands, which it runs on a slow generic kernel, see :func:`matmul_tn`)."""
    if tall:
        return _mm(x, B, precision, out_dtype)
    return _mm(B, x, precision, out_dtype)


def newton_schulz_flops(shape: tuple[int, ...], steps: int) -> float:
    """FLOPs of ``steps`` quintic Newton–Schulz steps: ``(4m²n + 2m³)`` per step, m the short side."""
    *batch, rows, cols = shape
    m, n = min(rows, cols), max(rows, cols)
    return float(np.prod(batch, dtype=np.float64)) * steps * (4.0 * m * m * n + 2.0 * m**3)


def msign(
    x: jax.Array,
    steps: int | None = None,
    coeffs="polar_express",
    *,
    normalization: Normalization = "schatten8",
    precision=None,
    eps: float = 1e-8,
    compute_dtype=None,
    safety: float | None = None,
    method: str = "auto",
    gram_restart: int = 2,
) -> jax.Array:
    r"""Matrix sign / polar factor ``msign(x) = UVᵀ`` by Newton–Schulz iterations.

    Math (MATH.md §2): read ``X`` wide (a tall input runs the same steps on its transpose,
    through ``XᵀX`` and ``X·B``, with no transpose of ``X`` in the product; each step costs
    ``4m²n + 2m³`` FLOPs with ``m`` the short side), normalize so every singular value is ≤ 1,
    then apply the odd quintics of a schedule, ``A = XXᵀ; B = bA + cA²; X ← aX + BX``, which act
    on the singular values as ``σ ↦ aσ + bσ³ + cσ⁵`` and leave the singular vectors alone.

    Normalization: the input is first divided by its largest entry (so no square overflows or
    underflows at any finite scale), then by its Frobenius norm. With ``"schatten8"`` (the
    default) the first step's own Gram square ``A² = (XXᵀ)²`` gives the Schatten-8 norm
    ``‖A²‖_F^{1/4} = (Σσ⁸)^{1/8}`` at no extra matmul; dividing by it over-estimates σ_max by at
    most rank^{1/8} (Frobenius: up to rank^{1/2}), so the small singular values start inside the
    schedule's design range. ``"frobenius"`` is the plain ``X/(‖X‖_F + eps)`` of optax and
    modded-nanogpt, for parity. The Polar Express schedule divides by a further 1.01 (its
    safety factor).

    Default: ``steps=5`` with the Polar Express schedule — the cost of Muon's usual 5 Jordan
    steps, with max|σ−1| ≈ 0.13 on spectra spanning [1e-2, 1]·σ_max (Jordan: 0.32); use
    ``steps=8`` for float32-accurate polar factors (< 2e-3 on [1e-3, 1]·σ_max at rank 512).

    Args:
      x: ``[*batch, rows, cols]`` real floating array.
      steps: Newton–Schulz steps; default 5 for named schedules, the table's length otherwise.
      coeffs: ``"polar_express"``, ``"jordan"``, ``"you"`` (5 steps only) or a ``(k, 3)``
        (or ``(3,)``) table of ``(a, b, c)`` rows (see :func:`schedules.get_schedule`).
      normalization: ``"schatten8"`` or ``"frobenius"``.
      precision: passed to every matmul (``jax.lax.Precision``); ``None`` is the backend
        default, which on GPU/TPU runs float32 matmuls in reduced precision.
      eps: added to the Frobenius norm (only matters for an all-zero matrix).
      compute_dtype: dtype of the matmul inputs; default ``x.dtype`` (bfloat16 stays bfloat16).
        Coefficients, normalization and matmul accumulation stay float32 (float64 for float64).
      safety: extra factor on the normalization; default 1.01 for the named Polar Express
        schedule (whose rows carry the matching safety scaling) and 1 otherwise.
      method: ``"standard"`` (iterate on X), ``"gram"`` (Gram Newton–Schulz: iterate on the
        m×m Gram matrix, multiply X once at the end, restart every ``gram_restart`` steps for
        stability but never for a last lone step — ≈ ``8m²n + 28m³`` instead of
        ``20m²n + 10m³`` FLOPs for 5 steps), or
        ``"auto"``: Gram when the long side is ≥ 1.5× the short side and the matmuls run in
        float32/float64 (bfloat16 keeps the standard iteration).

    Returns:
      An array of ``x``'s shape and dtype. A zero matrix gives zero; NaN/Inf inputs propagate.

    References:
      Jordan et al., "Muon: An optimizer for hidden layers" (2024);
      Amsel, Persson, Musco & Gower, "The Polar Express" (arXiv:2505.16932, 2025);
      Su, "msign" posts (kexue.fm) for the Schatten-norm normalization.
    """
    x = jnp.asarray(x)
    _check_matrix(x)
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    if method not in ("auto", "standard", "gram"):
        raise ValueError(f"method must be 'auto', 'standard' or 'gram', got {method!r}")
    if x.ndim > 2 and math.prod(x.shape[:-2]) == 1:
        # A batch of one runs as a plain matrix: XLA:CPU runs batch-1 dots with a transposed
        # operand up to 1.5× slower than 2-D ones (16 separate [1, 256, 256] msigns: 33 ms
        # against 23 ms as 256×256 on 2 cores).
        kw = dict(normalization=normalization, precision=precision, eps=eps)
        kw |= dict(compute_dtype=compute_dtype, safety=safety, method=method)
        out = msign(x.reshape(x.shape[-2:]), steps, coeffs, gram_restart=gram_restart, **kw)
        return out.reshape(x.shape)
    table, steps = schedules.get_schedule(coeffs, steps)
    if safety is None:
        is_pe = isinstance(coeffs, str) and coeffs.lower().replace("-", "_") == "polar_express"
        safety = 1.0 + schedules.PE_SAFETY if is_pe else 1.0

    in_dtype = x.dtype
    acc = _accum_dtype(in_dtype)
    cdt = jnp.dtype(compute_dtype) if compute_dtype is not None else in_dtype
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        return x
    # The iteration is written for a wide X (short-side Gram XXᵀ, products B·X); a tall one
    # runs the same iteration on its transpose through XᵀX (matmul_tn) and X·B (B symmetric),
    # never transposing X around the whole iteration (measured on 2 CPU cores, 4×1024×256:
    # 17.3 ms with those transposes, 15.1 ms without; now 13.2, stored wide 12.3).
    tall = x.shape[-2] > x.shape[-1]

    # Prescale by the largest entry, then by the Frobenius norm (reductions in `acc`).
    xa = x.astype(acc)
    amax = jnp.max(jnp.abs(xa), axis=(-2, -1), keepdims=True)
    xa = xa / jnp.where(amax > 0, amax, 1.0)
    fro = jnp.sqrt(jnp.sum(xa * xa, axis=(-2, -1), keepdims=True))
    if normalization == "frobenius":
        xa = xa / (fro * safety + eps)
    else:
        xa = xa / jnp.where(fro > 0, fro, 1.0)
    X = xa.astype(cdt)
    rows = jnp.asarray(table, dtype=acc)

    m_short, n_long = min(X.shape[-2:]), max(X.shape[-2:])
    use_gram = method == "gram" or (
        method == "auto" and n_long >= 1.5 * m_short and jnp.dtype(cdt).itemsize >= 4
    )
    if use_gram:
        out = _gram_newton_schulz(
            X, rows, steps, normalization, safety, precision, acc, cdt, gram_restart, tall
        )
        return out.astype(in_dtype)

    for i in range(steps):
        a, b, c = rows[i, 0], rows[i, 1], rows[i, 2]
        A = _gram(X, precision, acc, tall)
        A2 = _mm(A.astype(cdt), A.astype(cdt), precision, acc)
        if i == 0 and normalization == "schatten8":
            s8 = jnp.sqrt(jnp.sqrt(jnp.sqrt(jnp.sum(A2 * A2, axis=(-2, -1), keepdims=True))))
            s = jnp.where(s8 > 0, s8 * safety, 1.0)
            X = (X.astype(acc) / s).astype(cdt)
            A, A2 = A / s**2, A2 / s**4
        B = (b * A + c * A2).astype(cdt)
        X = (a * X.astype(acc) + _left(B, X, precision, acc, tall)).astype(cdt)

    return X.astype(in_dtype)


def _gram_newton_schulz(
    X0, rows, steps, normalization, safety, precision, acc, cdt, restart, tall=False
):
    """Gram Newton–Schulz on a Frobenius-normalized ``X0``: ``[*b, m, n]`` with m < n, or its
    transpose when ``tall`` (then ``X_k = X_0·Q_kᵀ``, the same iteration read transposed).

    Every step's polynomial ``P = aI + bA + cA²`` is a polynomial in the initial Gram matrix, so
    ``X_k = Q_k X_0`` with ``Q_k = P_k Q_{k−1}`` and ``A_k = P_k A_{k−1} P_k`` (all m×m; read
    tall, ``X_k = X_0·Q_kᵀ`` accumulates ``Q_kᵀ = Q_{k−1}ᵀ·P_k``: ``P`` is symmetric). Every
    ``restart`` steps ``X`` is formed and its Gram recomputed, which resets the round-off that
    the m×m recursion accumulates — except when a single step would follow: that restart
    would cost two n-sized products to protect one polynomial, and measured in float32
    (1024×256, against the float64 iteration) dropping it leaves the error at the standard
    iteration's (3.6e-6 against 2.7e-6 on a spectrum spanning [1e-3, 1]; 5 steps). So 5 steps
    restart once, after step 2 (Dao et al.'s schedule; MATH.md §2): ``8m²n`` FLOPs in
    n-sized products, not ``12m²n``. Never restarting measured 2e-4.
    """
    m = min(X0.shape[-2:])
    eye = jnp.eye(m, dtype=acc)
    X = X0
    A = _gram(X, precision, acc, tall)
    Q = None
    since = 0
    for i in range(steps):
        a, b, c = rows[i, 0], rows[i, 1], rows[i, 2]
        A2 = _mm(A, A, precision, acc)
        if i == 0 and normalization == "schatten8":
            s8 = jnp.sqrt(jnp.sqrt(jnp.sqrt(jnp.sum(A2 * A2, axis=(-2, -1), keepdims=True))))
            s = jnp.where(s8 > 0, s8 * safety, 1.0)
            X = (X.astype(acc) / s).astype(cdt)
            A, A2 = A / s**2, A2 / s**4
        P = a * eye + b * A + c * A2
        Q = P if Q is None else (_mm(Q, P, precision, acc) if tall else _mm(P, Q, precision, acc))
        since += 1
        if i == steps - 1:
            break
        if since == restart and steps - 1 - i >= 2:
            X = _left(Q.astype(cdt), X, precision, acc, tall).astype(cdt)
            A = _gram(X, precision, acc, tall)
            Q, since = None, 0
        else:
            A = _mm(P, _mm(P, A, precision, acc), precision, acc)
            A = 0.5 * (A + jnp.swapaxes(A, -1, -2))
    return _left(Q.astype(cdt), X, precision, acc, tall)


def _svd_tol(s, shape, dtype):
    return s[..., :1] * max(shape[-2:]) * jnp.finfo(dtype).eps


def msign_svd(x: jax.Array) -> jax.Array:
    """Exact polar factor ``UVᵀ`` from the thin SVD; singular values below ``σ_max·max(m,n)·eps``
    count as zero (so rank-deficient inputs map their null space to zero, like Newton–Schulz).
    Computed in float32 (float64 for float64 inputs), returned in ``x.dtype``."""
    x = jnp.asarray(x)
    _check_matrix(x)
    acc = _accum_dtype(x.dtype)
    u, s, vh = per_matrix(lambda a: jnp.linalg.svd(a, full_matrices=False), x.astype(acc))
    keep = (s > _svd_tol(s, x.shape, acc)).astype(acc)
    return (_mm(u * keep[..., None, :], vh, jax.lax.Precision.HIGHEST, acc)).astype(x.dtype)


def singular_values(x: jax.Array) -> jax.Array:
    """Singular values (descending) of each matrix of ``[*batch, m, n]`` (see :func:`per_matrix`)."""
    return per_matrix(lambda a: jnp.linalg.svd(a, compute_uv=False), x)


def nuclear_norm(x: jax.Array) -> jax.Array:
    """``‖x‖_* = Σσ_i`` over the last two axes (SVD, in float32 or float64)."""
    x = jnp.asarray(x)
    _check_matrix(x)
    return jnp.sum(singular_values(x.astype(_accum_dtype(x.dtype))), axis=-1)


def spectral_norm(x: jax.Array) -> jax.Array:
    """``‖x‖₂ = σ_max`` over the last two axes (exact, by SVD)."""
    x = jnp.asarray(x)
    _check_matrix(x)
    return jnp.max(singular_values(x.astype(_accum_dtype(x.dtype))), axis=-1)


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
    _check_matrix(x)
    acc = _accum_dtype(x.dtype)
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


def _unroll_fixed_loops() -> bool:
    """Whether the short fixed-count loops of the warm top-singular-value path are unrolled:
    off CPU, where XLA runs a while loop by reading its predicate back to the host every
    iteration (a stall per iteration, 29 per matrix shape and step in the spectral-sphere
    retraction; unrolled, that step went from 3.43 to 2.85 ms on an H100). XLA:CPU has no such
    stall, and its program is left as it was."""
    return jax.default_backend() != "cpu"


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

    return jax.lax.fori_loop(0, degree - 1, step, (prev, cur), unroll=_unroll_fixed_loops())[1]


def _squarings_between_normalizations(p: int) -> int:
    """How many squarings of a trace-normalized ``p×p`` PSD matrix stay in float32's normal
    range: after normalization its top eigenvalue is at least ``1/p``, after ``k`` more
    squarings at least ``p^(−2^k)``, kept above ``2^−100`` (the smallest normal float32 is
    ``2^−126``). 4 for ``p = 32``."""
    k = 1
    while 2 ** (k + 1) * math.log2(max(p, 2)) <= 100:
        k += 1
    return k


def _top_eigvec_psd(H, squarings: int):
    """The top eigenvector of symmetric positive semidefinite ``H`` (``[*batch, p, p]``) by
    repeated squaring: ``A ← A²`` ``squarings`` times, renormalized to unit trace every
    :func:`_squarings_between_normalizations` squarings (4 for ``p = 32``; each
    normalization is a reduction and a pass, a kernel launch each on a GPU), gives
    ``H^P/tr(H^P)``, ``P = 2^squarings``, whose column with the largest diagonal entry is the
    top eigenvector up to components of relative size ``√p·(λ_i/λ₁)^P``. Its Rayleigh
    quotient is then off by at most ``p·max_δ δ(1−δ)^{2P}·λ₁ ≈ p·λ₁/(2eP)`` (4e-7 relative
    for ``p = 32`` at 24 squarings), whatever the gaps: eigenvalues too close to separate
    are also too close to matter. Only batched matmuls (no per-matrix LAPACK call): 24
    squarings of 16 32×32 matrices took 0.5 ms on 2 CPU cores against 1.3 ms for
    ``eigh``."""
    hp = jax.lax.Precision.HIGHEST

    def normalized(A):
        t = jnp.trace(A, axis1=-2, axis2=-1)[..., None, None]
        return A / jnp.where(t > 0, t, 1.0)

    def squared(A, times):
        for _ in range(times):
            A = jnp.matmul(A, A, precision=hp)
        return normalized(A)

    k = min(_squarings_between_normalizations(H.shape[-1]), max(squarings, 1))
    A = jax.lax.fori_loop(
        0,
        squarings // k,
        lambda _, A: squared(A, k),
        normalized(H),
        unroll=_unroll_fixed_loops(),
    )
    A = squared(A, squarings % k) if squarings % k else A
    j = jnp.argmax(jnp.diagonal(A, axis1=-2, axis2=-1), axis=-1)
    c = jnp.take_along_axis(A, j[..., None, None], axis=-1)[..., 0]
    n = jnp.linalg.norm(c, axis=-1, keepdims=True)
    e0 = jnp.zeros_like(c).at[..., 0].set(1.0)
    return jnp.where(n > 0, c / jnp.where(n > 0, n, 1.0), e0)


def _lower_inverse(L):
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


def _ritz_top(V, SV, squarings: int = 24):
    """Rayleigh–Ritz for the top eigenpair of a PSD ``S`` on ``span(V)`` (``V``: ``[*b, s, p]``,
    ``SV = S·V``), with no QR or eigensolver of the ``s×p`` block.

    ``B = VᵀV`` gets a shifted Cholesky factor ``B + δI = LLᵀ`` (``δ = 3·10⁻⁶·tr(B)/p``: the
    filtered block may be nearly rank-deficient), so ``Q = V·L⁻ᵀ`` spans ``span(V)`` with
    ``QᵀQ ≈ I``; the top eigenvector ``c`` of ``Ĥ = L⁻¹(VᵀSV)L⁻ᵀ`` (``QᵀSQ``) comes from
    :func:`_top_eigvec_psd`, and the eigenvalue is the exact Rayleigh quotient of
    ``z = Qc = Vw`` (``w = L⁻ᵀc``): ``wᵀ(VᵀSV)w / wᵀBw`` (a lower bound of ``λ₁(S)``,
    quadratically accurate in the angle of ``z``, whatever the orthonormality of ``Q``).
    Only the ``p×p`` Cholesky is a LAPACK call; the triangular inverse is matmuls
    (:func:`_lower_inverse`: a LAPACK triangular solve per matrix added 30 ms to the
    reference tree's jitted step on 2 CPU cores). Returns ``(λ [*b], z/‖z‖ [*b, s], Q)``;
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

    def cholesky(B, scale):
        # Shift 3e-6: directions of V above ~2e-3 of the columns' scale keep full weight in Q,
        # as with a QR. Should the float32 Gram's round-off make that indefinite, shift 1e-3.
        L = jnp.linalg.cholesky(B + 3e-6 * scale * eye)
        ok = jnp.all(jnp.isfinite(L), axis=(-2, -1), keepdims=True)
        return jnp.where(ok, L, jnp.linalg.cholesky(B + 1e-3 * scale * eye))

    Li = _lower_inverse(per_matrix(cholesky, B, scale))
    Hq = mm(mm(Li, H), t(Li))
    c = _top_eigvec_psd(0.5 * (Hq + t(Hq)), squarings)
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
    whitened ``QᵀSQ`` of :func:`_ritz_top` then carries spurious eigenvalues of either sign
    as large as ``λ₁`` (measured: −10.8 against λ₁ = 8.9) whose eigenvectors are noise: 2 of
    10 random 256×256 matrices with σ₁ = 3σ₂ and a warm block came out with ``σ₁ = 0`` after
    the default degree-6 filter (the retraction then left ``W`` unscaled), and a Ritz vector
    off by 4e-4–4e-3 in others, while the block's best column was within 2e-5. Why the power
    steps: they divide the error of either start by ``λ₁/λ₂`` each (nothing is lost in a
    flat top cluster, where any vector of the cluster will do). Measured on 20 random
    256×256 matrices per gap, warm block from a 2% perturbation, degree 6 (``Θ = u₁v₁ᵀ``
    against float64): worst ``Θ`` error 5.1e-7 at σ₁ = 3σ₂ and 3.4e-7 at 1.5σ₂ (by the
    quotients alone, without the tie-break, 1.1e-4 at 1.5σ₂), 2.9e-4 at 1.05σ₂ (where the
    filter has not converged), ``σ₁`` within 1.6e-7. ``S`` positive semidefinite (``apply``
    multiplies ``[*b, s, k]`` blocks by it); ``z``, ``fallback``: ``[*b, s]``."""
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


def per_matrix(f, *xs, always: bool = False):
    """``f`` (a LAPACK-backed function of single matrices: QR, eigh, SVD) over the leading
    batch axes shared by ``xs``; the outputs get the batch axes back. ``always=True`` maps
    one matrix at a time on every backend (for ``f`` that only takes single matrices, e.g. a
    solver loop that stops at its own iteration count).

    On the CPU backend the matrices go one at a time (``lax.map``) instead of as one batched
    call: jaxlib 0.10's batched LAPACK kernels spread the batch over XLA's intra-op thread
    pool from inside a thunk running on that pool (``jax::ParallelBatchMap``), and when XLA
    schedules several of them concurrently they deadlock (reproduced: three independent batched
    ``(8, 256, 32)`` QRs in one jitted function hang on 2 cores; so did batched eigh in the
    grouped spectral-sphere step). Other backends get the batched call.
    """
    batch = xs[0].shape[:-2]
    if not batch or (not always and jax.default_backend() != "cpu"):
        return f(*xs)
    flat = tuple(x.reshape((-1,) + x.shape[len(batch) :]) for x in xs)
    out = jax.lax.map(lambda a: f(*a), flat)
    return jax.tree.map(lambda o: o.reshape(batch + o.shape[1:]), out)


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
    block Gram and the top eigenvector of ``QᵀAᵀAQ`` by repeated squaring, batched matmuls
    where a per-matrix QR and eigensolver took 2.4 ms of the reference tree's step), then
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
    this is what makes a few steps enough: on the digits demo's spectral-sphere layers, the
    worst ``|σ̂₁ − σ₁|/σ₁`` over training was 4.4e-7 with 6 filter steps against 6.1e-5 with 6
    power steps (1.5e-5 with 10; ``benchmarks/spectral_accuracy.py``). Cold starts always take
    power steps (with a QR every 4).

    ``gram=True`` forms the short-side Gram ``AᵀA`` once (one compute-bound product) and
    iterates with it: each step is then an ``s×s`` by ``s×p`` product instead of two thin
    products with ``A``, which run far below the matmul rate on CPUs (memory-bound). The
    eigenvalues of the float32 Gram are accurate to ``‖A‖²·ε``, so ``σ₁`` keeps float32
    accuracy (measured ≤ 6e-7 relative against a float64 SVD). The default; measured on 2 CPU
    cores, 6 warm iterations with ``p = 32``: 256×256 0.93 → 0.62 ms, 1024×256 2.8 → 1.3 ms,
    256×1024 4.6 → 1.1 ms; with 2 iterations it is never more than 10% slower.

    Returns ``(sigma [*batch], u [*batch, rows], v [*batch, cols], Q [*batch, s, p])``.
    """
    x = jnp.asarray(x)
    _check_matrix(x)
    acc = _accum_dtype(x.dtype)
    xa = x.astype(acc)
    wide = x.shape[-2] <= x.shape[-1]
    s_dim, l_dim = (x.shape[-2], x.shape[-1]) if wide else (x.shape[-1], x.shape[-2])
    p = max(1, min(block, s_dim))
    hp = jax.lax.Precision.HIGHEST
    # Products with x as stored (no transposed copy: on CPU a materialized transpose of a wide
    # matrix doubled the iteration's time). "s" is the short side, "l" the long one.
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
        # cannot resolve the top vector within that near-rank-one block (a 1.6e-4 error in
        # Θ = u₁v₁ᵀ on an 8×8 matrix, against 2e-8 from an orthonormal block; σ₁, a
        # Rayleigh quotient, stayed within 1.3e-7).
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
