"""Second moments after the msign: NorMuon's one value per output neuron and AdaMuon's one per
entry, each normalizing the orthogonalized update."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from manifold_optax._matrix import matrix_view
from manifold_optax._placement import placed
from manifold_optax.transforms._leaves import excluded, leaf_specs, paths

__all__ = [
    "NeuronMomentState",
    "scale_by_neuron_second_moment",
    "ElementMomentState",
    "scale_by_element_second_moment",
]


def _per_matrix(updates, nu_tree, weight_dimension_numbers, fn):
    """``(updates, nu)`` with ``fn(O, V) → (O', V')`` applied to each matrix leaf's
    ``[batch, fan_in, fan_out]`` view ``O`` (float32) and the same view ``V`` of its stored
    moment; a leaf whose spec is ``None`` in a spec tree passes through with its moment."""
    specs = leaf_specs(weight_dimension_numbers, updates)
    leaves, treedef = jax.tree.flatten(updates)
    new_u, new_nu = [], []
    for x, nu, s, p in zip(leaves, jax.tree.leaves(nu_tree), specs, paths(updates), strict=True):
        if excluded(weight_dimension_numbers, s):
            new_u.append(x)
            new_nu.append(nu)
            continue
        o, inv = matrix_view(x, s, p)
        out, v = fn(o.astype(jnp.float32), matrix_view(nu, s, p)[0])
        new_u.append(inv(out).astype(x.dtype))
        new_nu.append(inv(v))
    return jax.tree.unflatten(treedef, new_u), jax.tree.unflatten(treedef, new_nu)


def _fro(x):
    return jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True))


class NeuronMomentState(NamedTuple):
    """The state of :func:`scale_by_neuron_second_moment`: per parameter, the second moment of
    each output neuron, stored in the parameter's shape (equal along each neuron's fan-in), so
    that the state is shaped and placed like the parameters."""

    nu: Any


def scale_by_neuron_second_moment(
    beta2: float = 0.95, eps: float = 1e-8, weight_dimension_numbers=None
) -> optax.GradientTransformation:
    r"""NorMuon's neuron-wise normalization of an orthogonalized update ``O``.

    .. math::

       v ← β_2 v + (1 − β_2)\,\operatorname{mean}_{i}(O_{ij}^2),\qquad
       O' = \frac{O}{\sqrt{v} + ε},\qquad O ← \frac{‖O‖_F}{‖O'‖_F}\,O'

    with one ``v_j`` per output neuron (column ``j`` of the ``[batch, fan_in, fan_out]`` view,
    the mean over its rows), no bias correction, and the Frobenius norm of each matrix kept.
    Goes right after :func:`~manifold_optax.orthogonalize`.

    Args:
      beta2: decay rate of the second moment.
      eps: added to ``√v``.
      weight_dimension_numbers: the matrix each leaf is (as in
        :func:`~manifold_optax.orthogonalize`); a leaf whose spec is ``None`` passes through.

    Returns:
      An ``optax.GradientTransformation`` with a :class:`NeuronMomentState`.

    Example:
      >>> import jax.numpy as jnp, manifold_optax as mo
      >>> tx = mo.scale_by_neuron_second_moment()
      >>> u, _ = tx.update({"w": jnp.eye(2)}, tx.init({"w": jnp.eye(2)}))
      >>> bool(jnp.allclose(u["w"], jnp.eye(2)))  # equal neurons: the norm is kept
      True

    References:
      Li et al., "NorMuon: Making Muon more efficient and scalable" (arXiv:2510.05491, 2025).
    """

    def init_fn(params):
        return NeuronMomentState(
            jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        )

    def update_fn(updates, state, params=None):
        del params

        def fn(o, nu):
            v = beta2 * nu[:, :1, :] + (1 - beta2) * jnp.mean(o * o, axis=-2, keepdims=True)
            scaled = o / (jnp.sqrt(v) + eps)
            f_new = _fro(scaled)
            scaled = scaled * (_fro(o) / jnp.where(f_new > 0, f_new, 1.0))
            return scaled, jnp.broadcast_to(v, o.shape)

        updates, nu = _per_matrix(updates, state.nu, weight_dimension_numbers, fn)
        return updates, NeuronMomentState(nu)

    return placed(optax.GradientTransformationExtraArgs(init_fn, update_fn))


class ElementMomentState(NamedTuple):
    """The state of :func:`scale_by_element_second_moment`: the step count and, per
    parameter, the elementwise second moment of the orthogonalized update (the parameter's
    shape, float32)."""

    count: chex.Array
    nu: Any


def scale_by_element_second_moment(
    beta2: float = 0.999, eps: float = 1e-8, rms: float = 0.2, weight_dimension_numbers=None
) -> optax.GradientTransformation:
    r"""AdaMuon's elementwise normalization of an orthogonalized update ``O``, then Adam's RMS.

    .. math::

       v ← β_2 v + (1 − β_2)\,O ⊙ O,\qquad \hat v = \frac{v}{1 − β_2^t},\qquad
       O' = \frac{O}{\sqrt{\hat v} + ε},\qquad
       u = ρ\sqrt{mn}\,\frac{O'}{‖O'‖_F}

    for each ``m × n`` matrix of the leaf's view (``ρ = 0.2``: the update has AdamW's RMS, so
    AdamW learning rates carry over). Goes right after :func:`~manifold_optax.orthogonalize`
    and replaces :func:`~manifold_optax.scale_by_shape`.

    Args:
      beta2: decay rate of the second moment.
      eps: added to ``√v̂``.
      rms: ``ρ``, the RMS of the returned update.
      weight_dimension_numbers: the matrix each leaf is (as in
        :func:`~manifold_optax.orthogonalize`); a leaf whose spec is ``None`` passes through.

    Returns:
      An ``optax.GradientTransformation`` with an :class:`ElementMomentState`.

    Example:
      >>> import jax.numpy as jnp, manifold_optax as mo
      >>> tx = mo.scale_by_element_second_moment()
      >>> u, _ = tx.update({"w": jnp.eye(4)}, tx.init({"w": jnp.eye(4)}))
      >>> round(float(jnp.sqrt(jnp.mean(u["w"] ** 2))), 4)  # the RMS is ρ
      0.2

    References:
      Si et al., "AdaMuon: Adaptive Muon Optimizer" (arXiv:2507.11005, 2025).
    """

    def init_fn(params):
        nu = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        return ElementMomentState(jnp.zeros([], jnp.int32), nu)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)

        def fn(o, nu):
            v = beta2 * nu + (1 - beta2) * o * o
            scaled = o / (jnp.sqrt(v / (1 - beta2 ** count.astype(jnp.float32))) + eps)
            f = _fro(scaled)
            m, n = o.shape[-2:]
            return scaled * (rms * (m * n) ** 0.5 / jnp.where(f > 0, f, 1.0)), v

        updates, nu = _per_matrix(updates, state.nu, weight_dimension_numbers, fn)
        return updates, ElementMomentState(count, nu)

    return placed(optax.GradientTransformationExtraArgs(init_fn, update_fn))
