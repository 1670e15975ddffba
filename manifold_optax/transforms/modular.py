"""Shape scaling and the modular-norm step across layers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from manifold_optax._matrix import fans
from manifold_optax._placement import placed
from manifold_optax.labels import path_to_str
from manifold_optax.transforms._leaves import excluded, leaf_specs, paths
from manifold_optax.transforms.dualize import dualize

__all__ = ["scale_by_shape", "scale_by_modular_norm"]


def scale_by_shape(
    weight_dimension_numbers=None, consistent_rms: float | None = None
) -> optax.GradientTransformation:
    r"""Scale each matrix update by its shape factor.

    .. math::

       u ← \sqrt{\max(1, d_{out}/d_{in})}\,u \quad\text{or, with } ρ:\quad
       u ← ρ\sqrt{\max(d_{in}, d_{out})}\,u

    The first is Jordan's width rule (an RMS→RMS operator norm of order one for an
    orthogonal ``u``); the second (``consistent_rms=ρ``) gives an orthogonal update the RMS
    ``ρ``, as AdamW's updates have (Liu et al. use ρ = 0.2). ``d_in × d_out`` is the matrix of
    the same ``[batch, fan_in, fan_out]`` view as :func:`orthogonalize` (a ``MatrixSpec``'s
    split counted); a leaf whose spec is ``None`` in a spec tree is left untouched, as
    :func:`orthogonalize` leaves it.

    Args:
      weight_dimension_numbers: ``None`` (the last two axes of every leaf), one spec for
        every leaf, a tree prefix of ``MuonDimensionNumbers | MatrixSpec | None``, or a
        callable from updates to such a tree.
      consistent_rms: ``ρ``, the update RMS to match; ``None`` takes the width rule.

    Returns:
      A stateless ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, manifold_optax as mo
      >>> tx = mo.scale_by_shape()
      >>> u, _ = tx.update({"w": jnp.ones((2, 8))}, tx.init(None))
      >>> float(u["w"][0, 0])  # √(8/2)
      2.0

    References:
      Jordan et al., "Muon" (2024); Liu et al., "Muon is Scalable for LLM Training"
      (arXiv:2502.16982, 2025).
    """

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        specs = leaf_specs(weight_dimension_numbers, updates)
        new = []
        for x, s in zip(leaves, specs, strict=True):
            if excluded(weight_dimension_numbers, s):
                new.append(x)
                continue
            fan_in, fan_out = fans(x, s)
            if consistent_rms is None:
                scale = math.sqrt(max(1.0, fan_out / fan_in))
            else:
                scale = math.sqrt(max(fan_in, fan_out)) * consistent_rms
            new.append(x * jnp.asarray(scale, x.dtype))
        return jax.tree.unflatten(treedef, new), state

    return placed(optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn))


def scale_by_modular_norm(
    norms="spectral",
    scales=1.0,
    weight_dimension_numbers=None,
    **dualize_kwargs,
) -> optax.GradientTransformation:
    r"""The modular-norm steepest step across layers (``docs/math.md``, The modular norm).

    For layers ``l`` with norms ``‖·‖_l`` and scales ``s_l > 0``, the model
    ``Σ_l ⟨G_l, ΔW_l⟩ + (λ/2)·max_l s_l²‖ΔW_l‖_l²`` is minimized by
    ``ΔW_l = −(1/λ)(η/s_l)·dualize_l(G_l)`` with the single global ``η = Σ_k ‖G_k‖_k† / s_k``.
    This transformation returns the positive direction ``(η/s_l)·dualize_l(G_l)``; follow it with
    ``optax.scale_by_learning_rate(1/λ)``. The dual norms are computed as ``⟨G_l, dualize_l(G_l)⟩``
    (exact for an exact dualize; with Newton–Schulz it is the decrease the actual direction
    achieves).

    Args:
      norms: a norm name, or a tree prefix of names (or callable) choosing each leaf's norm.
      scales: a positive float, or a tree prefix of floats (or callable) giving ``s_l``.
      weight_dimension_numbers: as for :func:`dualize`.
      **dualize_kwargs: the msign options of :func:`dualize`.

    Returns:
      A stateless ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, manifold_optax as mo
      >>> tx = mo.scale_by_modular_norm("frobenius", scales={"a": 1.0, "b": 2.0})
      >>> g = {"a": jnp.array([[3.0, 4.0]]), "b": jnp.array([[0.0, 2.0]])}
      >>> u, _ = tx.update(g, tx.init(None))
      >>> float(u["a"][0, 1]), float(u["b"][0, 1])  # η = 5/1 + 2/2 = 6
      (4.800000190734863, 3.0)
    """
    inner = dualize(norms, weight_dimension_numbers, **dualize_kwargs)
    is_scale = lambda x: isinstance(x, int | float)

    def update_fn(updates, state, params=None):
        d, _ = inner.update(updates, optax.EmptyState())
        s_leaves = leaf_specs(scales, updates, is_spec=is_scale)
        g_leaves, treedef = jax.tree.flatten(updates)
        d_leaves = jax.tree.leaves(d)
        for s, p in zip(s_leaves, paths(updates), strict=True):
            if s is None or not s > 0:
                raise ValueError(f"scale for {path_to_str(p)!r} must be a positive float, got {s}")
        eta = sum(
            jnp.vdot(g.astype(jnp.float32), t.astype(jnp.float32)) / s
            for g, t, s in zip(g_leaves, d_leaves, s_leaves, strict=True)
        )
        new = [(t * (eta / s)).astype(t.dtype) for t, s in zip(d_leaves, s_leaves, strict=True)]
        return jax.tree.unflatten(treedef, new), state

    return placed(optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn))
