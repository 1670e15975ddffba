"""The matrix each Flax layer's parameters are, as a tree of weight dimension specs: NNX modules
here, Linen modules through an abstract ``init`` (:mod:`manifold_optax.linen_specs`)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax

from manifold_optax._layer_rules import (
    VECTOR_NAMES,
    Layer,
    kernel_axes,
    pick,
    stored_spec,
    unknown_layer,
)
from manifold_optax.labels import DEFAULT_FALLBACK_PATTERNS, MatrixSpec, path_matcher, path_to_str

__all__ = ["flax_dimension_numbers"]


def flax_dimension_numbers(
    model,
    *example_inputs,
    heads: str = "joint",
    split_fused: int | Mapping[str, int] | None = None,
    fallback_patterns: Sequence[str] = DEFAULT_FALLBACK_PATTERNS,
    overrides: Mapping[str, MatrixSpec | None] | None = None,
    scan_axis: int | Mapping[str, int] | None = None,
    rngs=None,
    **init_kwargs,
):
    """A weight dimension spec for every parameter of a Flax model (NNX or Linen): the matrix
    each layer's kernel is, or ``None`` for the leaves that belong to the fallback optimizer.

    For an ``nnx.Module`` the result has the structure of ``nnx.state(model, nnx.Param)``;
    axes that lead the layer's own kernel layout (``nnx.scan`` / ``nnx.vmap`` stacks, experts)
    are a batch of matrices. For a Linen ``nn.Module`` give the example inputs of its
    ``init`` (and any keyword ``init`` takes): ``module.init`` is traced abstractly
    (``jax.eval_shape``: no FLOPs, no memory), every layer seen through
    ``nn.intercept_methods``, and the result has the structure of ``variables["params"]``;
    parameters stacked by ``nn.scan`` / ``nn.vmap`` on **any** axis (MaxText stores a scanned
    kernel as ``(in, layers, out)``) have their stacked axes found by comparing the stored
    shape with the one the layer created. Pass the result (or a function returning it) as
    ``weight_dimension_numbers`` to :func:`~manifold_optax.muon`,
    :func:`~manifold_optax.orthogonalize`, :func:`~manifold_optax.label_params` and the
    others.

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
    ``Einsum``                    the kernel of ``"x,kernel->y"``    summed indices × output ones
    ``Embed``; biases, scales     —                                  ``None`` (fallback)
    ============================  =================================  ===========================

    Linen's ``Dense``, ``DenseGeneral`` (any ``axis``, ``features``, ``batch_dims``: its batch
    axes are a batch of matrices), ``MultiHeadDotProductAttention``, ``Conv`` (any rank),
    ``ConvTranspose``, ``Einsum`` and ``Embed`` follow the same rules.

    Args:
      model: an ``nnx.Module``, or a Linen ``nn.Module`` (then give ``example_inputs``).
      *example_inputs: a Linen module's ``init`` inputs (arrays or ``jax.ShapeDtypeStruct``).
      heads: ``"joint"`` (an attention projection is one matrix) or ``"split"`` (one matrix
        per head: the head axis is a batch).
      split_fused: ``k`` (or ``{path regex: k}``) cuts a ``Linear`` kernel's columns into ``k``
        matrices (a fused QKV projection: ``k = 3``).
      fallback_patterns: path components (:func:`~manifold_optax.labels.path_matcher`) whose
        leaves get ``None``; by default embeddings and output heads
        (:data:`~manifold_optax.labels.DEFAULT_FALLBACK_PATTERNS`, as the optimizers).
      overrides: ``{path regex: spec or None}`` (``re.search``), checked first, for layers
        this function does not know.
      scan_axis: a Linen parameter's stacked axis (or ``{path regex: axis}``) where its shape
        alone cannot tell (the stacked size equals a neighbouring kernel size).
      rngs: a Linen module's ``init`` rngs (default: ``params`` and ``dropout`` keys).
      **init_kwargs: keywords of a Linen module's ``init`` (``train=False``, ``method=``).

    Returns:
      An ``nnx.State`` (NNX) or a dict (Linen) of ``MatrixSpec | None``, one per parameter.

    Raises:
      ValueError naming the parameter's path for a matrix-shaped parameter of a layer kind it
      does not know (custom modules): give it in ``overrides``.

    Example:
      >>> from flax import nnx
      >>> import manifold_optax as mo
      >>> model = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
      >>> nnx.to_pure_dict(mo.flax_dimension_numbers(model))
      {'bias': None, 'kernel': MatrixSpec(reduction_axis=(0,), output_axis=(1,), split=1)}
    """
    if heads not in ("joint", "split"):
        raise ValueError(f"heads must be 'joint' or 'split', got {heads!r}")
    options = dict(
        heads=heads,
        split_fused=split_fused,
        fallback_patterns=fallback_patterns,
        overrides=overrides,
    )
    from flax import linen

    if isinstance(model, linen.Module):
        from manifold_optax.linen_specs import linen_dimension_numbers

        return linen_dimension_numbers(
            model,
            example_inputs,
            scan_axis=scan_axis,
            rngs=rngs,
            init_kwargs=init_kwargs,
            **options,
        )
    if example_inputs or init_kwargs or rngs is not None or scan_axis is not None:
        raise ValueError(
            "example inputs, rngs, scan_axis and init keywords are for Linen modules; an NNX "
            f"model ({type(model).__name__}) is read as it is"
        )
    return _nnx_dimension_numbers(model, **options)


def rule_for(where, name, ndim, overrides, fallback_patterns):
    """``(done, spec)``: the override for ``where``, or ``None`` for a fallback path, a vector
    name or a leaf of fewer than two axes (``done``); else ``(False, None)``: the layer's
    rule decides."""
    if overrides:
        hit = [v for p, v in overrides.items() if re.search(p, where)]
        if hit:
            return True, hit[0]
    if path_matcher(fallback_patterns)(where) or name in VECTOR_NAMES or ndim < 2:
        return True, None
    return False, None


def _nnx_layer(owner, parent, child: str):
    from flax import nnx

    if isinstance(owner, nnx.Embed):
        return Layer("embed")
    if isinstance(owner, nnx.Conv | nnx.ConvTranspose):
        return Layer("conv", window=len(owner.kernel_size))
    if isinstance(owner, nnx.LinearGeneral):
        role = None
        if isinstance(parent, nnx.MultiHeadAttention):
            role = "out" if child == "out" else "qkv"
        n_in, n_out = len(owner.in_features), len(owner.out_features)
        return Layer("general", n_in=n_in, n_out=n_out, attention=role)
    if isinstance(owner, nnx.Linear):
        return Layer("linear")
    if isinstance(owner, nnx.Einsum):
        return Layer("einsum", equation=owner.einsum_str)
    return None


def _own_ndim(layer: Layer) -> int:
    if layer.kind == "linear":
        return 2
    if layer.kind == "conv":
        return layer.window + 2
    if layer.kind == "general":
        return layer.n_batch + layer.n_in + layer.n_out
    return len(layer.equation.replace(" ", "").split("->")[0].split(",")[1].replace("...", ""))


def _nnx_dimension_numbers(model, *, heads, split_fused, fallback_patterns, overrides):
    from flax import nnx

    modules = {  # keyed as path_to_str spells a path: list indices are strings
        tuple(str(k) for k in p): node
        for p, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Module)
    }

    def spec(path, x):
        keys = tuple(path_to_str(path).split("/"))
        name, owner = keys[-1], modules.get(keys[:-1])
        where = "/".join(keys)
        done, s = rule_for(where, name, x.ndim, overrides, fallback_patterns)
        if done:
            return s
        child = keys[-2] if len(keys) > 1 else ""
        layer = None if name != "kernel" else _nnx_layer(owner, modules.get(keys[:-2]), child)
        if layer is None:
            kind = type(owner).__name__ if owner is not None else "an unknown owner"
            raise unknown_layer(where, kind)
        if layer.kind == "embed":
            return None
        # Axes ahead of the layer's own kernel layout (nnx.scan / nnx.vmap stacks) lead.
        lead = x.ndim - _own_ndim(layer)
        red, out = kernel_axes(layer, heads, where)
        split = pick(split_fused, where, 1) if layer.kind == "linear" else 1
        return stored_spec(red, out, tuple(range(lead, x.ndim)), split)

    return jax.tree_util.tree_map_with_path(spec, nnx.state(model, nnx.Param))
