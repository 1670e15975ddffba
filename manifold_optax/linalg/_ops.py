"""Shared matrix helpers of the linear-algebra package: input checks, accumulation dtypes,
products without transposed copies, and a per-matrix map for LAPACK-backed functions.

Shapes are ``[*batch, rows, cols]``: the last two axes are the matrix, leading axes a batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from manifold_optax._platform import on_cpu

__all__ = [
    "check_matrix",
    "accum_dtype",
    "mm",
    "matmul_tn",
    "gram",
    "left",
    "per_matrix",
    "unroll_fixed_loops",
    "sums",
]


def check_matrix(x: jax.Array, name: str = "x") -> None:
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 axes (the last two are the matrix), got shape {x.shape}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must have a real floating dtype, got {x.dtype}")


def accum_dtype(dtype) -> jnp.dtype:
    """Reductions and coefficients: float64 for float64 inputs, float32 otherwise."""
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def mm(a, b, precision, out_dtype):
    return jnp.matmul(a, b, precision=precision, preferred_element_type=out_dtype)


def matmul_tn(a, b, precision=None, out_dtype=None):
    """``aᵀb`` (both contracted over their row axis), accumulated in ``out_dtype``.

    On the CPU backend ``aᵀ`` is materialized first (the optimization barrier keeps XLA from
    folding the transpose back into the product): XLA:CPU's kernels for a product that
    contracts the left operand's leading axis can be slower than for ``ab``. Other backends
    take the transpose inside the product.
    """
    t = jnp.swapaxes(a, -1, -2)
    if on_cpu():
        t = jax.lax.optimization_barrier(t)
    return jnp.matmul(t, b, precision=precision, preferred_element_type=out_dtype)


def gram(x, precision, out_dtype, tall: bool = False):
    """The short-side Gram matrix: ``XXᵀ`` (wide ``x``) or ``XᵀX`` (``tall``)."""
    if tall:
        return matmul_tn(x, x, precision, out_dtype)
    return mm(x, jnp.swapaxes(x, -1, -2), precision, out_dtype)


def left(B, x, precision, out_dtype, tall: bool = False):
    """``B·X`` in the wide view of ``x``: ``B·X`` (wide) or ``X·B`` (``tall``), where ``B`` is
    symmetric (``X·B = (B·Xᵀ)ᵀ``) or, in the Gram iteration, already the transposed factor; no
    operand is transposed (see :func:`matmul_tn`)."""
    if tall:
        return mm(x, B, precision, out_dtype)
    return mm(B, x, precision, out_dtype)


def per_matrix(f, *xs, always: bool = False):
    """``f`` (a LAPACK-backed function of single matrices: QR, eigh, SVD) over the leading
    batch axes shared by ``xs``; the outputs get the batch axes back. ``always=True`` maps
    one matrix at a time on every backend (for ``f`` that only takes single matrices, e.g. a
    solver loop that stops at its own iteration count).

    On the CPU backend the matrices go one at a time (``lax.map``) instead of as one batched
    call: jaxlib's batched LAPACK kernels spread the batch over XLA's intra-op thread pool from
    inside a thunk running on that pool (``jax::ParallelBatchMap``), and several of them
    scheduled concurrently can deadlock (the suite's deadlock test reproduces it). Other
    backends get the batched call.
    """
    batch = xs[0].shape[:-2]
    if not batch or (not always and not on_cpu()):
        return f(*xs)
    flat = tuple(x.reshape((-1,) + x.shape[len(batch) :]) for x in xs)
    out = jax.lax.map(lambda a: f(*a), flat)
    return jax.tree.map(lambda o: o.reshape(batch + o.shape[1:]), out)


def unroll_fixed_loops() -> bool:
    """Whether the short fixed-count loops of the warm top-singular-value path are unrolled:
    off CPU, where XLA runs a while loop by reading its predicate back to the host every
    iteration (a stall per iteration). XLA:CPU has no such stall and keeps the loops."""
    return not on_cpu()


def sums(*xs, axis=(-2, -1), fused: bool | None = None):
    """``Σ`` over ``axis`` of each of the same-shape ``xs``. ``fused`` (default: off CPU): one
    variadic reduction (one kernel for all of them); else one reduction each, as XLA:CPU runs
    them equally fast."""
    if fused is None:
        fused = not on_cpu()
    if not fused or len(xs) == 1:
        return tuple(jnp.sum(x, axis=axis) for x in xs)
    dims = tuple(sorted(a % xs[0].ndim for a in axis))
    zeros = tuple(jnp.zeros((), x.dtype) for x in xs)
    return jax.lax.reduce(
        tuple(xs), zeros, lambda a, b: tuple(p + q for p, q in zip(a, b, strict=True)), dims
    )
