"""Kovalev's non-Euclidean trust-region method with momentum, for any norm of
:data:`~manifold_optax.NORMS`."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax

from manifold_optax import norms as _norms
from manifold_optax._checks import checked
from manifold_optax.labels import DEFAULT_FALLBACK_PATTERNS, leaf_specs, path_matcher, path_to_str
from manifold_optax.transforms import dualize, momentum

__all__ = ["trust_region"]


def _with_fallback(norm, patterns, fallback_norm):
    """``norm`` (a name, tree prefix or callable) with ``fallback_norm`` on matching paths."""
    if not patterns:
        return norm
    match = path_matcher(patterns)

    def fn(tree):
        names = leaf_specs(norm, tree, is_spec=lambda x: isinstance(x, str))
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        out = [
            fallback_norm if match(path_to_str(p)) else n
            for (p, _), n in zip(flat, names, strict=True)
        ]
        return jax.tree.unflatten(treedef, out)

    return fn


def trust_region(
    learning_rate: optax.ScalarOrSchedule,
    norm="spectral",
    *,
    beta: float = 0.9,
    radius: float | None = None,
    nesterov: bool = False,
    weight_dimension_numbers=None,
    fallback_patterns: Sequence[str] = DEFAULT_FALLBACK_PATTERNS,
    fallback_norm: str = "sign",
    **dualize_kwargs,
) -> optax.GradientTransformation:
    r"""Kovalev's non-Euclidean trust-region method with momentum (``docs/math.md``, Trust
    region with momentum).

    ``m ← β·m + (1−β)·g`` (momentum *before* the map), then
    ``x ← argmin_{‖x − x_k‖ ≤ η} ⟨m, x⟩ = x_k − η·dualize(m)``. With ``radius=ρ`` (the
    constrained problem over ``‖x‖ ≤ ρ``): ``x ← (1 − η/ρ)·x − η·dualize(m)``, i.e. decoupled
    weight decay ``1/ρ``. The spectral norm gives Muon, ``"frobenius"`` normalized SGD with
    momentum, ``"sign"`` signSGD with momentum. ``norm`` may be a tree prefix of names.
    Non-matrix leaves under a matrix norm count as ``(1, d)`` matrices (see :func:`dualize`).
    Paths whose components match ``fallback_patterns`` (by default embeddings and output
    heads, as in :func:`muon`) take ``fallback_norm`` instead (``"sign"``: the ℓ∞ geometry
    that Adam's update approximates, where :func:`muon` sends them to AdamW).

    Args:
      learning_rate: ``η``, the trust-region radius of one step (a float or schedule;
        ``beta``, ``radius`` and ``learning_rate`` can be injected).
      norm: a norm name of :data:`~manifold_optax.NORMS`, or a tree prefix of names.
      beta: momentum decay.
      radius: ``ρ`` of the constraint ``‖x‖ ≤ ρ`` (``None``: unconstrained).
      nesterov: use the Nesterov look-ahead.
      weight_dimension_numbers: as in :func:`~manifold_optax.dualize`.
      fallback_patterns: path components (:func:`~manifold_optax.labels.path_matcher`) that
        take ``fallback_norm``; ``()`` sends none.
      fallback_norm: the norm of those leaves.
      **dualize_kwargs: the msign options of :func:`~manifold_optax.dualize`.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, optax, manifold_optax as mo
      >>> tx = mo.trust_region(0.1, "sign")
      >>> params = {"w": jnp.zeros(3)}
      >>> updates, _ = tx.update({"w": jnp.array([1.0, -2.0, 0.5])}, tx.init(params))
      >>> (updates["w"] / 0.1).tolist()  # −η·sign(m)
      [-1.0, 1.0, -1.0]

    References:
      Kovalev, "Understanding Gradient Orthogonalization for Deep Learning via Non-Euclidean
      Trust-Region Optimization" (arXiv:2503.12645, 2025).
    """
    if isinstance(norm, str):
        _norms.check_norm(norm)
    _norms.check_norm(fallback_norm)
    # (optax.inject_hyperparams binds the catch-all as one keyword of that name.)
    dualize_kwargs = {**dualize_kwargs.pop("dualize_kwargs", {}), **dualize_kwargs}
    parts = [
        momentum(beta, nesterov=nesterov, bias_correction=False),
        dualize(
            _with_fallback(norm, fallback_patterns, fallback_norm),
            weight_dimension_numbers,
            **dualize_kwargs,
        ),
    ]
    if radius is not None:
        if not isinstance(radius, jax.core.Tracer) and not radius > 0:
            raise ValueError(f"radius must be positive, got {radius}")
        parts.append(optax.add_decayed_weights(1.0 / radius))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return checked(optax.chain(*parts), "trust_region", dualize_kwargs.get("sharding"))
