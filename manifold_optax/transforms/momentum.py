"""Momentum: the exponential moving average that ``muon`` and ``manifold_muon`` apply before
the nonlinear map."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from manifold_optax._placement import placed

__all__ = ["MomentumState", "momentum"]


class MomentumState(NamedTuple):
    """The state of :func:`momentum`: the step count ``t`` (an int32 scalar, the bias
    correction's exponent) and the first moment ``m``, a tree like the parameters (in
    ``mu_dtype`` when given, else each parameter's dtype)."""

    count: chex.Array
    mu: Any


def momentum(
    beta: float = 0.95,
    *,
    nesterov: bool = True,
    bias_correction: bool = True,
    mu_dtype=None,
) -> optax.GradientTransformation:
    r"""Exponential-moving-average momentum, the one used by ``muon`` and ``manifold_muon``.

    ``m_t = β·m_{t−1} + (1−β)·g_t``. Output, with ``bias_correction`` (``c_t = 1 − β^t``):
    Nesterov ``β·m_t/c_{t+1} + (1−β)·g_t/c_t`` (exactly optax.contrib.muon's form), or
    ``m_t/c_t``; without it, ``β·m_t + (1−β)·g_t`` or ``m_t``. Momentum comes *before* the
    nonlinear map (msign), as Kovalev's trust-region analysis requires (``docs/math.md``, Trust region with
    momentum).

    Args:
      beta: decay rate.
      nesterov: use the Nesterov look-ahead.
      bias_correction: divide by ``1 − β^t`` (optax's convention).
      mu_dtype: dtype to store the moment in (e.g. ``jnp.bfloat16``); computed in float32.

    Returns:
      An ``optax.GradientTransformation`` with a :class:`MomentumState`.

    Example:
      >>> import jax.numpy as jnp, manifold_optax as mo
      >>> tx = mo.momentum(0.9, nesterov=False)
      >>> u, s = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
      >>> [round(x, 5) for x in u.tolist()]  # m₁/(1 − β) = g: the zero start is undone
      [1.0, 1.0]
    """
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def init_fn(params):
        return MomentumState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        )

    def update_fn(updates, state, params=None):
        del params
        # In the wider of the moment's and the gradient's dtypes; the moment keeps its own
        # (float32 moments of bfloat16 gradients stay float32).
        wide = lambda m, g: jnp.promote_types(m.dtype, g.dtype)
        mu = jax.tree.map(
            lambda m, g: beta * m.astype(wide(m, g)) + (1 - beta) * g.astype(wide(m, g)),
            state.mu,
            updates,
        )
        count = optax.safe_increment(state.count)
        if bias_correction:
            c_now = 1 - beta ** count.astype(jnp.float32)
            c_next = 1 - beta ** (count.astype(jnp.float32) + 1)
        else:
            c_now = c_next = jnp.ones([], jnp.float32)
        if nesterov:
            out = jax.tree.map(
                lambda m, g: (
                    beta * (m / c_next.astype(m.dtype))
                    + (1 - beta) * (g.astype(m.dtype) / c_now.astype(m.dtype))
                ).astype(g.dtype),
                mu,
                updates,
            )
        else:
            out = jax.tree.map(
                lambda m, g: (m / c_now.astype(m.dtype)).astype(g.dtype), mu, updates
            )
        mu = jax.tree.map(
            lambda m, old: m.astype(mu_dtype if mu_dtype is not None else old.dtype), mu, state.mu
        )
        return out, MomentumState(count=count, mu=mu)

    return placed(optax.GradientTransformationExtraArgs(init_fn, update_fn))
