"""Muon for a whole parameter tree: the matrices by steepest descent under the spectral norm,
everything else by AdamW, with ``optax.contrib.muon``'s keywords."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import optax

from manifold_optax._checks import checked
from manifold_optax.labels import DEFAULT_FALLBACK_PATTERNS, FALLBACK, MATRIX, label_params
from manifold_optax.transforms import momentum, orthogonalize, scale_by_shape

__all__ = [
    "muon",
    "muon_arguments",
    "build_muon",
    "muon_chain",
    "adamw_fallback",
    "param_labels_fn",
    "PRECONDITIONINGS",
]

#: optax.contrib.muon's ``preconditioning`` names → :func:`~manifold_optax.msign`'s
#: ``normalization``.
PRECONDITIONINGS = {
    "frobenius": "frobenius",
    "spectral": "spectral",
    "aol": "aol",
    "schatten": "schatten4",
}


def param_labels_fn(
    weight_dimension_numbers=None, fallback_patterns: Sequence[str] = DEFAULT_FALLBACK_PATTERNS
):
    """A callable ``params → labels`` for :func:`optax.partition` (see :func:`label_params`)."""

    def fn(params):
        return label_params(
            params,
            weight_dimension_numbers=weight_dimension_numbers,
            fallback_patterns=fallback_patterns,
        )

    return fn


def adamw_fallback(
    learning_rate,
    *,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    weight_decay=0.0,
    weight_decay_mask=None,
    mu_dtype=None,
    nesterov=True,
):
    """AdamW for the non-matrix leaves (Nesterov by default, as optax.contrib.muon)."""
    return optax.adamw(
        learning_rate=learning_rate,
        b1=b1,
        b2=b2,
        eps=eps,
        eps_root=eps_root,
        weight_decay=weight_decay,
        mask=weight_decay_mask,
        mu_dtype=mu_dtype,
        nesterov=nesterov,
    )


def _normalization(normalization, preconditioning):
    if preconditioning is None:
        return normalization
    if preconditioning not in PRECONDITIONINGS:
        raise ValueError(
            f"preconditioning must be one of {tuple(PRECONDITIONINGS)}, got {preconditioning!r}"
        )
    return PRECONDITIONINGS[preconditioning]


def _dims(weight_dimension_numbers, muon_weight_dimension_numbers):
    if muon_weight_dimension_numbers is None:
        return weight_dimension_numbers
    if weight_dimension_numbers is not None:
        raise ValueError(
            "give weight_dimension_numbers or its optax name muon_weight_dimension_numbers, "
            "not both"
        )
    return muon_weight_dimension_numbers


def muon_chain(learning_rate, middle=(), *, scale=None, pre=(), **kw):
    """Muon's matrix chain with ``middle`` transformations after the msign: momentum →
    ``*pre`` → :func:`orthogonalize` → ``*middle`` → ``scale`` (default
    :func:`scale_by_shape`) → decoupled weight decay → learning rate. ``kw`` are
    :func:`muon`'s matrix keywords."""
    dims = kw["weight_dimension_numbers"]
    if scale is None:
        scale = scale_by_shape(dims, kw["consistent_rms"])
    return optax.chain(
        momentum(
            kw["beta"],
            nesterov=kw["nesterov"],
            bias_correction=kw["bias_correction"],
            mu_dtype=kw["mu_dtype"],
        ),
        *pre,
        orthogonalize(
            kw["ns_steps"],
            kw["ns_coeffs"],
            dims,
            normalization=kw["normalization"],
            precision=kw["precision"],
            eps=kw["eps"],
            compute_dtype=kw["compute_dtype"],
            group=kw["group"],
            ns_method=kw["ns_method"],
            sharding=kw["sharding"],
            adaptive=kw["adaptive"],
        ),
        *middle,
        scale,
        optax.add_decayed_weights(kw["weight_decay"], kw["weight_decay_mask"]),
        optax.scale_by_learning_rate(learning_rate),
    )


