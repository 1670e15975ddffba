"""Matrix helpers shared by the manifolds: products at HIGHEST precision, the symmetric and
skew parts, Frobenius inner products, and the bounds the polish certificates use.

Arrays are ``[*batch, rows, cols]``; reductions are over the last two axes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from manifold_optax._platform import on_cpu
from manifold_optax.linalg import matmul_tn
from manifold_optax.linalg._ops import accum_dtype, sums

__all__ = [
    "HIGHEST",
    "merge_batch",
    "working",
    "hp_matmul",
    "transpose",
    "sym",
    "skew",
    "inner",
    "fro",
    "inverse_gradient_scale",
    "fro_from_identity",
    "distances_from_identity",
    "sums",
    "row_sum_from_identity",
    "cross",
    "apply_sym",
]

HIGHEST = jax.lax.Precision.HIGHEST


def working(x):
    """``x`` in its working precision: float64 stays float64, every other dtype (float32,
    bfloat16, float16) is computed in float32."""
    x = jnp.asarray(x)
    return x.astype(accum_dtype(x.dtype))


def merge_batch(*xs):
    """``xs`` with the batch axes of the first (a ``[*batch, rows, cols]`` array) merged into
    one leading axis (``None`` entries stay ``None``)."""
    batch = xs[0].shape[:-2]
    n = math.prod(batch)
    return tuple(None if x is None else x.reshape((n,) + x.shape[len(batch) :]) for x in xs)


def hp_matmul(a, b):
    """``a·b`` at HIGHEST precision (full float32 on every backend)."""
    return jnp.matmul(a, b, precision=HIGHEST)


def transpose(x):
    """The transpose of each matrix of ``x``."""
    return jnp.swapaxes(x, -1, -2)


def sym(a):
    """``(A + Aᵀ)/2``."""
    return 0.5 * (a + transpose(a))


def skew(a):
    """``(A − Aᵀ)/2``."""
    return 0.5 * (a - transpose(a))


def inner(a, b):
    """``⟨A, B⟩ = tr(AᵀB)`` per matrix."""
    return jnp.sum(a * b, axis=(-2, -1))


def fro(a):
    """``‖A‖_F`` per matrix."""
    return jnp.sqrt(inner(a, a))


def inverse_gradient_scale(G, gg=None):
    """``(zero, 1/s)`` per matrix, ``s = ‖G‖_F/√min(rows, cols)`` the RMS singular value that
    normalizes the dual step's gradient (``zero`` where ``G = 0``; then ``1/s`` is 1). ``gg``:
    ``‖G‖_F²`` when already summed."""
    if gg is None:
        gg = jnp.sum(G * G, axis=(-2, -1))
    zero = gg == 0
    return zero, jnp.where(zero, 1.0, jax.lax.rsqrt(gg / min(G.shape[-2:])))


def fro_from_identity(A):
    """``‖A − I‖_F`` per matrix."""
    eye = jnp.eye(A.shape[-1], dtype=A.dtype)
    return jnp.sqrt(jnp.sum((A - eye) ** 2, axis=(-2, -1)))


def distances_from_identity(A):
    """``(‖A − I‖_F, max row sum of |A − I|)`` per matrix; off CPU from two variadic
    reductions (per row, then over rows) instead of three."""
    if on_cpu():
        return fro_from_identity(A), row_sum_from_identity(A)
    D = A - jnp.eye(A.shape[-1], dtype=A.dtype)
    zero = jnp.zeros((), A.dtype)
    sq, ab = sums(D * D, jnp.abs(D), axis=(-1,))
    total, worst = jax.lax.reduce(
        (sq, ab),
        (zero, jnp.array(-jnp.inf, A.dtype)),
        lambda a, b: (a[0] + b[0], jnp.maximum(a[1], b[1])),
        (sq.ndim - 1,),
    )
    return jnp.sqrt(total), worst


def row_sum_from_identity(A):
    """The largest row sum of ``|A − I|`` per matrix: a bound on ``‖A − I‖₂`` for symmetric
    ``A`` (Gershgorin)."""
    eye = jnp.eye(A.shape[-1], dtype=A.dtype)
    return jnp.max(jnp.sum(jnp.abs(A - eye), axis=-1), axis=-1)


# Products on a matrix as stored: "wide" means rows ≤ cols (a square matrix takes the row
# form, in which no product contracts a leading axis).
def cross(A, B):
    """The short-side product of two same-shape matrices: ``ABᵀ`` (wide or square) or ``AᵀB``
    (tall), ``m×m``. ``cross(X, X)`` is the short-side Gram."""
    return hp_matmul(A, transpose(B)) if A.shape[-2] <= A.shape[-1] else matmul_tn(A, B, HIGHEST)


def apply_sym(X, M):
    """``X·M`` in the tall view for a symmetric ``m×m`` ``M``: ``X·M`` (tall) or ``M·X`` (wide
    or square, i.e. ``(XᵀM)ᵀ``)."""
    return hp_matmul(M, X) if X.shape[-2] <= X.shape[-1] else hp_matmul(X, M)
