"""Which parameter gets which rule: by rank, by weight-dimension spec, or by path pattern.

Labels are trees of strings for :func:`optax.partition`. Paths are written ``"a/b/0/kernel"``;
the trailing ``.value`` that Flax NNX ``Variable`` nodes add is dropped, so a pattern matches the
same leaf whether the tree holds ``nnx.Param`` objects (``tx.init``) or raw arrays
(``tx.update``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
from optax.contrib import MuonDimensionNumbers

__all__ = [
    "MuonDimensionNumbers",
    "path_to_str",
    "label_params",
    "matrix_mask",
    "is_dim_nums",
]

MATRIX = "matrix"
FALLBACK = "fallback"


def is_dim_nums(x: Any) -> bool:
    return isinstance(x, MuonDimensionNumbers)


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


def _resolve(spec, params):
    return spec(params) if callable(spec) and not is_dim_nums(spec) else spec


def label_params(
    params,
    *,
    weight_dimension_numbers=None,
    fallback_patterns: Sequence[str] = (),
    matrix_patterns: Sequence[str] | None = None,
    matrix_label: str = MATRIX,
    fallback_label: str = FALLBACK,
):
    """Label each leaf ``matrix_label`` (the matrix rule: Muon, manifold Muon) or
    ``fallback_label`` (AdamW).

    Rules, in order:
      1. a path matching any regex in ``fallback_patterns`` (``re.search``) → fallback
         (e.g. ``("embed", "head")`` sends embeddings and output heads to AdamW);
      2. if ``matrix_patterns`` is given, a path matching one of them → matrix, else fallback;
      3. with ``weight_dimension_numbers`` (a tree prefix of ``MuonDimensionNumbers | None`` or a
         callable returning one): a spec → matrix, ``None`` → fallback;
      4. by rank: exactly two axes → matrix, everything else → fallback.
    """
    fallback_res = [re.compile(p) for p in fallback_patterns]
    matrix_res = None if matrix_patterns is None else [re.compile(p) for p in matrix_patterns]
    dims = _resolve(weight_dimension_numbers, params)
    if dims is None:
        base = jax.tree.map(lambda x: MATRIX if jax.numpy.ndim(x) == 2 else FALLBACK, params)
    else:
        base = jax.tree.map(
            lambda d, sub: jax.tree.map(lambda _: MATRIX if d is not None else FALLBACK, sub),
            dims,
            params,
            is_leaf=lambda x: x is None or is_dim_nums(x),
        )

    def label(path, leaf, b):
        s = path_to_str(path)
        if any(r.search(s) for r in fallback_res):
            return fallback_label
        if matrix_res is not None:
            return matrix_label if any(r.search(s) for r in matrix_res) else fallback_label
        return matrix_label if b == MATRIX else fallback_label

    return jax.tree_util.tree_map_with_path(label, params, base)


def matrix_mask(labels, matrix_label: str = MATRIX):
    """Boolean tree: True where the label is the matrix label."""
    return jax.tree.map(lambda lab: lab == matrix_label, labels)
