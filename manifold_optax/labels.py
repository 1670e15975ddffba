"""Which parameter gets which rule: specs broadcast over a parameter tree, matrix specs, and
labels by rank, spec or path pattern.

Paths are written ``"a/b/0/kernel"``; the trailing ``.value`` that Flax NNX ``Variable`` nodes
add is dropped, so a spec or a pattern finds the same leaf whether a tree holds ``nnx.Param``
objects (``tx.init``, ``nnx.state(model, nnx.Param)``) or raw arrays (``tx.update``,
``.to_pure_dict()``). Labels are trees of strings for :func:`optax.partition`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
from optax.contrib import MuonDimensionNumbers

__all__ = [
    "DEFAULT_FALLBACK_PATTERNS",
    "path_matcher",
    "MuonDimensionNumbers",
    "MatrixSpec",
    "path_to_str",
    "leaf_specs",
    "label_params",
    "matrix_mask",
    "is_dim_nums",
    "ambiguous_leaf_error",
]

MATRIX = "matrix"
FALLBACK = "fallback"
AMBIGUOUS = "ambiguous"

#: The path components that every optimizer (and :func:`~manifold_optax.flax_dimension_numbers`)
#: sends to the fallback optimizer by default: token embeddings and output heads, whose
#: matrices are lookup tables and logits maps rather than hidden-layer operators.
DEFAULT_FALLBACK_PATTERNS = (
    "embed",
    "embedding",
    "embeddings",
    "embedder",
    "wte",
    "lm_head",
    "head",
    "output_head",
    "unembed",
)


def path_matcher(patterns: Sequence[str]):
    """A predicate ``path → bool``: whether a pattern matches whole components of the path.

    Each pattern is a regular expression that must match one component, or a run of
    consecutive components, entirely: ``"head"`` matches ``"lm/head/kernel"`` but not
    ``"multi_head/kernel"``; ``"emb.*"`` matches ``"embedder/embedding"``; ``"attn/out"``
    matches ``"blocks/0/attn/out/kernel"``.

    Example:
      >>> from manifold_optax.labels import path_matcher
      >>> match = path_matcher(("head",))
      >>> match("lm/head/kernel"), match("multi_head/kernel")
      (True, False)
    """
    if isinstance(patterns, str):
        raise TypeError(f"patterns must be a sequence of strings, got the string {patterns!r}")
    compiled = [re.compile(rf"(?:^|/)(?:{p})(?:/|$)") for p in patterns]
    return lambda path: any(r.search(path) for r in compiled)


def _rank_label(x) -> str:
    return MATRIX if jax.numpy.ndim(x) == 2 else FALLBACK


class MatrixSpec(NamedTuple):
    """Which axes of a leaf form its matrix: ``optax.contrib.MuonDimensionNumbers`` with a split.

    The reduction axes (flattened) are the matrix's rows (fan-in), the output axes its columns
    (fan-out), every other axis a batch of independent matrices. ``split = k`` cuts the
    columns into ``k`` equal consecutive parts, each its own matrix (a fused QKV kernel
    ``(in, 3·d)`` as three ``(in, d)`` matrices). Accepted wherever ``MuonDimensionNumbers`` is.

    Example:
      >>> import manifold_optax as mo
      >>> qkv = mo.MatrixSpec(reduction_axis=0, output_axis=1, split=3)
    """

    reduction_axis: Sequence[int] | int = 0
    output_axis: Sequence[int] | int = 1
    split: int = 1


def is_dim_nums(x: Any) -> bool:
    """Whether ``x`` is a weight dimension spec (``MuonDimensionNumbers`` or ``MatrixSpec``)."""
    return isinstance(x, MuonDimensionNumbers | MatrixSpec)


def path_to_str(path) -> str:
    """``(DictKey('layers'), SequenceKey(0), DictKey('kernel'))`` → ``"layers/0/kernel"``."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    if parts and parts[-1] == "value" and path and isinstance(path[-1], jax.tree_util.GetAttrKey):
        parts.pop()
    return "/".join(parts) if parts else "<root>"


def ambiguous_leaf_error(path: str, shape) -> ValueError:
    """The error for a leaf with more than two axes and no weight dimension spec."""
    return ValueError(
        f"parameter {path!r} has shape {tuple(shape)}: with more than two axes and no weight "
        "dimension spec its matrix is ambiguous (stacked layers? a convolution? attention "
        "heads?); give weight_dimension_numbers (e.g. mo.flax_dimension_numbers(model)), or "
        "name it in fallback_patterns"
    )