def muon(
    learning_rate: optax.ScalarOrSchedule,
    ns_coeffs="polar_express",
    ns_steps: int | None = None,
    beta: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask=None,
    mu_dtype=None,
    *,
    nesterov: bool = True,
    adaptive: bool = False,
    preconditioning: str | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps_root: float = 0.0,
    adam_weight_decay: float = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    muon_weight_dimension_numbers=None,
    consistent_rms: float | None = None,
    normalization: str = "schatten8",
    bias_correction: bool = True,
    weight_dimension_numbers=None,
    fallback_patterns: Sequence[str] = DEFAULT_FALLBACK_PATTERNS,
    adam_eps: float | None = None,
    adam_nesterov: bool | None = None,
    adam_weight_decay_mask=None,
    precision=None,
    compute_dtype=None,
    group: bool | None = None,
    ns_method: str = "auto",
    sharding=None,
) -> optax.GradientTransformation:
    r"""Muon for the whole parameter tree: steepest descent under the spectral norm for the
    matrices, AdamW for everything else.

    .. math::

       m ← βm + (1−β)g,\qquad
       W ← W − η\,\bigl(\sqrt{\max(1, d_{out}/d_{in})}\,\operatorname{msign}(\hat m) + λW\bigr)

    Matrix leaves: :func:`momentum` → :func:`orthogonalize` (``msign``) → :func:`scale_by_shape`
    → decoupled weight decay → learning rate. Other leaves: AdamW.

    Which leaf is a matrix (:func:`~manifold_optax.label_params`): with
    ``weight_dimension_numbers`` (a spec tree such as
    :func:`~manifold_optax.flax_dimension_numbers`'s, or a callable) the leaves with a spec,
    viewed as the spec says (conv kernels, attention projections, stacked layers); without
    one, the 2-D leaves (a leaf with more axes is ambiguous and raises ValueError naming it).
    A path whose components match ``fallback_patterns`` (by default embeddings and output
    heads, :data:`~manifold_optax.labels.DEFAULT_FALLBACK_PATTERNS`) goes to AdamW.

    A drop-in for ``optax.contrib.muon``: the same positional order and keywords
    (``muon_weight_dimension_numbers``, ``adaptive``, ``preconditioning``, the ``adam_*``
    options, ``ns_coeffs="standard"`` or ``"dion"``). Its defaults differ in three places,
    each a keyword away from optax's settings: the schedule (5 Polar Express steps, which
    reach closer to the polar factor at the same cost; optax: ``ns_coeffs="standard"``), the
    normalization (Schatten-8; optax: ``preconditioning="frobenius"``) and
    ``fallback_patterns`` (optax: ``()``). Under ``optax.inject_hyperparams`` an explicitly
    given ``ns_steps`` must be listed in ``static_args``; the learning rates, ``beta`` and the
    weight decays can be injected.

    Args:
      learning_rate: ``η`` of the matrices (a float or schedule).
      ns_coeffs: the Newton–Schulz schedule: ``"polar_express"``, ``"jordan"`` (optax's
        ``"standard"``), ``"you"`` (optax's ``"dion"``), or a ``(k, 3)`` table.
      ns_steps: Newton–Schulz steps (``None``: the schedule's default, 5).
      beta: the momentum's decay rate.
      eps: the msign's denominator guard (and AdamW's ``eps`` unless ``adam_eps`` is given,
        as in optax).
      weight_decay: decoupled weight decay ``λ`` of the matrices.
      weight_decay_mask: a tree or callable of booleans restricting ``weight_decay``.
      mu_dtype: dtype of the first moments (Muon's and AdamW's).
      nesterov: Nesterov momentum (and AdamW's, unless ``adam_nesterov`` is given).
      adaptive: scale each direction by ``⟨m̂, msign(m̂)⟩`` (see :func:`orthogonalize`).
      preconditioning: optax's name for the normalization (``"frobenius"``, ``"spectral"``,
        ``"aol"``, ``"schatten"``); overrides ``normalization`` when given.
      adam_b1: AdamW's first-moment decay.
      adam_b2: AdamW's second-moment decay.
      adam_eps_root: AdamW's ``eps_root``.
      adam_weight_decay: AdamW's decoupled weight decay.
      adam_learning_rate: AdamW's learning rate (``None``: ``learning_rate``).
      muon_weight_dimension_numbers: optax's name for ``weight_dimension_numbers``.
      consistent_rms: scale updates to this RMS instead of the width rule
        (:func:`scale_by_shape`).
      normalization: the msign's normalization (:func:`~manifold_optax.msign`).
      bias_correction: divide the momentum by ``1 − βᵗ`` (:func:`momentum`).
      weight_dimension_numbers: which leaves are matrices, and how (see above).
      fallback_patterns: path components sent to AdamW (see above); ``()`` sends none.
      adam_eps: AdamW's ``eps`` (``None``: ``eps``).
      adam_nesterov: AdamW's Nesterov flag (``None``: ``nesterov``).
      adam_weight_decay_mask: a tree or callable of booleans restricting
        ``adam_weight_decay``.
      precision: the msign's matmul precision.
      compute_dtype: the msign's matmul input dtype (e.g. ``jnp.bfloat16``).
      group: batch same-shape matrices into one msign (:func:`orthogonalize`).
      ns_method: ``"auto"``, ``"standard"`` or ``"gram"`` (:func:`~manifold_optax.msign`).
      sharding: a :class:`~manifold_optax.MsignSharding` for many devices.

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.partition``).

    Example:
      >>> import jax.numpy as jnp, optax, manifold_optax as mo
      >>> params = {"w": jnp.eye(3), "b": jnp.zeros(3)}
      >>> tx = mo.muon(0.1)
      >>> updates, _ = tx.update({"w": jnp.diag(jnp.array([1.0, 2.0, 3.0])),
      ...                         "b": jnp.ones(3)}, tx.init(params), params)
      >>> bool(jnp.allclose(updates["w"], -0.1 * jnp.eye(3), atol=2e-2))  # −η·msign(G)
      True

    References:
      Jordan et al., "Muon" (2024); Liu et al., "Muon is Scalable for LLM Training"
      (arXiv:2502.16982); Amsel et al., "The Polar Express" (arXiv:2505.16932).
    """
    return build_muon(dict(locals()))


