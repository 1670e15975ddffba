"""Matrix manifolds for manifold Muon: the template (``base``), its solvers (``solvers``), and
one file per manifold (``sphere``, ``spectral_sphere``, ``stiefel``).

A new manifold subclasses :class:`Manifold` in a file of its own and is listed here.
"""

from manifold_optax.manifolds.base import (
    SOLVERS,
    Manifold,
    PolishPlan,
    SolverConfig,
    is_manifold,
)
from manifold_optax.manifolds.spectral_sphere import SpectralAux, SpectralSphere
from manifold_optax.manifolds.sphere import Sphere
from manifold_optax.manifolds.stiefel import Stiefel

__all__ = [
    "Manifold",
    "SolverConfig",
    "PolishPlan",
    "SOLVERS",
    "is_manifold",
    "Sphere",
    "SpectralSphere",
    "SpectralAux",
    "Stiefel",
]
