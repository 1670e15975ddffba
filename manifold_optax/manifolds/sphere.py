"""The sphere ``‖W‖_F = r`` (per matrix; vectors allowed: Su's hypersphere)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from manifold_optax.manifolds._ops import fro, inverse_gradient_scale, sums, working
from manifold_optax.manifolds.base import Manifold

__all__ = ["Sphere"]


@dataclasses.dataclass(frozen=True)
class Sphere(Manifold):
    """``‖W‖_F = r`` per matrix (``docs/math.md``, Sphere).

    .. math::

       C_W(Φ) = ⟨Θ, Φ⟩,\\quad C_W^*(λ) = λΘ,\\quad Θ = W/‖W‖_F,\\quad R(V) = r·V/‖V‖_F.

    The multiplier is one scalar per matrix; the exact solver finds it by a scalar root.
    A shape-aware radius keeps entries O(1/√fan_in): ``Sphere(radius=√fan_out)`` makes the RMS
    entry ``1/√fan_in`` (see :func:`~manifold_optax.by_shape`). 0-D/1-D leaves are ``(1, d)``
    rows.

    Attributes:
      radius: ``r > 0``.

    Example:
      >>> import jax.numpy as jnp, manifold_optax as mo
      >>> W = mo.Sphere(2.0).retract(jnp.ones((3, 4)))
      >>> round(float(jnp.linalg.norm(W)), 5)
      2.0

    References:
      Su Jianlin, "Steepest descent on manifolds", part 1 (kexue.fm, 2025).
    """

    radius: float = 1.0
    vector_ok = True
    runs_sharded = True

    def theta(self, W, aux=None):
        W = working(W)
        n = fro(W)
        return W / jnp.where(n > 0, n, 1.0)[..., None, None]

    def online_retracted_step(self, G, W, Y, aux, lr, eta, msign_fn, power_iters: int):
        """``(R(W − η·Φ), Y − η₂·⟨Θ, Φ⟩, aux, None)`` with ``Φ = msign(Ĝ + Y·Θ)`` (a zero
        ``G`` steps nowhere and keeps ``Y``): the generic fused step with the fewest passes
        over the matrices. ``Θ`` and ``V = W − ηΦ`` are never formed: ``⟨Θ, Φ⟩ = ⟨W, Φ⟩/‖W‖``
        and ``‖V‖² = ‖W‖² − 2η⟨W, Φ⟩ + η²‖Φ‖²`` come from reductions (``‖V‖ ≈ ‖W‖``, so the
        sum loses nothing to cancellation), and ``r·(W − ηΦ)/‖V‖`` is one elementwise pass.
        ``W``, ``G``: ``[*b, rows, cols]`` float32; ``Y``: ``[*b]``."""
        ax = (-2, -1)
        gg, ww = sums(G * G, W * W, axis=ax)
        zero, inv_scale = inverse_gradient_scale(G, gg)
        nw = jnp.sqrt(ww)
        inv_nw = jnp.where(nw > 0, 1.0 / jnp.where(nw > 0, nw, 1.0), 1.0)
        Phi = msign_fn(G * inv_scale[..., None, None] + (Y * inv_nw)[..., None, None] * W)
        lr = jnp.where(zero, 0.0, lr)  # a zero gradient: Φ = 0, without a pass over Φ
        wp, pp = sums(W * Phi, Phi * Phi, axis=ax)
        Y = jnp.where(zero, Y, Y - eta * wp * inv_nw)
        vv = ww - 2.0 * lr * wp + lr * lr * pp
        k = self.radius / jnp.sqrt(jnp.where(vv > 0, vv, 1.0))
        return k[..., None, None] * (W - lr[..., None, None] * Phi), Y, aux, None

    def retract(self, W, aux=None):
        W32 = working(W)
        Wm = W32 if W32.ndim >= 2 else W32.reshape(1, -1)
        n = fro(Wm)
        out = self.radius * Wm / jnp.where(n > 0, n, 1.0)[..., None, None]
        return out.reshape(jnp.shape(W)).astype(jnp.result_type(W))

    def distance(self, W):
        W32 = working(W)
        Wm = W32 if W32.ndim >= 2 else W32.reshape(1, -1)
        return jnp.max(jnp.abs(fro(Wm) - self.radius)) / self.radius