def leaf_specs(spec, tree, *, is_spec=is_dim_nums) -> list:
    """One spec per leaf of ``tree`` (``jax.tree.leaves`` order) from ``spec``: a single spec
    (or ``None``) for every leaf, a callable ``tree → spec or spec tree``, or a spec tree.

    A spec tree is matched to ``tree`` by path: each leaf takes the spec at its own path or at
    the longest path above it (a spec for ``"layers"`` covers ``"layers/0/kernel"``); ``None``
    there means no spec. ``nnx.Variable`` wrappers (``.value``) on either side are ignored, so
    a tree built over ``nnx.state(model, nnx.Param)``, over its ``.to_pure_dict()`` or over the
    raw gradients all match. A leaf that no path covers raises ValueError naming it.
    """
    n = len(jax.tree.leaves(tree))
    if spec is None or is_spec(spec):
        return [spec] * n
    if callable(spec):
        spec = spec(tree)
        if spec is None or is_spec(spec):
            return [spec] * n
    entries = {}
    flat, _ = jax.tree_util.tree_flatten_with_path(spec, is_leaf=lambda x: x is None or is_spec(x))
    for path, s in flat:
        entries[_path_key(path)] = s
    if not entries:
        raise ValueError("the spec tree is empty")
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = _path_key(path)
        for k in range(len(key), -1, -1):
            if key[:k] in entries:
                out.append(entries[key[:k]])
                break
        else:
            raise ValueError(
                f"the spec tree has no entry for parameter {'/'.join(key)!r} (nor for any path "
                f"above it); it has {sorted('/'.join(e) for e in entries)[:6]}"
            )
    return out


def _path_key(path) -> tuple:
    s = path_to_str(path)
    return () if s == "<root>" else tuple(s.split("/"))


def label_params(
    params,
    *,
    weight_dimension_numbers=None,
    fallback_patterns: Sequence[str] = DEFAULT_FALLBACK_PATTERNS,
    matrix_patterns: Sequence[str] | None = None,
    matrix_label: str = MATRIX,
    fallback_label: str = FALLBACK,
):
    """Label each leaf ``matrix_label`` (the matrix rule: Muon, manifold Muon) or
    ``fallback_label`` (AdamW).

    Rules, in order:
      1. a path matching a pattern of ``fallback_patterns`` on whole components
         (:func:`path_matcher`; default :data:`DEFAULT_FALLBACK_PATTERNS`: embeddings and
         output heads) → fallback; ``()`` sends none;
      2. if ``matrix_patterns`` is given, a path matching one of them (as in 1) → matrix,
         else fallback;
      3. with ``weight_dimension_numbers`` (a ``MuonDimensionNumbers`` or
         :class:`MatrixSpec` tree, e.g. :func:`~manifold_optax.flax_dimension_numbers`'s, or a
         callable returning one): a spec → matrix, ``None`` → fallback;
      4. by rank: two axes → matrix, zero or one → fallback; more than two is ambiguous
         (stacked layers, convolutions, attention heads) and raises ValueError naming the path.

    Args:
      params: the parameter tree (arrays, ``nnx.Param`` wrappers or shapes).
      weight_dimension_numbers: a spec, a spec tree or a callable (rule 3).
      fallback_patterns: path components sent to the fallback (rule 1).
      matrix_patterns: path components that alone are matrices (rule 2).
      matrix_label: the label of the matrix rule.
      fallback_label: the label of the fallback.

    Returns:
      A tree of labels with ``params``' structure, for :func:`optax.partition`.

    Example:
      >>> import jax.numpy as jnp, manifold_optax as mo
      >>> mo.label_params({"w": jnp.ones((2, 2)), "b": jnp.ones(2), "head": jnp.ones((2, 3))})
      {'b': 'fallback', 'head': 'fallback', 'w': 'matrix'}
    """
    is_fallback = path_matcher(fallback_patterns)
    is_matrix = None if matrix_patterns is None else path_matcher(matrix_patterns)
    if weight_dimension_numbers is None:
        base = jax.tree_util.tree_map_with_path(
            lambda p, x: AMBIGUOUS if jax.numpy.ndim(x) > 2 else _rank_label(x), params
        )
    else:
        dims = leaf_specs(weight_dimension_numbers, params)
        leaves, treedef = jax.tree.flatten(params)
        base = jax.tree.unflatten(treedef, [MATRIX if d is not None else FALLBACK for d in dims])

    def label(path, leaf, b):
        s = path_to_str(path)
        if is_fallback(s):
            return fallback_label
        if is_matrix is not None:
            return matrix_label if is_matrix(s) else fallback_label
        if b == AMBIGUOUS:
            raise ambiguous_leaf_error(s, jax.numpy.shape(leaf))
        return matrix_label if b == MATRIX else fallback_label

    return jax.tree_util.tree_map_with_path(label, params, base)


def matrix_mask(labels, matrix_label: str = MATRIX):
    """Boolean tree: True where the label is the matrix label."""
    return jax.tree.map(lambda lab: lab == matrix_label, labels)
