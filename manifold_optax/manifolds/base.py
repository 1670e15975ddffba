"""The manifold template: a constraint, its adjoint, a multiplier and a retraction.

At a point ``W`` the steepest unit step under the spectral norm that stays tangent solves

.. math::

   \\max_Φ \\operatorname{tr}(G^⊤Φ) \\quad\\text{s.t.}\\quad ‖Φ‖_2 ≤ 1,\\; C_W(Φ) = 0.

Lagrangian duality gives ``Φ = msign(G + C_W*(Y))`` with ``Y`` minimizing the convex dual
``‖G + C_W*(Y)‖_*``, whose gradient is the constraint residual ``C_W(Φ)`` (``docs/math.md``,
The dual problem). A manifold is therefore described by its constraint ``C_W``, the adjoint
``C_W*`` (``⟨Y, C_W(Φ)⟩ = ⟨C_W*(Y), Φ⟩``), the multiplier's shape and a retraction; the
solvers (:mod:`~manifold_optax.manifolds.solvers`) differ only in how they find ``Y``.

:class:`Manifold` also holds every hook the transformations call (the online dual step, the
fused step with its retraction, a deferred retraction, the warm auxiliary state, the
projection of fresh parameters), each with a generic default, so that a new manifold is one
file that subclasses it and the transformations never ask which manifold they hold.

Manifolds are frozen dataclasses: hashable static configuration, leaves of a spec tree,
never traced. Arrays are ``[*batch, rows, cols]``; 0-D/1-D leaves are valid only where
:attr:`Manifold.vector_ok` (read as a ``(1, d)`` row).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from manifold_optax.linalg import msign, msign_svd
from manifold_optax.manifolds import certified, solvers
from manifold_optax.manifolds._ops import (
    HIGHEST,
    fro,
    inner,
    inverse_gradient_scale,
    merge_batch,
)

__all__ = ["Manifold", "SolverConfig", "Solution", "PolishPlan", "SOLVERS", "is_manifold"]

SOLVERS = ("exact", "fixed_point", "dual_ascent", "online")


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Options of the multiplier solvers.

    Attributes:
      ns_steps: Newton–Schulz steps of every msign inside a solver (10 Polar Express steps
        reach float32 accuracy on spectra spanning ``[1e-3, 1]·σ_max``).
      max_iters: iteration cap of the exact / fixed-point solvers.
      tol: residual (relative tangent violation) at which the fixed-point iterations stop.
      gap_tol: relative duality gap at which ``"exact"`` stops (at least ``256·ε`` of the
        working precision).
      smoothing_max_size: largest multiplier (entries per matrix) whose Newton steps on the
        smoothed dual form its dense Hessian; larger ones run :func:`~.newton_cg.newton_cg`.
      cg_iters: cap of the conjugate-gradient products per matrix-free Newton step.
      inner_steps: dual-ascent steps per call (``"dual_ascent"``).
      dual_learning_rate: ``η₂`` of the dual step, in units of the normalized gradient
        (``None``: the manifold's :attr:`~Manifold.default_dual_learning_rate`).
      power_iters: degree of the warm-started block iteration that refreshes a manifold's
        auxiliary state per call (the spectral sphere's ``Θ``; a cold start runs 4×); the
        transformations' ``power_iters=None`` means this default.
    """

    ns_steps: int = 10
    max_iters: int = 200
    tol: float = 1e-6
    gap_tol: float = 1e-6
    smoothing_max_size: int = 64
    cg_iters: int = 40
    inner_steps: int = 20
    dual_learning_rate: float | None = None
    power_iters: int = 6


class Solution(NamedTuple):
    """What :meth:`Manifold.solve` returns."""

    direction: Any  # Φ, W's shape and dtype
    multiplier: Any  # Y, in units of the normalized gradient
    aux: Any  # the manifold's auxiliary state, refreshed at W
    info: Any  # a SolveInfo per matrix (converged, duality_gap, iterations)