def muon_arguments(learning_rate, **kwargs) -> dict:
    """:func:`muon`'s arguments as a dict, defaults filled in: how an alias built on Muon's
    chain (:func:`build_muon`) takes every keyword :func:`muon` takes. An unknown keyword is a
    TypeError naming it."""
    bound = inspect.signature(muon).bind(learning_rate, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def build_muon(kw: dict, middle=(), *, scale=None, pre=(), name: str = "muon"):
    """The optimizer :func:`muon` returns for its arguments ``kw`` (:func:`muon_arguments`),
    with ``middle`` transformations after the msign and ``scale`` in place of
    :func:`scale_by_shape` (see :func:`muon_chain`); ``name`` labels its errors."""
    learning_rate, adam_learning_rate = kw["learning_rate"], kw["adam_learning_rate"]
    adam_learning_rate = learning_rate if adam_learning_rate is None else adam_learning_rate
    dims = _dims(kw["weight_dimension_numbers"], kw["muon_weight_dimension_numbers"])
    matrix_kw = {k: kw[k] for k in _MATRIX_KEYWORDS}
    matrix_kw["weight_dimension_numbers"] = dims
    matrix_kw["normalization"] = _normalization(kw["normalization"], kw["preconditioning"])
    matrix_tx = muon_chain(learning_rate, middle, scale=scale, pre=pre, **matrix_kw)
    fallback_tx = adamw_fallback(
        adam_learning_rate,
        b1=kw["adam_b1"],
        b2=kw["adam_b2"],
        eps=kw["eps"] if kw["adam_eps"] is None else kw["adam_eps"],
        eps_root=kw["adam_eps_root"],
        weight_decay=kw["adam_weight_decay"],
        weight_decay_mask=kw["adam_weight_decay_mask"],
        mu_dtype=kw["mu_dtype"],
        nesterov=kw["nesterov"] if kw["adam_nesterov"] is None else kw["adam_nesterov"],
    )
    labels = param_labels_fn(dims, kw["fallback_patterns"])
    tx = optax.partition({MATRIX: matrix_tx, FALLBACK: fallback_tx}, labels)
    return checked(tx, name, kw["sharding"])


_MATRIX_KEYWORDS = (
    "beta",
    "nesterov",
    "bias_correction",
    "mu_dtype",
    "ns_steps",
    "ns_coeffs",
    "precision",
    "eps",
    "compute_dtype",
    "group",
    "ns_method",
    "sharding",
    "adaptive",
    "consistent_rms",
    "weight_decay",
    "weight_decay_mask",
)
