"""The polar factor ``msign`` by Newton–Schulz, its SVD reference, and the norms it serves.

``msign(G) = UVᵀ`` for the thin SVD ``G = UΣVᵀ``; it is the gradient of the nuclear norm and
the steepest-descent direction under the spectral norm (``docs/math.md``, Steepest descent and
Newton–Schulz). Shapes are ``[*batch, rows, cols]``: the last two axes are the matrix and any
leading axes are a batch.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from manifold_optax import schedules
from manifold_optax.linalg._ops import accum_dtype, check_matrix, gram, left, mm, per_matrix

__all__ = [
    "msign",
    "msign_svd",
    "singular_values",
    "nuclear_norm",
    "spectral_norm",
    "newton_schulz_flops",
]

Normalization = Literal["schatten8", "schatten4", "frobenius", "spectral", "aol"]


_NORMALIZATIONS = ("schatten8", "schatten4", "frobenius", "spectral", "aol")


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

    Math (``docs/math.md``, Newton–Schulz): read ``X`` wide (a tall input runs the same steps on its transpose,
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
    modded-nanogpt, for parity. optax's other preconditionings: ``"schatten4"`` divides by
    ``‖A‖_F^{1/2} = (Σσ⁴)^{1/4}`` from the first Gram; ``"spectral"`` by the exact ``σ_max``
    (an SVD per matrix: slow); ``"aol"`` (Boissin et al.'s almost-orthogonal-layer rescaling)
    multiplies the short side by ``D = diag(Σ_j|A_ij|)^{-1/2}`` (``‖DX‖₂ ≤ 1`` by Gershgorin),
    which changes the singular vectors: the result is ``msign(DX)``, not ``msign(X)``. The
    Polar Express schedule divides by a further 1.01 (its safety factor).

    Default: ``steps=5`` with the Polar Express schedule — the cost of Muon's usual 5 Jordan
    steps, whose composed scalar map keeps ``max|p(σ) − 1| ≈ 0.13`` on ``σ ∈ [1e-2, 1]``
    (Jordan's: 0.32; computed in float64 from the coefficients, ``tests/test_schedules.py``);
    use ``steps=8`` or more for float32-accurate polar factors (the scalar map's error is
    below float32 round-off from 8 steps on).

    Args:
      x: ``[*batch, rows, cols]`` real floating array.
      steps: Newton–Schulz steps; default 5 for named schedules, the table's length otherwise.
      coeffs: ``"polar_express"``, ``"jordan"``, ``"you"`` (5 steps only) or a ``(k, 3)``
        (or ``(3,)``) table of ``(a, b, c)`` rows (see :func:`schedules.get_schedule`).
      normalization: ``"schatten8"``, ``"schatten4"``, ``"frobenius"``, ``"spectral"`` or
        ``"aol"`` (see above).
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

    Example:
      >>> import jax, jax.numpy as jnp, manifold_optax as mo
      >>> G = jax.random.normal(jax.random.key(0), (6, 4))
      >>> O = mo.msign(G, steps=10, precision=jax.lax.Precision.HIGHEST)
      >>> bool(jnp.allclose(O.T @ O, jnp.eye(4), atol=1e-4))
      True

    References:
      Jordan et al., "Muon: An optimizer for hidden layers" (2024);
      Amsel, Persson, Musco & Gower, "The Polar Express" (arXiv:2505.16932, 2025);
      Su, "msign" posts (kexue.fm) for the Schatten-norm normalization.
    """
    x = jnp.asarray(x)
    check_matrix(x)
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}")
    if method not in ("auto", "standard", "gram"):
        raise ValueError(f"method must be 'auto', 'standard' or 'gram', got {method!r}")
    if x.ndim > 2 and math.prod(x.shape[:-2]) == 1:
        # A batch of one runs as a plain matrix: XLA:CPU's batched dots with a transposed
        # operand can be slower than 2-D ones.
        kw = dict(normalization=normalization, precision=precision, eps=eps)
        kw |= dict(compute_dtype=compute_dtype, safety=safety, method=method)
        out = msign(x.reshape(x.shape[-2:]), steps, coeffs, gram_restart=gram_restart, **kw)
        return out.reshape(x.shape)
    table, steps = schedules.get_schedule(coeffs, steps)
    if safety is None:
        is_pe = isinstance(coeffs, str) and coeffs.lower().replace("-", "_") == "polar_express"
        safety = 1.0 + schedules.PE_SAFETY if is_pe else 1.0

    in_dtype = x.dtype
    acc = accum_dtype(in_dtype)
    cdt = jnp.dtype(compute_dtype) if compute_dtype is not None else in_dtype
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        return x
    # The iteration is written for a wide X (short-side Gram XXᵀ, products B·X); a tall one
    # runs the same iteration on its transpose through XᵀX (matmul_tn) and X·B (B symmetric),
    # never transposing X around the whole iteration (two copies of X saved).
    tall = x.shape[-2] > x.shape[-1]

    # Prescale by the largest entry, then by the Frobenius norm (reductions in `acc`).
    xa = x.astype(acc)
    amax = jnp.max(jnp.abs(xa), axis=(-2, -1), keepdims=True)
    xa = xa / jnp.where(amax > 0, amax, 1.0)
    fro = jnp.sqrt(jnp.sum(xa * xa, axis=(-2, -1), keepdims=True))
    if normalization == "frobenius":
        xa = xa / (fro * safety + eps)
    elif normalization == "spectral":
        smax = jnp.max(singular_values(xa), axis=-1)[..., None, None]
        xa = xa / (smax * safety + eps)
    else:
        xa = xa / jnp.where(fro > 0, fro, 1.0)
    X = xa.astype(cdt)
    rows = jnp.asarray(table, dtype=acc)

    m_short, n_long = min(X.shape[-2:]), max(X.shape[-2:])
    use_gram = normalization != "aol" and (
        method == "gram"
        or (method == "auto" and n_long >= 1.5 * m_short and jnp.dtype(cdt).itemsize >= 4)
    )
    if use_gram:
        out = _gram_newton_schulz(
            X, rows, steps, normalization, safety, precision, acc, cdt, gram_restart, tall
        )
        return out.astype(in_dtype)

    for i in range(steps):
        a, b, c = rows[i, 0], rows[i, 1], rows[i, 2]
        A = gram(X, precision, acc, tall)
        A2 = mm(A.astype(cdt), A.astype(cdt), precision, acc)
        if i == 0 and normalization == "aol":
            d = jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.abs(A), axis=-1), eps) * safety**2)
            X = (X.astype(acc) * (d[..., None, :] if tall else d[..., :, None])).astype(cdt)
            A = A * d[..., :, None] * d[..., None, :]
            A2 = mm(A.astype(cdt), A.astype(cdt), precision, acc)
        elif i == 0:
            X, A, A2 = _first_step_scale(X, A, A2, normalization, safety, acc, cdt)
        B = (b * A + c * A2).astype(cdt)
        X = (a * X.astype(acc) + left(B, X, precision, acc, tall)).astype(cdt)

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
    would cost two n-sized products to protect one polynomial, whose round-off stays at the
    standard iteration's order (the suite's parity test against the float64 iteration checks
    it). So 5 steps restart once, after step 2 (Dao et al.'s schedule; ``docs/math.md``,
    Newton–Schulz): ``8m²n`` FLOPs in n-sized products, not ``12m²n``.
    """
    m = min(X0.shape[-2:])
    eye = jnp.eye(m, dtype=acc)
    X = X0
    A = gram(X, precision, acc, tall)
    Q = None
    since = 0
    for i in range(steps):
        a, b, c = rows[i, 0], rows[i, 1], rows[i, 2]
        A2 = mm(A, A, precision, acc)
        if i == 0:
            X, A, A2 = _first_step_scale(X, A, A2, normalization, safety, acc, cdt)
        P = a * eye + b * A + c * A2
        Q = P if Q is None else (mm(Q, P, precision, acc) if tall else mm(P, Q, precision, acc))
        since += 1
        if i == steps - 1:
            break
        if since == restart and steps - 1 - i >= 2:
            X = left(Q.astype(cdt), X, precision, acc, tall).astype(cdt)
            A = gram(X, precision, acc, tall)
            Q, since = None, 0
        else:
            A = mm(P, mm(P, A, precision, acc), precision, acc)
            A = 0.5 * (A + jnp.swapaxes(A, -1, -2))
    return left(Q.astype(cdt), X, precision, acc, tall)


def _first_step_scale(X, A, A2, normalization, safety, acc, cdt):
    """The Schatten normalizations, read off the first step's Gram ``A`` and its square:
    ``(Σσ⁸)^{1/8} = ‖A²‖_F^{1/4}``, ``(Σσ⁴)^{1/4} = ‖A‖_F^{1/2}``; others pass through."""
    if normalization == "schatten8":
        norm = jnp.sqrt(jnp.sqrt(jnp.sqrt(jnp.sum(A2 * A2, axis=(-2, -1), keepdims=True))))
    elif normalization == "schatten4":
        norm = jnp.sqrt(jnp.sqrt(jnp.sum(A * A, axis=(-2, -1), keepdims=True)))
    else:
        return X, A, A2
    s = jnp.where(norm > 0, norm * safety, 1.0)
    return (X.astype(acc) / s).astype(cdt), A / s**2, A2 / s**4


def _svd_tol(s, shape, dtype):
    return s[..., :1] * max(shape[-2:]) * jnp.finfo(dtype).eps


def msign_svd(x: jax.Array) -> jax.Array:
    """Exact polar factor ``UVᵀ`` from the thin SVD; singular values below ``σ_max·max(m,n)·eps``
    count as zero (so rank-deficient inputs map their null space to zero, like Newton–Schulz).
    Computed in float32 (float64 for float64 inputs), returned in ``x.dtype``."""
    x = jnp.asarray(x)
    check_matrix(x)
    acc = accum_dtype(x.dtype)
    u, s, vh = per_matrix(lambda a: jnp.linalg.svd(a, full_matrices=False), x.astype(acc))
    keep = (s > _svd_tol(s, x.shape, acc)).astype(acc)
    return (mm(u * keep[..., None, :], vh, jax.lax.Precision.HIGHEST, acc)).astype(x.dtype)


def singular_values(x: jax.Array) -> jax.Array:
    """Singular values (descending) of each matrix of ``[*batch, m, n]`` (see :func:`per_matrix`)."""
    return per_matrix(lambda a: jnp.linalg.svd(a, compute_uv=False), x)


def nuclear_norm(x: jax.Array) -> jax.Array:
    """``‖x‖_* = Σσ_i`` over the last two axes (SVD, in float32 or float64)."""
    x = jnp.asarray(x)
    check_matrix(x)
    return jnp.sum(singular_values(x.astype(accum_dtype(x.dtype))), axis=-1)


def spectral_norm(x: jax.Array) -> jax.Array:
    """``‖x‖₂ = σ_max`` over the last two axes (exact, by SVD)."""
    x = jnp.asarray(x)
    check_matrix(x)
    return jnp.max(singular_values(x.astype(accum_dtype(x.dtype))), axis=-1)
