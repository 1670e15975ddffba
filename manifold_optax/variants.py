"""Muon's variants for large-scale training: NorMuon (a second moment per output neuron) and
AdaMuon (an elementwise second moment and Adam's RMS), each Muon's chain with one more
transformation (:func:`~manifold_optax.alias.build_muon`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from manifold_optax._placement import placed
from manifold_optax.alias import build_muon, muon_arguments
from manifold_optax.transforms.second_moments import (
    scale_by_element_second_moment,
    scale_by_neuron_second_moment,
)

__all__ = ["normuon", "adamuon"]


def _dims(kw):
    return kw["weight_dimension_numbers"] or kw["muon_weight_dimension_numbers"]


def normuon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    beta: float = 0.95,
    beta2: float = 0.95,
    eps: float = 1e-8,
    **muon_kwargs,
) -> optax.GradientTransformation:
    r"""NorMuon: Muon whose orthogonalized update is normalized per output neuron.

    .. math::

       O = \operatorname{msign}(\hat m),\quad
       v ← β_2 v + (1 − β_2)\operatorname{mean}_i O_{ij}^2,\quad
       O ← \frac{‖O‖_F}{‖O/(\sqrt v + ε)‖_F}\,\frac{O}{\sqrt v + ε},\quad
       W ← W − η\,(\sqrt{\max(1, d_{out}/d_{in})}\,O + λW)

    (:func:`~manifold_optax.scale_by_neuron_second_moment` between the msign and the shape
    factor of :func:`~manifold_optax.muon`; ``consistent_rms`` replaces the shape factor as
    there). Non-matrix leaves: AdamW, as in :func:`~manifold_optax.muon`.

    Args:
      learning_rate: ``η`` of the matrices (a float or schedule).
      beta: the momentum's decay rate.
      beta2: the neuron-wise second moment's decay rate.
      eps: added to ``√v`` (and the msign's and AdamW's ``eps``, as in ``muon``).
      **muon_kwargs: every other keyword of :func:`~manifold_optax.muon`.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, manifold_optax as mo
      >>> tx = mo.normuon(0.02)
      >>> params = {"w": jnp.eye(4), "b": jnp.zeros(4)}
      >>> u, _ = tx.update({"w": jnp.eye(4), "b": jnp.ones(4)}, tx.init(params), params)
      >>> u["w"].shape
      (4, 4)

    References:
      Li et al., "NorMuon: Making Muon more efficient and scalable" (arXiv:2510.05491, 2025).
    """
    kw = muon_arguments(learning_rate, beta=beta, eps=eps, **muon_kwargs)
    middle = (scale_by_neuron_second_moment(beta2, eps, _dims(kw)),)
    return build_muon(kw, middle, name="normuon")


def _sign():
    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(jnp.sign, updates), state

    return placed(optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn))


def adamuon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    beta: float = 0.95,
    beta2: float = 0.999,
    eps: float = 1e-8,
    sign_momentum: bool = False,
    rms: float = 0.2,
    **muon_kwargs,
) -> optax.GradientTransformation:
    r"""AdaMuon: Muon whose orthogonalized update gets an elementwise second moment and Adam's
    RMS.

    .. math::

       O = \operatorname{msign}(\hat m)\ (\operatorname{msign}(\operatorname{sign}\hat m)
       \text{ with sign\_momentum}),\quad v ← β_2 v + (1 − β_2)\,O⊙O,\quad
       \hat v = \frac{v}{1 − β_2^t},\quad
       W ← W − η\,\Bigl(ρ\sqrt{mn}\,\frac{O/(\sqrt{\hat v} + ε)}{‖O/(\sqrt{\hat v} + ε)‖_F}
       + λW\Bigr)

    (:func:`~manifold_optax.scale_by_element_second_moment` after the msign, in place of the
    shape factor): the update has RMS ``ρ = 0.2``, as AdamW's, so AdamW learning rates carry
    over. Non-matrix leaves: AdamW, as in :func:`~manifold_optax.muon`.

    Args:
      learning_rate: ``η`` (a float or schedule).
      beta: the momentum's decay rate.
      beta2: the elementwise second moment's decay rate.
      eps: added to ``√v̂`` (and the msign's and AdamW's ``eps``, as in ``muon``).
      sign_momentum: orthogonalize ``sign(m̂)`` (the authors' sign stabilization).
      rms: ``ρ``, the update's RMS.
      **muon_kwargs: every other keyword of :func:`~manifold_optax.muon`.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax.numpy as jnp, manifold_optax as mo
      >>> tx = mo.adamuon(1e-3)
      >>> params = {"w": jnp.eye(4), "b": jnp.zeros(4)}
      >>> u, _ = tx.update({"w": jnp.eye(4), "b": jnp.ones(4)}, tx.init(params), params)
      >>> round(float(jnp.sqrt(jnp.mean(u["w"] ** 2))) / 1e-3, 3)  # RMS ρ·η
      0.2

    References:
      Si et al., "AdaMuon: Adaptive Muon Optimizer" (arXiv:2507.11005, 2025).
    """
    kw = muon_arguments(learning_rate, beta=beta, eps=eps, **muon_kwargs)
    middle = (scale_by_element_second_moment(beta2, eps, rms, _dims(kw)),)
    pre = (_sign(),) if sign_momentum else ()
    return build_muon(kw, middle, scale=optax.identity(), pre=pre, name="adamuon")
