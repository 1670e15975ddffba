"""The spectral sphere ``‖W‖₂ = r``, with a warm top singular subspace as its state."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp

from manifold_optax._platform import on_cpu
from manifold_optax.linalg import per_matrix, singular_values, top_singular_subspace
from manifold_optax.linalg.warm_block import other_side, short_side_gram
from manifold_optax.manifolds._ops import HIGHEST, cross, inverse_gradient_scale, working
from manifold_optax.manifolds.base import BlockPlan, Manifold

__all__ = ["SpectralSphere", "SpectralAux"]


class SpectralAux(NamedTuple):
    """The spectral sphere's auxiliary state, per matrix: the warm block and, once refreshed,
    the top singular triple of the matrix it was refreshed at.

    The fields are in alphabetical order, the order a mapping of them has: ``nnx.Optimizer``
    hands a tuple nested in a parameter-shaped state back as an ``nnx.State``, whose leaves
    then come in the same order and whose attributes read the same.

    Attributes:
      sigma: ``[*b]`` the top singular value (a lower bound: a Rayleigh quotient).
      u: ``[*b, rows]`` the top left singular vector.
      v: ``[*b, min(rows, cols), p]`` the block (short side), or ``None`` before a cold start.
      vec: ``[*b, cols]`` the top right singular vector.
    """

    sigma: Any = None
    u: Any = None
    v: Any = None
    vec: Any = None


@dataclasses.dataclass(frozen=True)
class SpectralSphere(Manifold):
    """``‖W‖₂ = r`` per matrix (``docs/math.md``, Spectral sphere).

    .. math::

       C_W(Φ) = ⟨Θ, Φ⟩,\\quad C_W^*(λ) = λΘ,\\quad Θ = u_1v_1^⊤,\\quad R(V) = r·V/‖V‖_2,

    with ``(u₁, v₁)`` the top singular pair of ``W`` (``Θ`` needs a simple top singular
    value). The retraction is a rescaling, not the nearest point. ``‖V‖₂`` and the pair come
    from a ``block``-vector subspace warm-started from the state and refined by a Chebyshev
    filter (:func:`~manifold_optax.linalg.top_singular_subspace`): training drives many
    singular values up to ``r``, and a block resolves that cluster where a single power
    vector lags by its width. The estimate is a Rayleigh quotient (a lower bound), so
    ``σ_max ≥ r`` after a step; ``benchmarks/spectral_accuracy.py`` measures how close. On
    accelerators the fused online step refines the blocks of all layers whose short sides
    agree as one batch (:meth:`online_retracted_step`).

    Attributes:
      radius: ``r > 0``.
      block: vectors in the warm block (at most the short side).
      exact_norm: read ``‖V‖₂`` from the top eigenvalue of the short-side Gram instead (exact,
        an ``m×m`` eigensolve per step).
      chebyshev: refine the warm block with the Chebyshev filter (else plain power steps).

    Example:
      >>> import jax.numpy as jnp, manifold_optax as mo
      >>> W = mo.SpectralSphere(2.0).project(jnp.eye(3))
      >>> float(jnp.linalg.norm(W, 2))
      2.0

    References:
      Su Jianlin, "Steepest descent on manifolds", part 2 (kexue.fm, 2025); Zhou & Saad,
      "Block Krylov–Schur method with Chebyshev filtering" (2007).
    """

    radius: float = 1.0
    block: int = 32
    exact_norm: bool = False
    chebyshev: bool = True

    def init_aux(self, W):
        return SpectralAux(v=None)  # update_aux cold-starts the block

    def update_aux(self, W, aux, iters):
        """Warm-started subspace iteration from ``aux.v`` (a deterministic cold start of at
        least 30 iterations without one, or when its shape does not fit ``W``). The result
        carries the top singular triple of ``W``."""
        V0 = aux.v
        if V0 is None or V0.shape[-2] != min(W.shape[-2:]):
            V0 = None
        sigma, u, v, V = top_singular_subspace(W, V0, iters, self.block, chebyshev=self.chebyshev)
        return SpectralAux(v=V, sigma=sigma, u=u, vec=v)

    def _pair(self, W, aux):
        if aux.sigma is None:
            aux = self.update_aux(W, aux, 0)
        return aux.sigma, aux.u, aux.vec

    def theta(self, W, aux=None):
        """``Θ = u₁v₁ᵀ`` from ``aux``'s top pair when it carries one, else from a
        Rayleigh–Ritz step on ``aux``'s block (a cold start without ``aux``)."""
        W = working(W)
        if aux is None:
            aux = self.update_aux(W, self.init_aux(W), 40)
        u, v = self._top_vectors(W, aux)
        return u[..., :, None] * v[..., None, :]

    def _top_vectors(self, W, aux):
        if aux.u is not None and aux.vec is not None:
            return aux.u, aux.vec
        return self._pair(W, aux)[1:]

    def online_dual_step(self, G, W, Y, aux: SpectralAux, eta, msign_fn):
        """One online dual step with the rank-one ``Θ = uvᵀ`` never formed:
        ``(Φ, Y − η₂·uᵀΦv, zero)`` with ``Φ = msign(Ĝ + Y·uvᵀ)`` (``Ĝ = G/RMS-σ(G)``, ``(u, v)``
        the top pair from ``aux``). The rank-one term is part of the msign input's
        elementwise expression and ``⟨Θ, Φ⟩ = uᵀΦv`` is a matrix–vector product. ``zero``
        marks a zero ``G`` (its multiplier is kept; its ``Φ`` is the caller's to discard)."""
        u, v = self._top_vectors(W, aux)
        zero, inv_scale = inverse_gradient_scale(G)
        theta = u[..., :, None] * v[..., None, :]
        Phi = msign_fn(G * inv_scale[..., None, None] + Y[..., None, None] * theta)
        if on_cpu():
            c = jnp.einsum("...i,...ij,...j->...", u, Phi, v, precision=HIGHEST)
        else:  # one reduction where the products are two kernels
            c = jnp.sum(Phi * theta, axis=(-2, -1))
        return Phi, jnp.where(zero, Y, Y - eta * c), zero

    def online_direction(self, G, W, Y, aux, eta, msign_fn, power_iters: int):
        aux = self.update_aux(W, aux, power_iters)
        phi, y, zero = self.online_dual_step(G, W, Y, aux, eta, msign_fn)
        return jnp.where(zero[..., None, None], 0.0, phi), y, aux

    def online_retracted_step(self, G, W, Y, aux, lr, eta, msign_fn, power_iters: int):
        """The fused step without a block iteration of its own: ``Θ`` comes from ``aux``'s
        top pair, which the previous retraction computed for ``V``, exactly the top pair of
        the rescaled ``W``; the retraction's block iteration on the new ``V`` refreshes it.
        A zero gradient is folded into ``η`` (no pass over ``Φ``)."""
        Phi, Y, zero = self.online_dual_step(G, W, Y, aux, eta, msign_fn)
        lr = jnp.where(zero, 0.0, lr)
        V = W - lr[..., None, None] * Phi
        if self._defers(V, aux, power_iters):
            V = working(V)
            return V, Y, aux, BlockPlan(short_side_gram(V), aux.v)
        X, aux, plan = self.begin_retraction(V, aux, power_iters)
        return X, Y, aux, plan

    def begin_retraction(self, V, aux, power_iters: int):
        """``r·V/σ̂`` with ``σ̂`` from the block iteration warm-started at ``aux``."""
        aux = self.update_aux(V, aux, power_iters)
        return self.retract(V, aux), aux, None

    def _defers(self, V, aux, power_iters: int) -> bool:
        """Whether the fused online step defers its retraction: on accelerators
        (``mo.lowering_for``), for a warm float32 step with the Chebyshev filter, it returns
        ``V`` and a :class:`~manifold_optax.manifolds.BlockPlan` (the short-side Gram of
        ``V``); the transformation refines every deferred leaf's block as one batch per Gram
        shape, then calls :meth:`finish_block_retraction`. The iterative solvers' steps and
        ``mo.retract`` refine per group of same-shape matrices (:meth:`begin_retraction`)."""
        return not (
            on_cpu()
            or self.exact_norm
            or not self.chebyshev
            or power_iters < 1
            or aux.v is None
            or aux.v.shape[-2] != min(V.shape[-2:])
            or working(V).dtype != jnp.float32
        )

    def finish_block_retraction(self, V, lam, z, Q):
        """``(r·V/√λ, aux)`` from the refined top eigenpair ``(λ, z)`` of ``V``'s short-side
        Gram (``z`` on the short side) and the next warm block ``Q``."""
        other = other_side(V, z, lam)
        u, vec = (z, other) if V.shape[-2] <= V.shape[-1] else (other, z)
        aux = SpectralAux(v=Q, sigma=jnp.sqrt(lam), u=u, vec=vec)
        return self.retract(V, aux), aux

    def norm2(self, W, aux=None):
        """``‖W‖₂``: exact (the top eigenvalue of the short-side Gram) with ``exact_norm``,
        without ``aux`` or for float64 ``W`` (a float64 run is a reference run); else the warm
        block's estimate."""
        W32 = working(W)
        if self.exact_norm or aux is None or W32.dtype == jnp.float64:
            A = cross(W32, W32)
            return jnp.sqrt(jnp.maximum(per_matrix(jnp.linalg.eigvalsh, A)[..., -1], 0.0))
        return self._pair(W32, aux)[0]

    def retract(self, W, aux=None):
        W32 = working(W)
        s = self.norm2(W32, aux)
        out = self.radius * W32 / jnp.where(s > 0, s, 1.0)[..., None, None]
        return out.astype(jnp.result_type(W))

    def project(self, W):
        """``r·W/σ_max(W)`` with ``σ_max`` from an SVD."""
        W32 = working(W)
        s = singular_values(W32)[..., 0]
        return self.radius * W32 / jnp.where(s > 0, s, 1.0)[..., None, None]

    def distance(self, W):
        s = singular_values(working(W))[..., 0]
        return jnp.max(jnp.abs(s - self.radius)) / self.radius
