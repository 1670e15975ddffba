"""manifold_optax: steepest descent under the spectral norm and on matrix manifolds, for optax."""

from manifold_optax import manifolds
from manifold_optax._platform import lowering_for
from manifold_optax.alias import muon
from manifold_optax.attention import attention_with_max_logits, max_attention_logits
from manifold_optax.flax_specs import flax_dimension_numbers
from manifold_optax.labels import (
    DEFAULT_FALLBACK_PATTERNS,
    MatrixSpec,
    MuonDimensionNumbers,
    label_params,
    path_to_str,
)
from manifold_optax.linalg import (
    msign,
    msign_svd,
    newton_schulz_flops,
    nuclear_norm,
    spectral_norm,
    top_singular_pair,
)
from manifold_optax.manifold_alias import manifold_muon
from manifold_optax.manifolds import *  # noqa: F403  (Manifold, SolverConfig, each manifold)
from manifold_optax.norms import NORMS, dual_norm, dualize_array, primal_norm
from manifold_optax.schedules import get_schedule, polar_express_coefficients
from manifold_optax.sharding import MsignSharding, collective_bytes, state_shardings
from manifold_optax.transforms import (
    DualAscentState,
    ManifoldStepState,
    MomentumState,
    RetractState,
    by_shape,
    diagnostics,
    dual_ascent,
    dualize,
    manifold_step,
    momentum,
    orthogonalize,
    project_params,
    qk_clip,
    resolve_manifolds,
    retract,
    scale_by_modular_norm,
    scale_by_shape,
)
from manifold_optax.transforms.second_moments import (
    ElementMomentState,
    NeuronMomentState,
    scale_by_element_second_moment,
    scale_by_neuron_second_moment,
)
from manifold_optax.trust_region import trust_region
from manifold_optax.variants import adamuon, normuon

__version__ = "0.4.0"

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
    "NORMS",
    "dual_norm",
    "dualize_array",
    "primal_norm",
    "MomentumState",
    "momentum",
    "orthogonalize",
    "dualize",
    "scale_by_shape",
    "scale_by_modular_norm",
    "muon",
    "manifold_muon",
    "trust_region",
    "normuon",
    "adamuon",
    "scale_by_neuron_second_moment",
    "scale_by_element_second_moment",
    "NeuronMomentState",
    "ElementMomentState",
    *manifolds.__all__,
    "dual_ascent",
    "retract",
    "manifold_step",
    "by_shape",
    "project_params",
    "diagnostics",
    "resolve_manifolds",
    "DualAscentState",
    "RetractState",
    "ManifoldStepState",
    "MsignSharding",
    "state_shardings",
    "collective_bytes",
    "lowering_for",
    "MuonDimensionNumbers",
    "MatrixSpec",
    "flax_dimension_numbers",
    "label_params",
    "path_to_str",
    "DEFAULT_FALLBACK_PATTERNS",
    "qk_clip",
    "max_attention_logits",
    "attention_with_max_logits",
]
