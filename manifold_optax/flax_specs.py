"""The matrix each Flax NNX layer's parameters are, as a tree of weight dimension specs."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax

from manifold_optax.labels import MatrixSpec, path_to_str

__all__ = ["flax_dimension_numbers"]

_VECTOR_NAMES = ("bias", "scale", "embedding")


def _axes(start: int, count: int) -> tuple[int, ...]:
    return tuple(range(start, start + count))


def _pick(mapping, path: str, default):
    if isinstance(mapping, Mapping):
        for pattern, value in mapping.items():
            if re.search(pattern, path):
                return value
        return default
    return default if mapping is None else mapping


def flax_dimension_numbers(
    model,
    *,
    heads: str = "joint",
    split_fused: int | Mapping[str, int] | None = None,
    fallback_patterns: Sequence[str] = ("embed", "head"),
    overrides: Mapping[str, MatrixSpec | None] | None = None,
):
    """A weight dimension spec for every parameter of a Flax NNX model: the matrix each layer's
    kernel is, or ``None`` for the leaves that belong to the fallback optimizer.

    The result has the structure of ``nnx.state(model, nnx.Param)``; pass it (or a function
    returning it) as ``weight_dimension_numbers`` to :func:`~manifold_optax.muon`,
    :func:`~manifold_optax.orthogonalize`, :func:`~manifold_optax.label_params` and the
    others. Axes that lead the layer's own kernel layout (``nnx.scan`` / ``nnx.vmap`` stacks,
    experts) are a batch of matrices.

    ============================  =================================  ===========================
    layer                         kernel                             matrix (rows × columns)
    ============================  =================================  ===========================
    ``Linear``                    ``(in, out)``                      ``in × out``
    ``LinearGeneral``             ``(*in, *out)``                    ``prod(in) × prod(out)``
    ``MultiHeadAttention`` q/k/v  ``(in, heads, head_dim)``          joint: ``in × heads·head_dim``;
                                                                     split: per head ``in × head_dim``
    ``MultiHeadAttention`` out    ``(heads, head_dim, out)``         joint: ``heads·head_dim × out``;
                                                                     split: per head ``head_dim × out``
    ``Conv``, ``ConvTranspose``   ``(*window, in, out)``             ``prod(window)·in × out``
    ``Embed``; biases, scales     —                                  ``None`` (fallback)
    ============================  =================================  ===========================

    Args:
      model: an ``nnx.Module``.
      heads: ``"joint"`` (an attention projection is one matrix) or ``"split"`` (one matrix
        per head: the head axis is a batch).
      split_fused: ``k`` (or ``{path regex: k}``) cuts a ``Linear`` kernel's columns into ``k``
        matrices (a fused QKV projection: ``k = 3``).
      fallback_patterns: regexes (``re.search``) on the parameter's path (``"blocks/0/head/
        kernel"``) whose leaves get ``None``; by default embeddings and output heads.
      overrides: ``{path regex: spec or None}``, checked first, for layers this function does
        not know.

    Returns:
      An ``nnx.State`` of ``MatrixSpec | None``, one per parameter.

    Raises:
      ValueError naming the parameter's path for a matrix-shaped parameter of a layer kind it
      does not know (``nnx.Einsum`` and custom modules): give it in ``overrides``.

    Example:
      >>> from flax import nnx
      >>> import manifold_optax as mo
      >>> model = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
      >>> nnx.to_pure_dict(mo.flax_dimension_numbers(model))
      {'bias': None, 'kernel': MatrixSpec(reduction_axis=(0,), output_axis=(1,), split=1)}
    """
    from flax import nnx

    if heads not in ("joint", "split"):
        raise ValueError(f"heads must be 'joint' or 'split', got {heads!r}")
    modules = {tuple(p): node for p, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}
    fallback = [re.compile(p) for p in fallback_patterns]

    def spec(path, x):
        keys = tuple(path_to_str(path).split("/"))
        name, owner = keys[-1], modules.get(keys[:-1])
        where = "/".join(keys)
        if overrides:
            hit = [v for p, v in overrides.items() if re.search(p, where)]
            if hit:
                return hit[0]
        if any(r.search(where) for r in fallback) or name in _VECTOR_NAMES or x.ndim < 2:
            return None
        if name != "kernel" or owner is None:
            return _unknown(where, owner)
        parent = modules.get(keys[:-2])
        if isinstance(owner, nnx.Embed):
            return None
        if isinstance(owner, nnx.Conv | nnx.ConvTranspose):
            window = len(owner.kernel_size)
            lead = x.ndim - window - 2
            return MatrixSpec(_axes(lead, window + 1), (x.ndim - 1,))
        if isinstance(owner, nnx.LinearGeneral):
            n_in, n_out = len(owner.in_features), len(owner.out_features)
            lead = x.ndim - n_in - n_out
            red, out = _axes(lead, n_in), _axes(lead + n_in, n_out)
            if heads == "split" and isinstance(parent, nnx.MultiHeadAttention):
                if keys[-2] == "out":
                    red = red[1:]  # (heads, head_dim): the head axis is a batch
                else:
                    out = out[1:]
            return MatrixSpec(red, out)
        if isinstance(owner, nnx.Linear):
            k = _pick(split_fused, where, 1)
            return MatrixSpec((x.ndim - 2,), (x.ndim - 1,), split=int(k))
        return _unknown(where, owner)

    return jax.tree_util.tree_map_with_path(spec, nnx.state(model, nnx.Param))


def _unknown(where, owner):
    kind = type(owner).__name__ if owner is not None else "an unknown owner"
    raise ValueError(
        f"parameter {where!r} of {kind}: no known matrix layout; give its spec (a "
        "MatrixSpec, or None for the fallback optimizer) in flax_dimension_numbers(..., "
        f"overrides={{{where!r}: ...}})"
    )
