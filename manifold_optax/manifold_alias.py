"""Manifold Muon for a whole parameter tree: the manifold leaves by the fused step, the others
by AdamW or Muon."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax

from manifold_optax._checks import checked
from manifold_optax.alias import adamw_fallback, muon
from manifold_optax.labels import DEFAULT_FALLBACK_PATTERNS, FALLBACK, path_matcher, path_to_str
from manifold_optax.transforms import (
    DEFAULT_INIT_TOLERANCE,
    manifold_step,
    momentum,
    resolve_manifolds,
)
from manifold_optax.transforms._leaves import view_specs

__all__ = ["manifold_muon", "manifold_labels_fn", "MANIFOLD"]

MANIFOLD = "manifold"


def manifold_labels_fn(
    manifold, weight_dimension_numbers=None, fallback_patterns=DEFAULT_FALLBACK_PATTERNS
):
    """A callable ``params → labels``: ``"manifold"`` where the spec gives a Manifold (on the
    matrix leaves ``weight_dimension_numbers`` names, if given) and the path matches none of
    ``fallback_patterns`` (:func:`~manifold_optax.labels.path_matcher`)."""
    is_fallback = path_matcher(fallback_patterns)

    def fn(params):
        manifolds = resolve_manifolds(
            manifold, params, view_specs(weight_dimension_numbers, params)
        )
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        labels = [
            MANIFOLD if m is not None and not is_fallback(path_to_str(path)) else FALLBACK
            for (path, _), m in zip(flat, manifolds, strict=True)
        ]
        return jax.tree.unflatten(treedef, labels)

    return fn


def manifold_muon(
    learning_rate: optax.ScalarOrSchedule,
    manifold,
    *,
    solver: str = "online",
    beta: float = 0.95,
    nesterov: bool = True,
    bias_correction: bool = True,
    dual_learning_rate: float | None = None,
    inner_steps: int | None = None,
    ns_steps: int | None = None,
    ns_coeffs="polar_express",
    compute_dtype=None,
    exact_config=None,
    power_iters: int | None = None,
    init_tolerance: float | None = DEFAULT_INIT_TOLERANCE,
    mu_dtype=None,
    fallback: str = "adamw",
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps: float = 1e-8,
    adam_eps_root: float = 0.0,
    adam_weight_decay: float = 0.0,
    adam_weight_decay_mask=None,
    adam_nesterov: bool | None = None,
    muon_weight_decay: float = 0.0,
    muon_weight_decay_mask=None,
    normalization: str = "schatten8",
    precision=None,
    eps: float = 1e-8,
    consistent_rms: float | None = None,
    adaptive: bool = False,
    ns_method: str = "auto",
    sharding=None,
    group: bool | None = None,
    weight_dimension_numbers=None,
    fallback_patterns: Sequence[str] = DEFAULT_FALLBACK_PATTERNS,
) -> optax.GradientTransformation:
    r"""Manifold Muon: steepest descent under the spectral norm that keeps weights on a manifold.

    Manifold leaves: :func:`momentum` → :func:`manifold_step` (``Φ = msign(G + C_W*(Y))``,
    the multiplier update, the learning rate and the retraction, fused to share products and
    gathers), i.e. ``W ← R(W − η·Φ)``. Every other leaf goes to AdamW (``fallback="adamw"``)
    or to :func:`muon` (``fallback="muon"``; its own non-matrix leaves then go to AdamW).

    Args:
      learning_rate: η (a float or schedule). With ``optax.inject_hyperparams`` every float
        can be injected; ``inner_steps`` and ``power_iters`` (sizes) go in ``static_args``.
      manifold: a ``Manifold`` (every matrix leaf: see :func:`~manifold_optax.label_params`'s
        rule), a tree prefix of ``Manifold | None``, or a callable ``params → such a tree``.
      solver: ``"online"`` (default: one dual step per training step, the multiplier in the
        state — one msign per step), ``"dual_ascent"``, ``"exact"`` or ``"fixed_point"``.
      beta: the momentum's decay rate (the manifold leaves' and the fallback's).
      nesterov: Nesterov momentum (and AdamW's, unless ``adam_nesterov`` is given).
      bias_correction: divide the momentum by ``1 − βᵗ`` (:func:`momentum`).
      dual_learning_rate: ``η₂`` of the dual step (see :func:`dual_ascent`).
      inner_steps: dual steps per call of ``"dual_ascent"`` (see :func:`dual_ascent`).
      ns_steps: Newton–Schulz steps of the online msign (and of the ``"muon"`` fallback).
      ns_coeffs: the Newton–Schulz schedule (as in :func:`muon`).
      compute_dtype: the msign's matmul input dtype (also the ``"muon"`` fallback's).
      exact_config: a :class:`~manifold_optax.SolverConfig`; ``inner_steps``,
        ``dual_learning_rate`` and ``power_iters`` given here override its fields, left at
        ``None`` they keep them.
      power_iters: the spectral sphere retraction's filter degree (``None``: 6, or
        ``exact_config.power_iters``), see :func:`manifold_step`.
      init_tolerance: see :func:`dual_ascent`.
      mu_dtype: dtype of the first moments.
      fallback: ``"adamw"`` or ``"muon"`` for the leaves off the manifolds.
      adam_learning_rate: AdamW's learning rate (``None``: ``learning_rate``).
      adam_b1: AdamW's first-moment decay.
      adam_b2: AdamW's second-moment decay.
      adam_eps: AdamW's ``eps``.
      adam_eps_root: AdamW's ``eps_root``.
      adam_weight_decay: AdamW's decoupled weight decay.
      adam_weight_decay_mask: a tree or callable of booleans restricting it.
      adam_nesterov: AdamW's Nesterov flag (``None``: ``nesterov``).
      muon_weight_decay: the ``"muon"`` fallback's decoupled weight decay.
      muon_weight_decay_mask: a tree or callable of booleans restricting it.
      normalization: the ``"muon"`` fallback's msign normalization (as in :func:`muon`).
      precision: the ``"muon"`` fallback's matmul precision.
      eps: the ``"muon"`` fallback's msign denominator guard.
      consistent_rms: the ``"muon"`` fallback's update RMS (as in :func:`muon`).
      adaptive: the ``"muon"`` fallback's dual-norm scaling (as in :func:`muon`).
      ns_method: the ``"muon"`` fallback's Newton–Schulz method (as in :func:`muon`).
      sharding: a :class:`~manifold_optax.MsignSharding` for many devices.
      group: batch same-shape leaves (see :func:`dual_ascent`).
      weight_dimension_numbers: the matrix each leaf is (e.g.
        :func:`~manifold_optax.flax_dimension_numbers`'s tree), as in :func:`dual_ascent`; a
        single ``Manifold`` then applies to the leaves with a spec (so does ``fallback="muon"``).
      fallback_patterns: path components kept off the manifold and sent to AdamW, with either
        fallback (default :data:`~manifold_optax.labels.DEFAULT_FALLBACK_PATTERNS`, as in
        :func:`muon`).

    With ``fallback="muon"`` the leaves off the manifolds get exactly :func:`muon` with the
    same ``learning_rate`` (and its shape factor or ``consistent_rms``), momentum, schedule
    and AdamW options.

    The explicit chain ``optax.chain(momentum(beta), dual_ascent(manifold, solver),
    optax.scale_by_learning_rate(learning_rate), retract(manifold))`` computes the same update
    for the manifold leaves (to float32 round-off; the spectral sphere's chain estimates ``Θ``
    with its own power block instead of reusing the retraction's top pair).

    Returns:
      An ``optax.GradientTransformation`` (an ``optax.partition``); its ``update`` needs
      ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, manifold_optax as mo
      >>> w0 = jax.random.normal(jax.random.key(0), (8, 4))
      >>> params = mo.project_params({"w": w0, "b": jnp.zeros(4)}, mo.Stiefel())
      >>> tx = mo.manifold_muon(0.05, mo.Stiefel())
      >>> grads = {"w": jax.random.normal(jax.random.key(1), (8, 4)), "b": jnp.ones(4)}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> w = optax.apply_updates(params, updates)["w"]
      >>> bool(jnp.allclose(w.T @ w, jnp.eye(4), atol=1e-5))
      True

    References:
      Bernstein, "Modular Manifolds" (Thinking Machines, 2025); Su Jianlin, "Steepest descent
      on manifolds", parts 1–5 (kexue.fm, 2025).
    """
    if fallback not in ("adamw", "muon"):
        raise ValueError(f"fallback must be 'adamw' or 'muon', got {fallback!r}")
    adam_learning_rate = learning_rate if adam_learning_rate is None else adam_learning_rate
    adam_nesterov = nesterov if adam_nesterov is None else adam_nesterov
    labels = manifold_labels_fn(manifold, weight_dimension_numbers, fallback_patterns)
    manifold_tx = optax.chain(
        momentum(beta, nesterov=nesterov, bias_correction=bias_correction, mu_dtype=mu_dtype),
        manifold_step(
            manifold,
            learning_rate,
            solver,
            dual_learning_rate=dual_learning_rate,
            inner_steps=inner_steps,
            ns_steps=ns_steps,
            ns_coeffs=ns_coeffs,
            compute_dtype=compute_dtype,
            exact_config=exact_config,
            power_iters=power_iters,
            init_tolerance=init_tolerance,
            sharding=sharding,
            group=group,
            weight_dimension_numbers=weight_dimension_numbers,
        ),
    )
    adam_kw = dict(
        adam_learning_rate=adam_learning_rate,
        adam_b1=adam_b1,
        adam_b2=adam_b2,
        adam_eps=adam_eps,
        adam_eps_root=adam_eps_root,
        adam_weight_decay=adam_weight_decay,
        adam_weight_decay_mask=adam_weight_decay_mask,
        adam_nesterov=adam_nesterov,
    )
    if fallback == "adamw":
        fallback_tx = adamw_fallback(
            adam_learning_rate,
            b1=adam_b1,
            b2=adam_b2,
            eps=adam_eps,
            eps_root=adam_eps_root,
            weight_decay=adam_weight_decay,
            weight_decay_mask=adam_weight_decay_mask,
            mu_dtype=mu_dtype,
            nesterov=adam_nesterov,
        )
    else:
        fallback_tx = muon(
            learning_rate,
            ns_coeffs,
            ns_steps,
            beta,
            eps,
            muon_weight_decay,
            muon_weight_decay_mask,
            mu_dtype,
            nesterov=nesterov,
            bias_correction=bias_correction,
            adaptive=adaptive,
            consistent_rms=consistent_rms,
            normalization=normalization,
            precision=precision,
            compute_dtype=compute_dtype,
            group=group,
            ns_method=ns_method,
            sharding=sharding,
            weight_dimension_numbers=weight_dimension_numbers,
            fallback_patterns=fallback_patterns,
            **adam_kw,
        )
    tx = optax.partition({MANIFOLD: manifold_tx, FALLBACK: fallback_tx}, labels)
    return checked(tx, "manifold_muon", sharding)
