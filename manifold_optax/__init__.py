"""manifold_optax: steepest descent under the spectral norm and on matrix manifolds, for optax."""

from manifold_optax.linalg import (
    msign,
    msign_svd,
    newton_schulz_flops,
    nuclear_norm,
    spectral_norm,
    top_singular_pair,
)
from manifold_optax.schedules import get_schedule, polar_express_coefficients

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "msign",
    "msign_svd",
    "newton_schulz_flops",
    "nuclear_norm",
    "spectral_norm",
    "top_singular_pair",
    "get_schedule",
    "polar_express_coefficients",
]
