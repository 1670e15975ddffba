"""The matrix a Flax layer's kernel is, by kind of layer: the rules that the NNX and the Linen
readers of a model (``flax_specs``, ``linen_specs``) share.

A rule reads the kernel as the layer itself creates it (before any ``scan``/``vmap`` stacking)
and returns its ``(reduction axes, output axes)``; the reader then moves them to the stored
array's axes, the stacked axes becoming a batch of matrices.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from manifold_optax.labels import MatrixSpec

__all__ = [
    "VECTOR_NAMES",
    "Layer",
    "kernel_axes",
    "einsum_axes",
    "pick",
    "unknown_layer",
    "stored_spec",
]

#: Parameter names that are never matrices (biases, norm scales, embedding tables).
VECTOR_NAMES = ("bias", "scale", "embedding")


class Layer(NamedTuple):
    """What a rule needs of a layer: its kind (``"linear"``, ``"general"``, ``"conv"``,
    ``"einsum"``, ``"embed"``), the counts of its kernel's batch, input and output axes
    (``"general"``), its window rank (``"conv"``), its einsum equation (``"einsum"``), and its
    role in an attention block (``"qkv"``, ``"out"`` or ``None``)."""

    kind: str
    n_batch: int = 0
    n_in: int = 1
    n_out: int = 1
    window: int = 0
    equation: str | None = None
    attention: str | None = None


def _axes(start: int, count: int) -> tuple[int, ...]:
    return tuple(range(start, start + count))


def einsum_axes(equation: str, where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The kernel's reduction and output axes of ``"inputs,kernel->out"``: kernel indices
    shared with the inputs but not the output are summed over (rows), those only in the
    output are the output (columns), those in all three a batch (experts)."""
    eq = equation.replace(" ", "").replace("...", "")
    m = re.fullmatch(r"([a-zA-Z]*),([a-zA-Z]*)->([a-zA-Z]*)", eq)
    if m is None:
        raise ValueError(
            f"parameter {where!r}: cannot read the einsum {equation!r} (two operands, the "
            "kernel second, are expected); give its spec in overrides"
        )
    lhs, rhs, out = m.groups()
    red = tuple(i for i, c in enumerate(rhs) if c in lhs and c not in out)
    cols = tuple(i for i, c in enumerate(rhs) if c in out and c not in lhs)
    if not red or not cols or any(c not in lhs and c not in out for c in rhs):
        raise ValueError(
            f"parameter {where!r}: the einsum {equation!r} does not use its kernel as a matrix "
            "(no summed or no output index); give its spec in overrides"
        )
    return red, cols


def kernel_axes(layer: Layer, heads: str, where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(reduction, output)`` axes of ``layer``'s own kernel (its unstacked layout)."""
    if layer.kind == "linear":
        return (0,), (1,)
    if layer.kind == "conv":
        return _axes(0, layer.window + 1), (layer.window + 1,)
    if layer.kind == "einsum":
        return einsum_axes(layer.equation, where)
    if layer.kind == "general":
        red = _axes(layer.n_batch, layer.n_in)
        out = _axes(layer.n_batch + layer.n_in, layer.n_out)
        if heads == "split" and layer.attention == "out":
            red = red[1:]  # (heads, head_dim, out): the head axis is a batch
        elif heads == "split" and layer.attention == "qkv":
            out = out[1:]  # (in, heads, head_dim)
        return red, out
    raise ValueError(f"parameter {where!r}: no matrix rule for a layer of kind {layer.kind!r}")


def stored_spec(red, out, stored_axes: Sequence[int], split: int = 1) -> MatrixSpec:
    """The spec of the stored array, whose axis ``stored_axes[i]`` is the layer's axis ``i``."""
    return MatrixSpec(
        tuple(stored_axes[a] for a in red), tuple(stored_axes[a] for a in out), split=int(split)
    )


def pick(mapping, path: str, default):
    """``mapping``'s value for ``path``: the first ``{regex: value}`` entry that
    ``re.search``-es it, a plain value for every path, or ``default``."""
    if isinstance(mapping, Mapping):
        for pattern, value in mapping.items():
            if re.search(pattern, path):
                return value
        return default
    return default if mapping is None else mapping


def unknown_layer(where: str, kind: str) -> ValueError:
    """The error for a matrix-shaped parameter of a layer kind no rule knows."""
    return ValueError(
        f"parameter {where!r} of {kind}: no known matrix layout; give its spec (a "
        "MatrixSpec, or None for the fallback optimizer) in flax_dimension_numbers(..., "
        f"overrides={{{where!r}: ...}})"
    )
