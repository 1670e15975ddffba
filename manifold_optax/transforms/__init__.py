"""Gradient transformations, one theme per module.

Sign convention (as optax's ``scale_by_*``): every direction-producing transformation returns
a *positive* direction, e.g. ``msign(G)``; ``optax.scale_by_learning_rate`` negates it. The
manifold transformations (``dual_ascent``, ``retract``, ``manifold_step``) need ``params`` in
``update``.
"""

from manifold_optax.transforms._leaf_state import LeafState
from manifold_optax.transforms._leaves import (
    DEFAULT_INIT_TOLERANCE,
    by_shape,
    leaf_specs,
    resolve_manifolds,
)
from manifold_optax.transforms.diagnostics import diagnostics
from manifold_optax.transforms.dual_ascent import DualAscentState, dual_ascent
from manifold_optax.transforms.dualize import dualize
from manifold_optax.transforms.manifold_step import ManifoldStepState, manifold_step
from manifold_optax.transforms.modular import scale_by_modular_norm, scale_by_shape
from manifold_optax.transforms.momentum import MomentumState, momentum
from manifold_optax.transforms.orthogonalize import orthogonalize
from manifold_optax.transforms.qk_clip import qk_clip
from manifold_optax.transforms.retract import RetractState, project_params, retract

__all__ = [
    "DEFAULT_INIT_TOLERANCE",
    "LeafState",
    "MomentumState",
    "DualAscentState",
    "RetractState",
    "ManifoldStepState",
    "by_shape",
    "leaf_specs",
    "resolve_manifolds",
    "momentum",
    "orthogonalize",
    "dualize",
    "scale_by_shape",
    "scale_by_modular_norm",
    "dual_ascent",
    "retract",
    "manifold_step",
    "project_params",
    "diagnostics",
    "qk_clip",
]
