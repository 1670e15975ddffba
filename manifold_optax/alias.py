"""Ready optimizers: ``muon``, ``manifold_muon`` and ``trust_region``."""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import optax

from manifold_optax import norms as _norms
from manifold_optax._checks import checked
from manifold_optax.labels import FALLBACK, MATRIX, label_params, path_to_str
from manifold_optax.transforms import (
    DEFAULT_INIT_TOLERANCE,
    dualize,
    manifold_step,
    momentum,
    orthogonalize,
    resolve_manifolds,
    scale_by_shape,
)
from manifold_optax.transforms._leaves import view_specs

__all__ = ["muon", "manifold_muon", "trust_region", "adamw_fallback", "param_labels_fn"]


def param_labels_fn(weight_dimension_numbers=None, fallback_patterns: Sequence[str] = ()):
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
        mu_dtype=mu_dtype,
        nesterov=nesterov,
    )


def muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    ns_steps: int | None = None,
    ns_coeffs="polar_express",
    normalization: str = "schatten8",
    beta: float = 0.95,
    nesterov: bool = True,
    bias_correction: bool = True,
    weight_decay: float = 0.0,
    weight_decay_mask=None,
    mu_dtype=None,
    consistent_rms: float | None = None,
    weight_dimension_numbers=None,
    fallback_patterns: Sequence[str] = (),
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps: float = 1e-8,
    adam_eps_root: float = 0.0,
    adam_weight_decay: float = 0.0,
    adam_nesterov: bool | None = None,
    eps: float = 1e-8,
    precision=None,
    compute_dtype=None,
    group: bool | None = None,
    ns_method: str = "auto",
    sharding=None,
) -> optax.GradientTransformation:
    r"""Muon for the whole parameter tree: steepest descent under the spectral norm for the
    matrices, AdamW for everything else.

    Matrix leaves: :func:`momentum` → :func:`orthogonalize` (``msign``) → :func:`scale_by_shape`
    → decoupled weight decay → learning rate, i.e.
    ``W ← W − η·(√max(1, d_out/d_in)·msign(m̂) + λW)``. Other leaves: AdamW.

    Which leaf is a matrix (:func:`~manifold_optax.label_params`): with
    ``weight_dimension_numbers`` (a spec tree such as
    :func:`~manifold_optax.flax_dimension_numbers`'s, or a callable) the leaves with a spec,
    viewed as the spec says (conv kernels, attention projections, stacked layers); without
    one, the 2-D leaves (a leaf with more axes is ambiguous and raises ValueError naming it).
    Any path matching a regex in ``fallback_patterns`` (e.g. ``"embed"``, ``"head"``) goes to
    AdamW.

    ``ns_steps=None`` means the schedule's default (5). Under ``optax.inject_hyperparams`` any
    explicitly given ``ns_steps`` must be listed in ``static_args``; the learning rates, ``beta``
    and the weight decays can be injected (changed without recompiling).

    Speed: same-shape matrices share one batched msign on GPU/TPU (``group``), rectangular
    ones use Gram Newton–Schulz, ``compute_dtype=jnp.bfloat16`` runs the matmuls in bfloat16;
    ``sharding=MsignSharding(mesh, ...)`` places them on many devices.

    Parity with ``optax.contrib.muon``: ``ns_coeffs=(3.4445, -4.7750, 2.0315)``,
    ``normalization="frobenius"`` (defaults here are 5 Polar Express steps with Schatten-8
    normalization, which reach closer to the polar factor at the same cost).

    Args:
      learning_rate: ``η`` of the matrices (a float or schedule).
      ns_steps, ns_coeffs, normalization, eps, precision, compute_dtype, ns_method: the msign
        (:func:`~manifold_optax.msign`).
      beta, nesterov, bias_correction, mu_dtype: the momentum (:func:`momentum`).
      weight_decay, weight_decay_mask: decoupled weight decay ``λ`` of the matrices.
      consistent_rms: scale updates to this RMS instead (:func:`scale_by_shape`).
      weight_dimension_numbers, fallback_patterns: which leaves are matrices (see above).
      adam_*: the AdamW of the other leaves (``adam_learning_rate`` defaults to
        ``learning_rate``).
      group, sharding: batching of same-shape matrices and the many-device strategy.

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
    adam_learning_rate = learning_rate if adam_learning_rate is None else adam_learning_rate
    matrix_tx = optax.chain(
        momentum(beta, nesterov=nesterov, bias_correction=bias_correction, mu_dtype=mu_dtype),
        orthogonalize(
            ns_steps,
            ns_coeffs,
            weight_dimension_numbers,
            normalization=normalization,
            precision=precision,
            eps=eps,
            compute_dtype=compute_dtype,
            group=group,
            ns_method=ns_method,
            sharding=sharding,
        ),
        scale_by_shape(weight_dimension_numbers, consistent_rms),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    fallback_tx = adamw_fallback(
        adam_learning_rate,
        b1=adam_b1,
        b2=adam_b2,
        eps=adam_eps,
        eps_root=adam_eps_root,
        weight_decay=adam_weight_decay,
        mu_dtype=mu_dtype,
        nesterov=nesterov if adam_nesterov is None else adam_nesterov,
    )
    labels = param_labels_fn(weight_dimension_numbers, fallback_patterns)
    tx = optax.partition({MATRIX: matrix_tx, FALLBACK: fallback_tx}, labels)
    return checked(tx, "muon", sharding)


def trust_region(
    learning_rate: optax.ScalarOrSchedule,
    norm="spectral",
    *,
    beta: float = 0.9,
    radius: float | None = None,
    nesterov: bool = False,
    weight_dimension_numbers=None,
    **dualize_kwargs,
) -> optax.GradientTransformation:
    r"""Kovalev's non-Euclidean trust-region method with momentum (``docs/math.md``, Trust
    region with momentum).

    ``m ← β·m + (1−β)·g`` (momentum *before* the map), then
    ``x ← argmin_{‖x − x_k‖ ≤ η} ⟨m, x⟩ = x_k − η·dualize(m)``. With ``radius=ρ`` (the
    constrained problem over ``‖x‖ ≤ ρ``): ``x ← (1 − η/ρ)·x − η·dualize(m)``, i.e. decoupled
    weight decay ``1/ρ``. The spectral norm gives Muon, ``"frobenius"`` normalized SGD with
    momentum, ``"sign"`` signSGD with momentum. ``norm`` may be a tree prefix of names.
    Non-matrix leaves under a matrix norm count as ``(1, d)`` matrices (see :func:`dualize`).

    Args:
      learning_rate: ``η``, the trust-region radius of one step (a float or schedule;
        ``beta``, ``radius`` and ``learning_rate`` can be injected).
      norm: a norm name of :data:`~manifold_optax.NORMS`, or a tree prefix of names.
      beta: momentum decay.
      radius: ``ρ`` of the constraint ``‖x‖ ≤ ρ`` (``None``: unconstrained).
      nesterov: use the Nesterov look-ahead.
      weight_dimension_numbers: as in :func:`~manifold_optax.dualize`.
      **dualize_kwargs: the msign options of :func:`~manifold_optax.dualize`.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, optax, manifold_optax as mo
      >>> tx = mo.trust_region(0.1, "sign")
      >>> params = {"w": jnp.zeros(3)}
      >>> updates, _ = tx.update({"w": jnp.array([1.0, -2.0, 0.5])}, tx.init(params))
      >>> (updates["w"] / 0.1).tolist()  # −η·sign(m)
      [-1.0, 1.0, -1.0]

    References:
      Kovalev, "Understanding Gradient Orthogonalization for Deep Learning via Non-Euclidean
      Trust-Region Optimization" (arXiv:2503.12645, 2025).
    """
    if isinstance(norm, str):
        _norms.check_norm(norm)
    # (optax.inject_hyperparams binds the catch-all as one keyword of that name.)
    dualize_kwargs = {**dualize_kwargs.pop("dualize_kwargs", {}), **dualize_kwargs}
    parts = [
        momentum(beta, nesterov=nesterov, bias_correction=False),
        dualize(norm, weight_dimension_numbers, **dualize_kwargs),
    ]
    if radius is not None:
        if not isinstance(radius, jax.core.Tracer) and not radius > 0:
            raise ValueError(f"radius must be positive, got {radius}")
        parts.append(optax.add_decayed_weights(1.0 / radius))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return checked(optax.chain(*parts), "trust_region", dualize_kwargs.get("sharding"))


MANIFOLD = "manifold"


def manifold_labels_fn(manifold, weight_dimension_numbers=None, fallback_patterns=()):
    """A callable ``params → labels``: ``"manifold"`` where the spec gives a Manifold (on the
    matrix leaves ``weight_dimension_numbers`` names, if given) and the path matches none of
    ``fallback_patterns``."""
    patterns = [re.compile(p) for p in fallback_patterns]

    def fn(params):
        manifolds = resolve_manifolds(
            manifold, params, view_specs(weight_dimension_numbers, params)
        )
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        labels = [
            MANIFOLD
            if m is not None and not any(p.search(path_to_str(path)) for p in patterns)
            else FALLBACK
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
    adam_weight_decay: float = 0.0,
    muon_weight_decay: float = 0.0,
    sharding=None,
    group: bool | None = None,
    weight_dimension_numbers=None,
    fallback_patterns: Sequence[str] = (),
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
      dual_learning_rate, inner_steps, exact_config, init_tolerance: see
        :func:`dual_ascent`.
      ns_steps, ns_coeffs, compute_dtype: the msign, as in :func:`dual_ascent`
        (``compute_dtype`` also applies to the ``fallback="muon"`` matrices).
      sharding, group: many devices and batching, as in :func:`dual_ascent`.
      weight_dimension_numbers: the matrix each leaf is (e.g.
        :func:`~manifold_optax.flax_dimension_numbers`'s tree), as in :func:`dual_ascent`; a
        single ``Manifold`` then applies to the leaves with a spec (so does ``fallback="muon"``).
      fallback_patterns: regexes on a path (``re.search``) kept off the manifold (``"head"``).
      power_iters: the spectral sphere retraction's filter degree (6), see :func:`manifold_step`.

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
    if fallback == "adamw":
        fallback_tx = adamw_fallback(
            adam_learning_rate,
            b1=adam_b1,
            b2=adam_b2,
            eps=adam_eps,
            weight_decay=adam_weight_decay,
            mu_dtype=mu_dtype,
            nesterov=nesterov,
        )
    else:
        fallback_tx = muon(
            learning_rate,
            ns_steps=ns_steps,
            ns_coeffs=ns_coeffs,
            compute_dtype=compute_dtype,
            beta=beta,
            nesterov=nesterov,
            weight_decay=muon_weight_decay,
            mu_dtype=mu_dtype,
            weight_dimension_numbers=weight_dimension_numbers,
            adam_learning_rate=adam_learning_rate,
            adam_b1=adam_b1,
            adam_b2=adam_b2,
            adam_eps=adam_eps,
            adam_weight_decay=adam_weight_decay,
            sharding=sharding,
        )
    tx = optax.partition({MANIFOLD: manifold_tx, FALLBACK: fallback_tx}, labels)
    return checked(tx, "manifold_muon", sharding)
