"""Matrix manifolds for manifold Muon: the template (``base``), its solvers (``solvers``), and
the certified exact solver (``certified``), and one file per manifold (``sphere``,
``spectral_sphere``, ``stiefel``, ``oblique``).

A new manifold subclasses :class:`Manifold` in a file of its own and is imported here, one line;
it is then exported as ``manifold_optax.<Name>``.
"""

from manifold_optax.manifolds.base import SOLVERS as SOLVERS
from manifold_optax.manifolds.base import BlockPlan as BlockPlan
from manifold_optax.manifolds.base import Manifold as Manifold
from manifold_optax.manifolds.base import PolishPlan as PolishPlan
from manifold_optax.manifolds.base import Solution as Solution
from manifold_optax.manifolds.base import SolverConfig as SolverConfig
from manifold_optax.manifolds.base import is_manifold as is_manifold
from manifold_optax.manifolds.certified import SolveInfo as SolveInfo
from manifold_optax.manifolds.oblique import Oblique as Oblique
from manifold_optax.manifolds.spectral_sphere import SpectralAux as SpectralAux
from manifold_optax.manifolds.spectral_sphere import SpectralSphere as SpectralSphere
from manifold_optax.manifolds.sphere import Sphere as Sphere
from manifold_optax.manifolds.stiefel import Stiefel as Stiefel

#: Every manifold imported above, in import order.
MANIFOLD_CLASSES = tuple(
    v
    for v in list(globals().values())
    if isinstance(v, type) and issubclass(v, Manifold) and v is not Manifold
)

__all__ = [
    "Manifold",
    "SolverConfig",
    "Solution",
    "SolveInfo",
    *(c.__name__ for c in MANIFOLD_CLASSES),
]
