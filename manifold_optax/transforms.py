"""Gradient transformations: momentum, orthogonalize, dualize, scale_by_shape and the modular
step. Manifold transformations (``dual_ascent``, ``retract``) are in ``manifold_transforms``.

Sign convention (as optax's ``scale_by_*``): every transformation returns a *positive*
direction, e.g. ``msign(G)``; ``optax.scale_by_learning_rate`` negates it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from manifold_optax import norms as _norms
from manifold_optax._matrix import fans, grouped_msign, matrix_view, vector_view
from manifold_optax.labels import is_dim_nums, path_to_str

__all__ = [
    "MomentumState",
    "momentum",
    "orthogonalize",
    "dualize",
    "scale_by_shape",
    "scale_by_modular_norm",
    "leaf_specs",
]


class _Box:
    """An opaque holder, so that ``None`` and specs stay leaves when broadcasting a prefix."""

    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v


def leaf_specs(spec, tree, *, is_spec=is_dim_nums) -> list:
    """Broadcast a tree prefix ``spec`` (or a callable returning one, or a single spec, or None)
    over ``tree``; return one entry per leaf of ``tree``, in ``jax.tree.leaves`` order."""
    n = len(jax.tree.leaves(tree))
    if spec is None or is_spec(spec):
        return [spec] * n
    if callable(spec):
        spec = spec(tree)
        if spec is None or is_spec(spec):
            return [spec] * n
    try:
        boxed = jax.tree.map(
            lambda s, sub: jax.tree.map(lambda _: _Box(s), sub),
            spec,
            tree,
            is_leaf=lambda x: x is None or is_spec(x),
        )
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"the spec tree does not match the parameter tree (it must be a tree prefix): {e}"
        ) from e
    return [b.v for b in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, _Box))]


def _paths(tree):
    return [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


# --------------------------------------------------------------------------------------------
# Momentum
# --------------------------------------------------------------------------------------------


class MomentumState(NamedTuple):
    count: chex.Array  # int32 scalar
    mu: Any  # first moment, like the params


def momentum(
    beta: float = 0.95,
    *,
    nesterov: bool = True,
    bias_correction: bool = True,
    mu_dtype=None,
) -> optax.GradientTransformation:
    r"""Exponential-moving-average momentum, the one used by ``muon`` and ``manifold_muon``.

    ``m_t = β·m_{t−1} + (1−β)·g_t``. Output, with ``bias_correction`` (``c_t = 1 − β^t``):
    Nesterov ``β·m_t/c_{t+1} + (1−β)·g_t/c_t`` (exactly optax.contrib.muon's form), or
    ``m_t/c_t``; without it, ``β·m_t + (1−β)·g_t`` or ``m_t``. Momentum comes *before* the
    nonlinear map (msign), as Kovalev's trust-region analysis requires (MATH.md §1).

    Args:
      beta: decay rate.
      nesterov: use the Nesterov look-ahead.
      bias_correction: divide by ``1 − β^t`` (optax's convention).
      mu_dtype: dtype to store the moment in (e.g. ``jnp.bfloat16``); computed in float32.
    """
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def init_fn(params):
        return MomentumState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        )

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: beta * m.astype(g.dtype) + (1 - beta) * g, state.mu, updates)
        count = optax.safe_increment(state.count)
        if bias_correction:
            c_now = 1 - beta ** count.astype(jnp.float32)
            c_next = 1 - beta ** (count.astype(jnp.float32) + 1)
        else:
            c_now = c_next = jnp.ones([], jnp.float32)
        if nesterov:
            out = jax.tree.map(
                lambda m, g: (
                    beta * (m / c_next.astype(m.dtype)) + (1 - beta) * (g / c_now.astype(g.dtype))
                ).astype(g.dtype),
                mu,
                updates,
            )
        else:
            out = jax.tree.map(
                lambda m, g: (m / c_now.astype(m.dtype)).astype(g.dtype), mu, updates
            )
        mu = optax.tree.cast(mu, mu_dtype)
        return out, MomentumState(count=count, mu=mu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Orthogonalize / dualize
# --------------------------------------------------------------------------------------------


def _msign_kwargs(ns_steps, ns_coeffs, normalization, precision, eps, compute_dtype, method="auto"):
    return dict(
        steps=ns_steps,
        coeffs=ns_coeffs,
        normalization=normalization,
        precision=precision,
        eps=eps,
        compute_dtype=compute_dtype,
        method=method,
    )


def orthogonalize(
    ns_steps: int | None = None,
    ns_coeffs="polar_express",
    weight_dimension_numbers=None,
    *,
    normalization: str = "schatten8",
    precision=None,
    eps: float = 1e-8,
    compute_dtype=None,
    group: bool | None = None,
    ns_method: str = "auto",
    sharding=None,
) -> optax.GradientTransformation:
    r"""Replace every matrix leaf ``G`` by ``msign(G) = UVᵀ`` (steepest descent under ‖·‖₂).

    Leaves are viewed as ``[batch, fan_in, fan_out]``: a ``MuonDimensionNumbers`` spec names the
    reduction and output axes (the rest are batch axes); without one the last two axes are the
    matrix and leading axes (``nnx.scan`` layers, heads, experts) are a batch. A spec of
    ``None`` inside a tree leaves that leaf unchanged. Same-shape matrices are stacked into one
    batched msign on GPU/TPU; on CPU only small ones are (``group``).

    Args:
      ns_steps, ns_coeffs, normalization, precision, eps, compute_dtype: see
        :func:`manifold_optax.msign`.
      weight_dimension_numbers: ``None``, one ``MuonDimensionNumbers`` for every leaf, a tree
        prefix of ``MuonDimensionNumbers | None``, or a callable from updates to such a tree.
      group: ``True`` batches same-shape matrices into one msign call, ``False`` runs each
        leaf on its own; ``None`` (default) batches on GPU/TPU, and on CPU only matrices with
        a short side below 128, running larger ones one at a time as 2-D products (faster
        there: see :func:`manifold_optax._matrix.grouped_msign`).
      ns_method: ``"auto"`` (Gram Newton–Schulz for aspect ≥ 1.5 in float32), ``"standard"``
        or ``"gram"`` (see :func:`manifold_optax.msign`).
      sharding: a :class:`manifold_optax.sharding.MsignSharding` for sharded parameters.

    Raises:
      ValueError naming the leaf's path if a leaf with fewer than two axes reaches it.
    """
    kw = _msign_kwargs(ns_steps, ns_coeffs, normalization, precision, eps, compute_dtype, ns_method)

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        specs = leaf_specs(weight_dimension_numbers, updates)
        paths = _paths(updates)
        views, invs, where = [], [], []
        for i, (x, s, p) in enumerate(zip(leaves, specs, paths, strict=True)):
            if (
                s is None
                and weight_dimension_numbers is not None
                and not is_dim_nums(weight_dimension_numbers)
            ):
                continue  # explicitly excluded by the spec tree
            v, inv = matrix_view(x, s, p)
            views.append(v)
            invs.append(inv)
            where.append(i)
        outs = grouped_msign(views, group=group, sharding=sharding, **kw)
        new = list(leaves)
        for i, o, inv in zip(where, outs, invs, strict=True):
            new[i] = inv(o)
        return jax.tree.unflatten(treedef, new), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def dualize(
    norm: str = "spectral",
    weight_dimension_numbers=None,
    *,
    ns_steps: int | None = None,
    ns_coeffs="polar_express",
    normalization: str = "schatten8",
    precision=None,
    compute_dtype=None,
    group: bool | None = None,
    ns_method: str = "auto",
    sharding=None,
) -> optax.GradientTransformation:
    r"""Map every leaf to its steepest direction ``dualize(g) = argmax_{‖t‖=1} ⟨g, t⟩``.

    ``norm`` is one of ``"spectral"``, ``"frobenius"``, ``"sign"``, ``"rms"``, ``"row"``,
    ``"column"`` (table in :mod:`manifold_optax.norms`), or a tree prefix of such names (or a
    callable returning one) to choose per leaf. Matrix norms view leaves as
    ``[batch, fan_in, fan_out]`` (see :func:`orthogonalize`); 0-D and 1-D leaves count as
    ``(1, d)`` matrices (a bias is the weight of a constant input), for which ``spectral`` is
    ℓ2 normalization and ``rms`` scales to unit RMS. Frobenius and sign act on whole leaves.

    References: Bernstein & Newhouse, "Old Optimizer, New Norm" (arXiv:2409.20325);
    seed 002 (MATH.md §1).
    """
    is_name = lambda x: isinstance(x, str)
    if is_name(norm):
        _norms.check_norm(norm)
    kw = _msign_kwargs(
        ns_steps, ns_coeffs, normalization, precision, 1e-8, compute_dtype, ns_method
    )

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        names = leaf_specs(norm, updates, is_spec=is_name)
        specs = leaf_specs(weight_dimension_numbers, updates)
        paths = _paths(updates)
        new = list(leaves)
        spectral_views, spectral_meta = [], []
        for i, (g, name, s, p) in enumerate(zip(leaves, names, specs, paths, strict=True)):
            if name is None:
                continue
            if name not in _norms.NORMS:
                raise ValueError(
                    f"unknown norm {name!r} for {path_to_str(p)!r}; accepted: {_norms.NORMS}"
                )
            if name in ("frobenius", "sign"):
                new[i] = _norms.dualize_array(name, g)
                continue
            v, inv = matrix_view(g, s, p) if g.ndim >= 2 else vector_view(g)
            if name in ("spectral", "rms"):
                spectral_views.append(v)
                spectral_meta.append((i, inv, name, v.shape[1], v.shape[2]))
            else:
                new[i] = inv(_norms.dualize_array(name, v))
        outs = grouped_msign(spectral_views, group=group, sharding=sharding, **kw)
        for o, (i, inv, name, d_in, d_out) in zip(outs, spectral_meta, strict=True):
            if name == "rms":
                o = o * jnp.asarray(math.sqrt(d_out / d_in), o.dtype)
            new[i] = inv(o)
        return jax.tree.unflatten(treedef, new), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


# --------------------------------------------------------------------------------------------
# Shape scaling and the modular norm
# --------------------------------------------------------------------------------------------


def scale_by_shape(
    weight_dimension_numbers=None, consistent_rms: float | None = None
) -> optax.GradientTransformation:
    r"""Scale each matrix update by ``√max(1, fan_out/fan_in)`` (Jordan's width rule), or with
    ``consistent_rms=ρ`` by ``ρ·√max(fan_in, fan_out)`` (Moonlight: the update RMS matches
    AdamW's, ρ ≈ 0.2). Fans come from the same ``[batch, fan_in, fan_out]`` view as
    :func:`orthogonalize`."""

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        specs = leaf_specs(weight_dimension_numbers, updates)
        new = []
        for x, s in zip(leaves, specs, strict=True):
            fan_in, fan_out = fans(x, s)
            if consistent_rms is None:
                scale = math.sqrt(max(1.0, fan_out / fan_in))
            else:
                scale = math.sqrt(max(fan_in, fan_out)) * consistent_rms
            new.append(x * jnp.asarray(scale, x.dtype))
        return jax.tree.unflatten(treedef, new), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def scale_by_modular_norm(
    norms="spectral",
    scales=1.0,
    weight_dimension_numbers=None,
    **dualize_kwargs,
) -> optax.GradientTransformation:
    r"""The modular-norm steepest step across layers (seed 002 §C, MATH.md §1).

    For layers ``l`` with norms ``‖·‖_l`` and scales ``s_l > 0``, the model
    ``Σ_l ⟨G_l, ΔW_l⟩ + (λ/2)·max_l s_l²‖ΔW_l‖_l²`` is minimized by
    ``ΔW_l = −(1/λ)(η/s_l)·dualize_l(G_l)`` with the single global ``η = Σ_k ‖G_k‖_k† / s_k``.
    This transformation returns the positive direction ``(η/s_l)·dualize_l(G_l)``; follow it with
    ``optax.scale_by_learning_rate(1/λ)``. The dual norms are measured as ``⟨G_l, dualize_l(G_l)⟩``
    (exact for an exact dualize; with Newton–Schulz it is the decrease the actual direction
    achieves).

    Args:
      norms: a norm name, or a tree prefix of names (or callable) choosing each leaf's norm.
      scales: a positive float, or a tree prefix of floats (or callable) giving ``s_l``.
      weight_dimension_numbers, **dualize_kwargs: as for :func:`dualize`.
    """
    inner = dualize(norms, weight_dimension_numbers, **dualize_kwargs)
    is_scale = lambda x: isinstance(x, int | float)

    def update_fn(updates, state, params=None):
        d, _ = inner.update(updates, optax.EmptyState())
        s_leaves = leaf_specs(scales, updates, is_spec=is_scale)
        g_leaves, treedef = jax.tree.flatten(updates)
        d_leaves = jax.tree.leaves(d)
        for s, p in zip(s_leaves, _paths(updates), strict=True):
            if s is None or not s > 0:
                raise ValueError(f"scale for {path_to_str(p)!r} must be a positive float, got {s}")
        eta = sum(
            jnp.vdot(g.astype(jnp.float32), t.astype(jnp.float32)) / s
            for g, t, s in zip(g_leaves, d_leaves, s_leaves, strict=True)
        )
        new = [(t * (eta / s)).astype(t.dtype) for t, s in zip(d_leaves, s_leaves, strict=True)]
        return jax.tree.unflatten(treedef, new), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)
