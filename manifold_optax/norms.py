"""Dualize maps and dual norms (``docs/math.md``, Steepest descent under a norm; Bernstein &
Newhouse, "Old Optimizer, New Norm").

For a norm ``‖·‖`` the steepest-descent direction is ``dualize(g) = argmax_{‖t‖ = 1} ⟨g, t⟩``
and its size is the dual norm ``‖g‖† = max_{‖t‖ = 1} ⟨g, t⟩``. Matrices use Flax's layout
``[*batch, fan_in, fan_out]`` (``y = xW``): a *row* is one input's weights (fixed first matrix
axis), a *column* one output's weights (fixed last axis).

========== ====================================== ============================== =====================
name       norm of W                              dualize(g)                     dual norm ‖g‖†
========== ====================================== ============================== =====================
frobenius  ‖W‖_F                                  g / ‖g‖_F                      ‖g‖_F
sign       max |W_ij|  (ℓ∞)                       sign(g)                        ‖g‖₁
spectral   ‖W‖₂                                   msign(g)                       ‖g‖_*
rms        √(d_in/d_out)·‖W‖₂  (RMS→RMS)          √(d_out/d_in)·msign(g)         √(d_out/d_in)·‖g‖_*
row        max_i RMS(row_i)  (ℓ1→RMS)             each row at unit RMS           Σ_i √d_out·‖g_i‖₂
column     √d_in·max_j ‖col_j‖₂  (RMS→ℓ∞)         each column at norm 1/√d_in    Σ_j ‖g_j‖₂/√d_in
========== ====================================== ============================== =====================

``row`` and ``column`` are operator norms (Scion's embedding and head norms): ``row`` bounds
``RMS(xW)`` for ``‖x‖₁ ≤ 1``, ``column`` bounds ``max_j |(xW)_j|`` for ``RMS(x) ≤ 1``; their
unit balls are "every row at most unit RMS" and "every column of norm at most ``1/√d_in``". A
zero row, column or matrix dualizes to zero. Computed in float32 (float64 for float64). These
functions take single arrays; :func:`manifold_optax.dualize` maps them over a tree.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from manifold_optax._matrix import as_matrix
from manifold_optax.linalg import msign, nuclear_norm, singular_values
from manifold_optax.linalg._ops import accum_dtype

__all__ = ["NORMS", "dualize_array", "dual_norm", "primal_norm", "check_norm"]

NORMS = ("spectral", "frobenius", "sign", "rms", "row", "column")


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; accepted names: {NORMS}")
    return norm


def _safe_div(a, b):
    return a / jnp.where(b > 0, b, 1.0)


def dualize_array(norm: str, g: jax.Array, **msign_kwargs) -> jax.Array:
    """``argmax_{‖t‖=1} ⟨g, t⟩`` for one array (matrix norms read the last two axes; 0-D/1-D
    arrays count as ``(1, d)`` matrices)."""
    check_norm(norm)
    acc = accum_dtype(jnp.result_type(g))
    if norm == "frobenius":
        return _safe_div(g, jnp.sqrt(jnp.sum(jnp.square(g.astype(acc))))).astype(g.dtype)
    if norm == "sign":
        return jnp.sign(g)
    shape = g.shape
    x = as_matrix(g)
    d_in, d_out = x.shape[-2], x.shape[-1]
    if norm in ("spectral", "rms"):
        y = msign(x, **msign_kwargs)
        if norm == "rms":
            y = y * jnp.asarray(math.sqrt(d_out / d_in), y.dtype)
    elif norm == "row":
        n = jnp.sqrt(jnp.sum(jnp.square(x.astype(acc)), axis=-1, keepdims=True))
        y = (_safe_div(x.astype(acc), n) * math.sqrt(d_out)).astype(g.dtype)
    else:  # column
        n = jnp.sqrt(jnp.sum(jnp.square(x.astype(acc)), axis=-2, keepdims=True))
        y = (_safe_div(x.astype(acc), n) / math.sqrt(d_in)).astype(g.dtype)
    return y.reshape(shape)


def dual_norm(norm: str, g: jax.Array) -> jax.Array:
    """``‖g‖† = max_{‖t‖=1} ⟨g, t⟩`` (exact: SVD for the spectral family), summed over any
    batch axes, in float32 (float64 for float64)."""
    check_norm(norm)
    g32 = jnp.asarray(g)
    g32 = g32.astype(accum_dtype(g32.dtype))
    if norm == "frobenius":
        return jnp.sqrt(jnp.sum(g32 * g32))
    if norm == "sign":
        return jnp.sum(jnp.abs(g32))
    x = as_matrix(g32)
    d_in, d_out = x.shape[-2], x.shape[-1]
    if norm == "spectral":
        return jnp.sum(nuclear_norm(x))
    if norm == "rms":
        return math.sqrt(d_out / d_in) * jnp.sum(nuclear_norm(x))
    if norm == "row":
        return math.sqrt(d_out) * jnp.sum(jnp.sqrt(jnp.sum(x * x, axis=-1)))
    return jnp.sum(jnp.sqrt(jnp.sum(x * x, axis=-2))) / math.sqrt(d_in)


def primal_norm(norm: str, w: jax.Array) -> jax.Array:
    """The norm itself (max over any batch axes), for checking that ``dualize`` is unit-norm."""
    check_norm(norm)
    w32 = jnp.asarray(w)
    w32 = w32.astype(accum_dtype(w32.dtype))
    if norm == "frobenius":
        return jnp.sqrt(jnp.sum(w32 * w32))
    if norm == "sign":
        return jnp.max(jnp.abs(w32))
    x = as_matrix(w32)
    d_in, d_out = x.shape[-2], x.shape[-1]
    if norm in ("spectral", "rms"):
        s = jnp.max(singular_values(x))
        return s if norm == "spectral" else math.sqrt(d_in / d_out) * s
    if norm == "row":
        return jnp.max(jnp.sqrt(jnp.mean(x * x, axis=-1)))
    return math.sqrt(d_in) * jnp.max(jnp.sqrt(jnp.sum(x * x, axis=-2)))