class PolishPlan(NamedTuple):
    """A retraction deferred to one polish step for all deferred leaves of a step
    (:meth:`Manifold.begin_retraction`): ``X = V·p(A)·inv_c`` with a cheap or a standard
    polynomial ``p``, chosen once for all leaves; ``fallback`` marks where neither is
    certified."""

    A: Any  # [b, m, m] the normalized Gram of V
    inv_c: Any  # [b, 1, 1] its normalization
    cheap_ok: Any  # [b] bool: the cheap polynomial is accurate
    ok: Any  # [b] bool: the standard one is


class BlockPlan(NamedTuple):
    """A rescaling retraction deferred until the top singular pairs of every deferred leaf
    of a step have been refined together, one batch per short-side Gram shape
    (:meth:`Manifold.online_retracted_step`, :meth:`Manifold.finish_block_retraction`)."""

    S: Any  # [b, s, s] the short-side Gram of V
    block: Any  # [b, s, p] the warm block


def is_manifold(x) -> bool:
    """Whether ``x`` is a :class:`Manifold` (a leaf of a manifold spec)."""
    return isinstance(x, Manifold)


class Manifold:
    """The template. A subclass defines the geometry (``constraint``, ``adjoint``,
    ``multiplier_shape``, ``theta`` for a scalar multiplier, ``retract``, ``distance``) and
    overrides a hook only where it has a cheaper or exact form of the generic one.

    Attributes:
      vector_ok: 0-D/1-D leaves are allowed (as ``(1, d)`` rows).
      default_dual_learning_rate: ``η₂`` when none is given.
      project_dual_direction: the dual-ascent solvers return ``Φ`` projected onto the tangent
        space (Stiefel: a normal component would cost the polar retraction extra polish
        steps; the spheres keep it, their rescaling removes it and it acts as adaptive weight
        decay).
      runs_sharded: the online step and the retraction are elementwise apart from the msign
        and scalar reductions, so on sharded parameters they run where the parameter lives
        (only the msign's input is gathered).
    """

    vector_ok: bool = False
    default_dual_learning_rate: float = 0.5
    project_dual_direction: bool = False
    runs_sharded: bool = False

    # --- geometry -------------------------------------------------------------------------
    def theta(self, W, aux=None):
        """The unit normal ``Θ`` of a scalar-multiplier manifold (``None`` otherwise)."""
        raise NotImplementedError

    def constraint(self, W, Phi, theta=None):
        """``C_W(Φ)``; here ``⟨Θ, Φ⟩`` (scalar multiplier)."""
        if theta is None:
            theta = self.theta(W)
        return inner(theta, Phi)

    def adjoint(self, W, Y, theta=None):
        """``C_W*(Y)``; here ``Y·Θ`` (scalar multiplier)."""
        if theta is None:
            theta = self.theta(W)
        return Y[..., None, None] * theta

    def multiplier_shape(self, shape):
        """The multiplier's shape for a ``[*batch, rows, cols]`` parameter (``[*batch]``)."""
        return tuple(shape[:-2])

    def retract(self, W, aux=None):
        """A point of the manifold near ``W`` (``W``'s shape and dtype)."""
        raise NotImplementedError

    def distance(self, W):
        """Relative distance of ``W`` to the manifold (0 on it), the largest over the batch."""
        raise NotImplementedError

    def tangent_violation(self, W, Phi, aux=None):
        """``‖C_W(Φ)‖_F / ‖Φ‖_F`` per matrix (scale-free)."""
        theta = self.theta(W, aux)
        c = self.constraint(W, Phi, theta)
        c = jnp.abs(c) if c.ndim == Phi.ndim - 2 else fro(c)
        return c / jnp.maximum(fro(Phi), 1e-30)

    def project_tangent(self, W, Phi, aux=None):
        """Orthogonal projection of ``Φ`` onto the tangent space at ``W``."""
        theta = self.theta(W, aux)
        return self.remove_normal(W, Phi, self.constraint(W, Phi, theta), theta)

    def remove_normal(self, W, Phi, c, theta=None):
        """The projection of ``Φ`` onto the tangent space given its residual ``c = C_W(Φ)``:
        ``Φ − C_W*((C_W C_W*)⁻¹c)``; here ``Φ − c·Θ/‖Θ‖²``."""
        t2 = inner(theta, theta)
        return Phi - (c / jnp.maximum(t2, 1e-30))[..., None, None] * theta

    def check_leaf(self, x, path: str) -> None:
        """ValueError naming ``path`` if this manifold cannot hold a leaf like ``x``."""
        if jnp.ndim(x) < 2 and not self.vector_ok:
            raise ValueError(
                f"parameter {path!r} has shape {jnp.shape(x)}: {type(self).__name__} needs a "
                "matrix (at least 2 axes); use Sphere for vectors or assign None"
            )
        dt = jnp.result_type(x)
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(
                f"parameter {path!r} has dtype {dt}: manifolds need real floating parameters"
            )

    def check_point(self, W, path: str) -> None:
        """ValueError naming ``path`` if this manifold cannot project the concrete matrix
        ``W`` (e.g. an oblique manifold's zero column); called by ``project_params``."""

    # --- auxiliary state ------------------------------------------------------------------
    def init_aux(self, W):
        """The auxiliary state before any refinement (a pytree; ``None``: none needed)."""
        return None

    def update_aux(self, W, aux, iters: int):
        """The auxiliary state refreshed at ``W`` with ``iters`` warm iterations."""
        return aux

    def reads_multiplier(self, shape) -> bool:
        """Whether the online step reads the multiplier (square Stiefel's closed form does
        not: its multiplier is an output only)."""
        return True

    def project(self, W):
        """Fresh parameters put on the manifold (``project_params``)."""
        return self.retract(W)

    # --- the online step ------------------------------------------------------------------
    def dual_step_size(self, config: SolverConfig) -> float:
        """``η₂`` of the dual step: the configured one, else this manifold's default."""
        if config.dual_learning_rate is None:  # (may be an injected, traced value)
            return self.default_dual_learning_rate
        return config.dual_learning_rate

    def dual_step(self, Gn, W, Y, theta, eta, msign_fn):
        """One dual-ascent step on a normalized gradient ``Ĝ``: ``Φ = msign(Ĝ + C_W*(Y))``,
        ``Y ← Y − η₂·C_W(Φ)``; returns ``(Φ, Y)``, with ``Φ`` projected onto the tangent space
        (reusing ``C_W(Φ)``) when :attr:`project_dual_direction`. ``msign_fn`` is the msign to
        use (steps, coefficients, sharding constraints)."""
        Phi = msign_fn(Gn + self.adjoint(W, Y, theta))
        c = self.constraint(W, Phi, theta)
        if self.project_dual_direction:
            Phi = self.tangent_in_ball(W, Phi, c, theta)
        return Phi, Y - eta * c

    def tangent_in_ball(self, W, Phi, c, theta=None):
        """The tangent projection ``P = Φ − N`` of ``Φ`` (residual ``c``) divided by
        ``1 + ‖N‖_F``: ``‖P‖₂ ≤ ‖Φ‖₂ + ‖N‖₂``, so the result has
        ``‖·‖₂ ≤ (‖Φ‖₂ + ‖N‖_F)/(1 + ‖N‖_F) ≤ max(1, ‖Φ‖₂)`` — the projection never enlarges
        the msign's overshoot — and it is ``P`` itself once the multiplier has converged
        (``N → 0``)."""
        P = self.remove_normal(W, Phi, c, theta)
        return P / (1.0 + fro(Phi - P))[..., None, None]

    def online_direction(self, G, W, Y, aux, eta, msign_fn, power_iters: int):
        """The online solver's step: ``aux`` refreshed at ``W``, then :meth:`dual_step` on
        ``Ĝ = G/RMS-σ(G)``. A zero ``G`` has no steepest direction: ``Φ = 0`` and ``Y`` is
        kept. ``G``, ``W``: ``[*b, rows, cols]`` float32. Returns ``(Φ, Y, aux)``."""
        aux = self.update_aux(W, aux, power_iters)
        zero, inv_scale = inverse_gradient_scale(G)
        Gn = G * inv_scale[..., None, None]
        phi, y = self.dual_step(Gn, W, Y, self.theta(W, aux), eta, msign_fn)
        phi = jnp.where(zero[..., None, None], 0.0, phi)
        if Y is not None:  # (a closed form may take no multiplier in)
            y = jnp.where(zero.reshape(zero.shape + (1,) * (y.ndim - zero.ndim)), Y, y)
        return phi, y, aux

    def online_retracted_step(self, G, W, Y, aux, lr, eta, msign_fn, power_iters: int):
        """The fused step: :meth:`online_direction`, ``V = W − η·Φ``, then
        :meth:`begin_retraction`. Returns ``(X, Y, aux, plan)`` as that method does."""
        Phi, Y, aux = self.online_direction(G, W, Y, aux, eta, msign_fn, power_iters)
        X, aux, plan = self.begin_retraction(W - lr * Phi, aux, power_iters)
        return X, Y, aux, plan

    # --- the retraction in a training step ------------------------------------------------
    def begin_retraction(self, V, aux, power_iters: int):
        """``(X, aux, plan)``: the retracted point with ``plan = None``, or ``V`` itself and a
        :class:`PolishPlan` when the retraction is one polish step the transformation takes
        for all such leaves together (:meth:`polish_factor`, :meth:`apply_polish`,
        :meth:`fallback_retraction`). :meth:`online_retracted_step` may also return a
        :class:`BlockPlan`: a rescaling by a top singular value refined with every such
        leaf's (:meth:`finish_block_retraction`)."""
        return self.retract(V, aux), aux, None

    def finish_block_retraction(self, V, lam, z, Q):
        """``(X, aux)`` for a :class:`BlockPlan`: the retracted point and the refreshed
        auxiliary state from the refined top eigenpair ``(λ, z)`` of ``plan.S`` and the
        next warm block ``Q`` (:func:`~manifold_optax.linalg.warm_block.refine_warm_block`)."""
        raise NotImplementedError

    def polish_factor(self, plan: PolishPlan, cheap: bool):
        """The ``m×m`` factor ``p(A)·inv_c`` of a deferred polish step."""
        raise NotImplementedError

    def apply_polish(self, V, P):
        """``V·P``, the deferred polish step."""
        raise NotImplementedError

    def fallback_retraction(self, V):
        """The retraction where no single polish step is certified."""
        return self.retract(V)

    # --- solvers --------------------------------------------------------------------------
    def solver_msign(self, Z, config: SolverConfig):
        """The msign inside the solvers: ``config.ns_steps`` steps at HIGHEST precision, or
        the exact polar factor by SVD in float64 (Newton–Schulz polynomials are tuned to
        float32's accuracy)."""
        if Z.dtype == jnp.float64:
            return msign_svd(Z)
        return msign(Z, steps=config.ns_steps, precision=HIGHEST)

    def dual_preconditioner(self, W, theta, U, s, V, mu):
        """``M⁻¹ ≈ ∇²f_μ⁻¹`` on multipliers for the matrix-free Newton steps, given the thin
        SVD ``UΣVᵀ`` of ``Ĝ + C_W*(Y)`` (one matrix); here the identity."""
        return lambda R: R

    def initial_multiplier(self, Gn, W, aux):
        """The multiplier of the tangent projection of ``Ĝ`` (a warm start)."""
        theta = self.theta(W, aux)
        return -inner(theta, Gn) / jnp.maximum(inner(theta, theta), 1e-30)

    def solve_multiplier(self, Gn, W, Y, aux, solver: str, config: SolverConfig):
        """``(Φ, Y)`` on a normalized gradient: dual ascent for ``"online"`` /
        ``"dual_ascent"``, Su's fixed point (:func:`~.solvers.scalar_fixed_point`) for
        ``"fixed_point"``, else the scalar root of :func:`~.solvers.scalar_root`."""
        theta = self.theta(W, aux)
        if solver in ("dual_ascent", "online"):
            steps = 1 if solver == "online" else config.inner_steps
            return solvers.dual_ascent(self, Gn, W, Y, theta, steps, config)
        if solver == "fixed_point":
            return solvers.scalar_fixed_point(self, Gn, theta, config)
        return solvers.scalar_root(self, Gn, theta, config)

    def steepest_direction(self, G, W, solver: str = "exact", *, Y=None, aux=None, config=None):
        """``argmax tr(GᵀΦ)`` s.t. ``‖Φ‖₂ ≤ 1`` and ``C_W(Φ) = 0``, in ``W``'s dtype.

        ``Y`` (warm start) and ``aux`` are used by the iterative solvers; see :meth:`solve`.
        """
        return self.solve(G, W, solver, Y=Y, aux=aux, config=config).direction

    def solve(
        self, G, W, solver: str = "exact", *, Y=None, aux=None, config=None, certify: bool = True
    ):
        """The steepest tangent direction, its multiplier and a certificate.

        ``"exact"`` runs the manifold's fast solver (a fixed point, a scalar root), certifies
        it by the duality gap (``docs/math.md``, The certificate) and, where the gap exceeds
        ``config.gap_tol``, continues with Newton's method on the smoothed dual until it is
        within it (:func:`~manifold_optax.manifolds.certified.smoothed_newton` up to
        ``config.smoothing_max_size`` multiplier entries, else matrix-free Newton–CG).
        ``"fixed_point"`` stops at its residual; ``"dual_ascent"`` and ``"online"`` take
        their fixed number of dual steps.

        Args:
          G: the gradient, ``W``'s shape.
          W: a point of the manifold, ``[*batch, rows, cols]`` (or a vector where allowed).
          solver: ``"exact"``, ``"fixed_point"``, ``"dual_ascent"`` or ``"online"``.
          Y: warm-start multiplier (in units of the normalized gradient), else the
            projection's.
          aux: warm auxiliary state (:meth:`update_aux`), else a cold start.
          config: :class:`SolverConfig`.
          certify: compute the duality gap (``"exact"`` always does); without it the
            ``info`` gap is NaN.

        Returns:
          A :class:`Solution` ``(direction, multiplier, aux, info)``: ``Φ`` in ``W``'s dtype
          (``Φ = 0`` for ``G = 0``; ``"exact"`` and ``"fixed_point"`` return it feasible:
          tangent, ``‖Φ‖₂ ≤ 1``), the multiplier, the refreshed auxiliary state and a
          :class:`~manifold_optax.manifolds.certified.SolveInfo` per matrix. Computed in
          float32, or float64 for float64 ``W``.
        """
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; accepted: {SOLVERS}")
        config = config or SolverConfig()
        W, G, out_dtype, unflat = self._as_matrices(W, G)
        if aux is None:
            aux = self.update_aux(W, self.init_aux(W), 4 * config.power_iters)
        else:
            aux = self.update_aux(W, aux, config.power_iters)
        # Normalize G: the dual step is not scale invariant; Y lives in these units.
        scale = fro(G) / math.sqrt(min(G.shape[-2:]))
        scale = jnp.where(scale > 0, scale, 1.0)
        Gn = G / scale[..., None, None]
        Y = self.initial_multiplier(Gn, W, aux) if Y is None else jnp.asarray(Y, W.dtype)
        Phi, Y = self.solve_multiplier(Gn, W, Y, aux, solver, config)
        theta = self.theta(W, aux)
        if solver == "exact" or certify:
            Phi, Y, info = certified.certified_solve(self, Gn, W, Phi, Y, theta, solver, config)
        else:
            if solver == "fixed_point":
                flat = merge_batch(W, Phi, theta)
                Phi = jax.lax.map(lambda a: certified.feasible(self, *a), flat).reshape(Phi.shape)
            elif self.project_dual_direction:  # as the online transform
                Phi = self.tangent_in_ball(W, Phi, self.constraint(W, Phi, theta), theta)
            nan = jnp.full(W.shape[:-2], jnp.nan, W.dtype)
            info = certified.SolveInfo(nan == 0, nan, jnp.zeros(W.shape[:-2], jnp.int32))
        Phi = jnp.where((fro(G) > 0)[..., None, None], Phi, 0.0)
        return Solution(unflat(Phi.astype(out_dtype)), Y, aux, info)

    def _as_matrices(self, W, G):
        W, G = jnp.asarray(W), jnp.asarray(G)
        out_dtype, shape = W.dtype, W.shape
        if W.ndim < 2:
            W, G = W.reshape(1, -1), G.reshape(1, -1)
        unflat = (lambda x: x.reshape(shape)) if len(shape) < 2 else (lambda x: x)
        acc = jnp.float64 if out_dtype == jnp.float64 else jnp.float32
        return W.astype(acc), G.astype(acc), out_dtype, unflat
