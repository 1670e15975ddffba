"""Matrix functions: the polar factor (``polar``) and the top singular subspace
(``spectral``)."""

from manifold_optax.linalg._ops import matmul_tn, per_matrix
from manifold_optax.linalg.polar import (
    msign,
    msign_svd,
    newton_schulz_flops,
    nuclear_norm,
    singular_values,
    spectral_norm,
)
from manifold_optax.linalg.spectral import top_singular_pair, top_singular_subspace

__all__ = [
    "msign",
    "msign_svd",
    "newton_schulz_flops",
    "nuclear_norm",
    "singular_values",
    "spectral_norm",
    "top_singular_pair",
    "top_singular_subspace",
    "matmul_tn",
    "per_matrix",
]
