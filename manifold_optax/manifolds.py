"""Matrix manifolds for manifold Muon: one template, several manifolds (MATH.md §3).

At a point ``W`` the steepest unit step under the spectral norm that stays tangent solves
``max tr(GᵀΦ)`` s.t. ``‖Φ‖₂ ≤ 1``, ``C_W(Φ) = 0``. Lagrangian duality gives
``Φ = msign(G + C_W*(Y))`` with ``Y`` minimizing the convex dual ``‖G + C_W*(Y)‖_*``, whose
gradient is the constraint residual ``C_W(Φ)``. A manifold is therefore described by its
constraint ``C_W``, the adjoint ``C_W*`` (``⟨Y, C_W(Φ)⟩ = ⟨C_W*(Y), Φ⟩``), a multiplier, and a
retraction; solvers differ only in how they find ``Y``:

* ``"exact"`` — spheres: safeguarded regula falsi (Illinois) on the nondecreasing scalar
  ``h(λ) = ⟨Θ, msign(G + λΘ)⟩``; Stiefel: Su's fixed point accelerated by Anderson mixing
  (converges at every aspect ratio);
* ``"fixed_point"`` — Stiefel: Su's Lyapunov fixed point (fast for tall, skinny matrices);
* ``"dual_ascent"`` — ``k`` steps ``Y ← Y − η₂·C_W(Φ)`` from a warm start, on a normalized G;
* ``"online"`` — one such step per training step, ``Y`` carried in the optimizer state.

Square Stiefel takes the closed form ``Φ = W·msign(skew(WᵀG))`` under every solver (computed
as ``msign(skew(GWᵀ))·W``, the same matrix for an orthogonal ``W``): it is exact and costs less
than one dual step.

Manifold objects are frozen dataclasses: hashable static configuration, leaves in any tree
prefix, never traced. Arrays are ``[*batch, n, m]``; 0-D/1-D leaves are only valid for
:class:`Sphere` (treated as a ``(1, d)`` matrix, Su's hypersphere).

References: Su Jianlin, "Steepest descent on manifolds" parts 1–5 (kexue.fm, 2025; seeds
000/001); Bernstein, "Modular Manifolds" (Thinking Machines, 2025).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from manifold_optax.linalg import (
    matmul_tn,
    msign,
    per_matrix,
    singular_values,
    top_singular_subspace,
)

__all__ = ["Manifold", "Sphere", "SpectralSphere", "Stiefel", "SolverConfig", "SOLVERS"]

HIGHEST = jax.lax.Precision.HIGHEST
SOLVERS = ("exact", "fixed_point", "dual_ascent", "online")


def _mm(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


def _t(x):
    return jnp.swapaxes(x, -1, -2)


def _sym(a):
    return 0.5 * (a + _t(a))


def _skew(a):
    return 0.5 * (a - _t(a))


def _inner(a, b):
    return jnp.sum(a * b, axis=(-2, -1))


def _fro(a):
    return jnp.sqrt(_inner(a, a))


# Stiefel's products on the matrix as stored: "wide" means rows ≤ cols (a square matrix takes
# the row form, in which no product contracts a leading axis; see Stiefel).
def _cross(A, B):
    """The short-side product of two same-shape matrices: ``ABᵀ`` (wide/square) or ``AᵀB``
    (tall); m×m. ``_cross(X, X)`` is the short-side Gram."""
    return _mm(A, _t(B)) if A.shape[-2] <= A.shape[-1] else matmul_tn(A, B, HIGHEST)


def _apply_sym(X, M):
    """``X·M`` in the tall view for a symmetric m×m ``M``: ``X·M`` (tall) or ``M·X``
    (wide/square, i.e. ``(XᵀM)ᵀ``)."""
    return _mm(M, X) if X.shape[-2] <= X.shape[-1] else _mm(X, M)


def _normalized_gram(X):
    """``(A, 1/c)``: the short-side Gram of ``X/c``, ``c²`` its mean eigenvalue (the scale is
    folded into the m×m polish factor, ``X·(p(A)/c)``, rather than applied to ``X``: a pass)."""
    m = min(X.shape[-2:])
    A = _cross(X, X)
    c2 = jnp.trace(A, axis1=-2, axis2=-1) / m
    c2 = jnp.where(c2 > 0, c2, 1.0)[..., None, None]
    return A / c2, jax.lax.rsqrt(c2)


def _quintic(A):
    """``p(A) = (15I − 10A + 3A²)/8``: one Newton–Schulz step toward ``A^{-1/2}``."""
    eye = jnp.eye(A.shape[-1], dtype=A.dtype)
    return 1.875 * eye - 1.25 * A + 0.375 * _mm(A, A)


def _cubic(A):
    """``p(A) = (3I − A)/2``: the cubic Newton–Schulz step toward ``A^{-1/2}`` (no product)."""
    eye = jnp.eye(A.shape[-1], dtype=A.dtype)
    return 1.5 * eye - 0.5 * A


#: Largest certified truncation, ``‖XᵀX − I‖₂``, for which one cubic polish step replaces the
#: quintic (saving its m×m×m product). It is the order of the rounding that a float32 polish
#: leaves anyway: measured in float64 on step_bench's tree after 30 steps at η = 0.02, the
#: retracted matrices sit 1.26e-6 (quintic) and 1.23e-6 (cubic) from orthonormal in spectral
#: norm, and 1.0e-6 / 1.1e-6 in their largest entry.
CUBIC_POLISH_TOLERANCE = 2e-6

#: ``‖A − I‖_F`` up to which one quintic polish step is float32-accurate (truncation
#: ``≤ 0.63e³ ≤ 7.9e-8``).
QUINTIC_POLISH_TOLERANCE = 5e-3


def _polish_certificates(A):
    """``(cubic_ok, quintic_ok)`` per matrix for a normalized Gram ``A`` (trace ``m``).

    With ``D = A − I`` and ``X = V·p(A)/c``, ``XᵀX − I = A·p(A)² − I`` exactly (``p(A)``
    commutes with ``A``): ``−¾D² + ¼D³`` for the cubic, ``⅝D³ + O(D⁴)`` for the quintic. Their
    spectral norms are bounded by ``¾e²(1 + e/3)`` and ``0.63e³`` (``e ≤ 5e-3``) for any upper
    bound ``e ≥ ‖D‖₂``; here ``e = min(‖D‖_F, max row sum of |D|)`` (Frobenius and Gershgorin;
    ``D`` is symmetric), elementwise work on the m×m Gram. ``cubic_ok``: the cubic's bound is
    within :data:`CUBIC_POLISH_TOLERANCE`; ``quintic_ok``: ``‖D‖_F ≤``
    :data:`QUINTIC_POLISH_TOLERANCE`."""
    fro = _fro_from_identity(A)
    e = jnp.minimum(fro, _row_sum_from_identity(A))
    cubic_ok = 0.75 * e * e * (1.0 + e / 3.0) <= CUBIC_POLISH_TOLERANCE
    return cubic_ok, fro <= QUINTIC_POLISH_TOLERANCE


def _inverse_gradient_scale(G):
    """``(zero, 1/s)`` per matrix, ``s = ‖G‖_F/√min(rows, cols)`` the RMS singular value that
    normalizes the dual step's gradient (``zero`` where ``G = 0``; then ``1/s`` is 1)."""
    gg = jnp.sum(G * G, axis=(-2, -1))
    zero = gg == 0
    return zero, jnp.where(zero, 1.0, jax.lax.rsqrt(gg / min(G.shape[-2:])))


def _fro_from_identity(A):
    """``‖A − I‖_F`` per matrix."""
    eye = jnp.eye(A.shape[-1], dtype=A.dtype)
    return jnp.sqrt(jnp.sum((A - eye) ** 2, axis=(-2, -1)))


def _row_sum_from_identity(A):
    """The largest row sum of ``|A − I|`` per matrix: a bound on ``‖A − I‖₂`` for symmetric
    ``A`` (Gershgorin)."""
    eye = jnp.eye(A.shape[-1], dtype=A.dtype)
    return jnp.max(jnp.sum(jnp.abs(A - eye), axis=-1), axis=-1)


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """Options of the multiplier solvers.

    Attributes:
      ns_steps: Newton–Schulz steps of every msign inside a solver (10 Polar Express steps is
        float32-accurate).
      max_iters: iteration cap of the exact / fixed-point solvers.
      tol: relative tangent violation at which exact solvers stop.
      inner_steps: dual-ascent steps per call (``"dual_ascent"``).
      dual_learning_rate: ``η₂`` of the dual step, in units of the normalized gradient
        (``None``: the manifold's ``default_dual_learning_rate``: 0.5 spheres, 0.1 Stiefel).
      cg_iters: conjugate-gradient iterations per Newton step (Stiefel ``"exact"``).
      power_iters: degree of the warm-started Chebyshev-filtered block iteration for the
        spectral sphere's ``Θ`` per call (the block tracks ``W`` across training steps; a
        cold start runs 30+).
    """

    ns_steps: int = 10
    max_iters: int = 200
    tol: float = 1e-6
    inner_steps: int = 20
    dual_learning_rate: float | None = None
    cg_iters: int = 30
    power_iters: int = 2


class Aux(NamedTuple):
    """Per-matrix auxiliary state of the spectral sphere: ``v`` the warm power block (the part
    kept across steps) and, once computed for the current matrix, its top singular triple."""

    v: Any
    sigma: Any = None
    u: Any = None
    vec: Any = None


class Manifold:
    """The template. Subclasses define the constraint, its adjoint, the multiplier and the
    retraction; :meth:`steepest_direction` is shared."""

    vector_ok: bool = False
    #: Dual step η₂ used when none is given (measured: fastest stable online convergence).
    default_dual_learning_rate: float = 0.5
    #: Whether the dual-ascent solvers return Φ projected onto the tangent space. Stiefel
    #: does: a normal component (the multiplier's residual) would cost the polar retraction
    #: extra polish steps. The spheres keep the raw direction: their rescaling retraction
    #: removes the radial part itself, which then acts as Su's adaptive weight decay.
    project_dual_direction: bool = False

    # --- geometry -------------------------------------------------------------------------
    def theta(self, W, aux: Aux | None = None):  # scalar-multiplier manifolds
        raise NotImplementedError

    def constraint(self, W, Phi, theta=None):
        """``C_W(Φ)``."""
        if theta is None:
            theta = self.theta(W)
        return _inner(theta, Phi)

    def adjoint(self, W, Y, theta=None):
        """``C_W*(Y)``."""
        if theta is None:
            theta = self.theta(W)
        return Y[..., None, None] * theta

    def multiplier_shape(self, shape):
        return tuple(shape[:-2])

    def init_aux(self, W) -> Aux:
        return Aux(v=None)

    def update_aux(self, W, aux: Aux, iters: int) -> Aux:
        return aux

    def retract(self, W, aux: Aux | None = None):
        raise NotImplementedError

    def distance(self, W):
        """Relative distance to the manifold (0 on it)."""
        raise NotImplementedError

    def tangent_violation(self, W, Phi, aux: Aux | None = None):
        """``‖C_W(Φ)‖_F / ‖Φ‖_F`` per matrix (scale-free)."""
        theta = self.theta(W, aux)
        c = self.constraint(W, Phi, theta)
        c = jnp.abs(c) if c.ndim == Phi.ndim - 2 else _fro(c)
        return c / jnp.maximum(_fro(Phi), 1e-30)

    def project_tangent(self, W, Phi, aux: Aux | None = None):
        """Orthogonal projection of Φ onto the tangent space at W."""
        theta = self.theta(W, aux)
        return self.remove_normal(W, Phi, self.constraint(W, Phi, theta), theta)

    def remove_normal(self, W, Phi, c, theta=None):
        """The projection of Φ onto the tangent space given its residual ``c = C_W(Φ)``:
        ``Φ − C_W*((C_W C_W*)⁻¹c)``; here ``Φ − c·Θ/‖Θ‖²``."""
        t2 = _inner(theta, theta)
        return Phi - (c / jnp.maximum(t2, 1e-30))[..., None, None] * theta

    # --- solvers --------------------------------------------------------------------------
    def dual_step_size(self, config: SolverConfig) -> float:
        """η₂ of the dual step: the configured one, else this manifold's default."""
        return config.dual_learning_rate or self.default_dual_learning_rate

    def dual_step(self, Gn, W, Y, theta, eta, msign_fn):
        """One dual-ascent step on a normalized gradient ``Ĝ``: ``Φ = msign(Ĝ + C_W*(Y))``,
        ``Y ← Y − η₂·C_W(Φ)``; returns ``(Φ, Y)``, with ``Φ`` projected onto the tangent space
        (reusing ``C_W(Φ)``) when :attr:`project_dual_direction`. ``msign_fn`` is the msign to
        use (steps, coefficients, sharding constraints)."""
        Phi = msign_fn(Gn + self.adjoint(W, Y, theta))
        c = self.constraint(W, Phi, theta)
        if self.project_dual_direction:
            Phi = self.remove_normal(W, Phi, c, theta)
        return Phi, Y - eta * c

    def steepest_direction(self, G, W, solver: str = "exact", *, Y=None, aux=None, config=None):
        """``argmax tr(GᵀΦ)`` s.t. ``‖Φ‖₂ ≤ 1`` and ``C_W(Φ) = 0`` (``Φ`` in ``W``'s dtype).

        ``Y`` (warm start) and ``aux`` are used by the iterative solvers; see
        :meth:`solve` for the multiplier too.
        """
        Phi, _, _ = self.solve(G, W, solver, Y=Y, aux=aux, config=config)
        return Phi

    def solve(self, G, W, solver: str = "exact", *, Y=None, aux=None, config=None):
        """Return ``(Φ, Y, aux)``: the direction, the multiplier (in units of the normalized G)
        and the updated auxiliary state."""
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; accepted: {SOLVERS}")
        config = config or SolverConfig()
        W, G, out_dtype, unflat = self._as_matrices(W, G)
        if aux is None:
            aux = self.update_aux(W, self.init_aux(W), 4 * config.power_iters)
        else:
            aux = self.update_aux(W, aux, config.power_iters)
        # Normalize G: the dual step is not scale invariant; Y lives in these units.
        scale = _fro(G) / math.sqrt(min(G.shape[-2:]))
        scale = jnp.where(scale > 0, scale, 1.0)
        Gn = G / scale[..., None, None]
        if Y is None:
            Y = self.initial_multiplier(Gn, W, aux)
        else:
            Y = jnp.asarray(Y, W.dtype)
        Phi, Y = self._solve(Gn, W, Y, aux, solver, config)
        if solver in ("exact", "fixed_point"):
            # Final feasibility polish: remove the float32 floor of the iteration's residual by
            # projecting onto the tangent space and rescaling to ‖Φ‖₂ ≤ 1 (moves Φ by
            # O(residual); the duality gap certifies the result).
            Phi = self.project_tangent(W, Phi, aux)
            s1 = singular_values(Phi)[..., 0]
            Phi = Phi / jnp.maximum(s1, 1.0)[..., None, None]
        elif self.project_dual_direction:
            Phi = self.project_tangent(W, Phi, aux)  # as the online transform
        # A zero gradient has no steepest direction: return Φ = 0 (never an arbitrary frame).
        Phi = jnp.where((_fro(G) > 0)[..., None, None], Phi, 0.0)
        return unflat(Phi.astype(out_dtype)), Y, aux

    def _as_matrices(self, W, G):
        W = jnp.asarray(W)
        out_dtype = W.dtype
        if W.ndim < 2:
            shape = W.shape
            W, G = W.reshape(1, -1), jnp.asarray(G).reshape(1, -1)
            unflat = lambda x: x.reshape(shape)
        else:
            unflat = lambda x: x
        acc = jnp.float64 if out_dtype == jnp.float64 else jnp.float32
        return W.astype(acc), jnp.asarray(G).astype(acc), out_dtype, unflat

    def initial_multiplier(self, Gn, W, aux):
        theta = self.theta(W, aux)
        return -_inner(theta, Gn) / jnp.maximum(_inner(theta, theta), 1e-30)

    def _msign(self, Z, config):
        return msign(Z, steps=config.ns_steps, precision=HIGHEST)

    def _solve(self, Gn, W, Y, aux, solver, config):
        theta = self.theta(W, aux)
        if solver in ("dual_ascent", "online"):
            steps = 1 if solver == "online" else config.inner_steps
            return self._dual_ascent(Gn, W, Y, theta, steps, config)
        return self._scalar_exact(Gn, theta, config)

    def _dual_ascent(self, Gn, W, Y, theta, steps, config):
        eta = self.dual_step_size(config)

        def body(k, Y):
            Phi = self._msign(Gn + self.adjoint(W, Y, theta), config)
            lr = eta * (1.0 - k / (steps + 1.0)) if steps > 1 else eta
            return Y - lr * self.constraint(W, Phi, theta)

        Y = jax.lax.fori_loop(0, steps, body, Y)
        Phi = self._msign(Gn + self.adjoint(W, Y, theta), config)
        return Phi, Y

    def _scalar_exact(self, Gn, theta, config):
        """Illinois regula falsi on ``h(λ) = ⟨Θ, msign(Gn + λΘ)⟩`` (nondecreasing)."""
        t2 = jnp.maximum(_inner(theta, theta), 1e-30)
        h = lambda lam: _inner(theta, self._msign(Gn + lam[..., None, None] * theta, config))
        lam0 = -_inner(theta, Gn) / t2
        width = (_fro(Gn) + 1.0) / jnp.sqrt(t2)

        # Bracket: grow [lam0 - w, lam0 + w] until h changes sign (h(±∞) = ±‖Θ‖_*).
        def grow(c):
            w, lo, hi, hlo, hhi, i = c
            w = jnp.where((hlo > 0) | (hhi < 0), 2 * w, w)
            lo, hi = lam0 - w, lam0 + w
            return w, lo, hi, h(lo), h(hi), i + 1

        lo, hi = lam0 - width, lam0 + width
        c = (width, lo, hi, h(lo), h(hi), 0)
        c = jax.lax.while_loop(lambda c: jnp.any((c[3] > 0) | (c[4] < 0)) & (c[5] < 60), grow, c)
        _, lo, hi, hlo, hhi, _ = c

        def step(c):
            lo, hi, hlo, hhi, side, i = c
            mid = (lo * hhi - hi * hlo) / jnp.where(hhi - hlo > 0, hhi - hlo, 1.0)
            mid = jnp.where((mid > lo) & (mid < hi), mid, 0.5 * (lo + hi))
            hm = h(mid)
            go_lo = hm > 0  # root in [lo, mid]
            new_lo = jnp.where(go_lo, lo, mid)
            new_hi = jnp.where(go_lo, mid, hi)
            new_hlo = jnp.where(go_lo, jnp.where(side == 1, 0.5 * hlo, hlo), hm)
            new_hhi = jnp.where(go_lo, hm, jnp.where(side == -1, 0.5 * hhi, hhi))
            side = jnp.where(go_lo, -1, 1).astype(side.dtype)  # int32 under x64 too
            return new_lo, new_hi, new_hlo, new_hhi, side, i + 1

        def not_done(c):
            lo, hi, hlo, hhi, _, i = c
            err = jnp.minimum(jnp.abs(hlo), jnp.abs(hhi)) / jnp.sqrt(t2)
            return jnp.any((err > config.tol) & (hi - lo > 1e-7 * (jnp.abs(hi) + jnp.abs(lo)))) & (
                i < config.max_iters
            )

        side = jnp.zeros_like(lo, jnp.int32)
        lo, hi, hlo, hhi, _, _ = jax.lax.while_loop(not_done, step, (lo, hi, hlo, hhi, side, 0))
        lam = jnp.where(jnp.abs(hlo) < jnp.abs(hhi), lo, hi)
        # Interpolate once more inside the final bracket for the last digits.
        lam = jnp.where(
            hhi - hlo > 0, (lo * hhi - hi * hlo) / jnp.where(hhi - hlo > 0, hhi - hlo, 1.0), lam
        )
        lam = jnp.clip(lam, lo, hi)
        Phi = self._msign(Gn + lam[..., None, None] * theta, config)
        return Phi, lam

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


@dataclasses.dataclass(frozen=True)
class Sphere(Manifold):
    """``‖W‖_F = r`` (per matrix; vectors allowed: Su's hypersphere).

    ``C_W(Φ) = ⟨Θ, Φ⟩`` with ``Θ = W/‖W‖_F``, ``C_W*(λ) = λΘ``, retraction ``r·V/‖V‖_F``.
    A shape-aware radius keeps entries O(1/√fan_in): e.g. ``Sphere(radius=√fan_out)`` makes
    the RMS entry ``1/√fan_in`` (radius 1 on a 256×256 matrix gives entries ≈ 1/256).
    """

    radius: float = 1.0
    vector_ok = True

    def theta(self, W, aux=None):
        W = W.astype(jnp.float32)
        n = _fro(W)
        return W / jnp.where(n > 0, n, 1.0)[..., None, None]

    def online_retracted_step(self, G, W, Y, lr, eta, msign_fn):
        """One online step and the retraction, ``(R(W − η·Φ), Y − η₂·⟨Θ, Φ⟩)`` with
        ``Φ = msign(Ĝ + Y·Θ)`` (``Ĝ = G/RMS-σ(G)``, ``Θ = W/‖W‖``; a zero ``G`` steps nowhere
        and keeps ``Y``): the same update as :func:`~manifold_optax.dual_ascent` followed by
        :meth:`retract`, with the fewest passes over the matrices (manifold_step's path).
        ``Θ`` and ``V = W − ηΦ`` are never formed: ``⟨Θ, Φ⟩ = ⟨W, Φ⟩/‖W‖`` and
        ``‖V‖² = ‖W‖² − 2η⟨W, Φ⟩ + η²‖Φ‖²`` come from reductions over ``W`` and ``Φ``
        (``‖V‖ ≈ ‖W‖``: the sum loses nothing to cancellation), and the result
        ``r·(W − ηΦ)/‖V‖`` is one elementwise pass. On the reference tree (2 CPU cores) the
        sphere step went from 1.089× to 1.040× ``muon``'s (the Θ and V arrays were passes).
        ``W``, ``G``: ``[*b, rows, cols]`` float32; ``Y``: ``[*b]``; ``msign_fn`` the msign
        to run."""
        ax = (-2, -1)
        zero, inv_scale = _inverse_gradient_scale(G)
        ww = jnp.sum(W * W, axis=ax)
        nw = jnp.sqrt(ww)
        inv_nw = jnp.where(nw > 0, 1.0 / jnp.where(nw > 0, nw, 1.0), 1.0)
        Phi = msign_fn(G * inv_scale[..., None, None] + (Y * inv_nw)[..., None, None] * W)
        lr = jnp.where(zero, 0.0, lr)  # a zero gradient: Φ = 0, without a pass over Φ
        wp, pp = jnp.sum(W * Phi, axis=ax), jnp.sum(Phi * Phi, axis=ax)
        Y = jnp.where(zero, Y, Y - eta * wp * inv_nw)
        vv = ww - 2.0 * lr * wp + lr * lr * pp
        k = self.radius / jnp.sqrt(jnp.where(vv > 0, vv, 1.0))
        return k[..., None, None] * (W - lr[..., None, None] * Phi), Y

    def retract(self, W, aux=None):
        W32 = jnp.asarray(W, jnp.float32)
        Wm = W32 if W32.ndim >= 2 else W32.reshape(1, -1)
        n = _fro(Wm)
        out = self.radius * Wm / jnp.where(n > 0, n, 1.0)[..., None, None]
        return out.reshape(jnp.shape(W)).astype(jnp.result_type(W))

    def distance(self, W):
        W32 = jnp.asarray(W, jnp.float32)
        Wm = W32 if W32.ndim >= 2 else W32.reshape(1, -1)
        return jnp.max(jnp.abs(_fro(Wm) - self.radius)) / self.radius


@dataclasses.dataclass(frozen=True)
class SpectralSphere(Manifold):
    """``‖W‖₂ = r``. ``Θ = u₁v₁ᵀ`` (top singular pair of a ``block``-vector subspace warm-started
    from the state and refined by a Chebyshev filter), ``C_W(Φ) = ⟨Θ, Φ⟩``, ``C_W*(λ) = λΘ``;
    retraction ``r·V/‖V‖₂`` (a rescaling, not the nearest point). ``Θ`` needs a simple top
    singular value (MATH.md §3). Training drives many singular values up to ``r``; a single
    power vector's estimate of ``‖V‖₂`` then lags by the width of that cluster (measured on
    the digits demo's 256×256 layer: 4.4e-3 with an 8-vector block), so the retraction uses
    the Ritz value (refined by two checked power steps) of a warm-started ``block``-vector
    subspace (default 32; it is a lower bound, so ``σ_max ≥ r`` after the step). Measured
    after every one of the digits demo's 600 steps (``benchmarks/spectral_accuracy.py
    [--block B]``), the worst ``|‖W‖₂ − r|/r``: 4.4e-7 with the default degree-6 filter
    (median 7.3e-8); block 16 left 3.8e-5 (degree 6) and 1.3e-5 (degree 8), block 8 2.8e-4
    (degree 6). ``exact_norm=True`` reads ``‖V‖₂``
    from the top eigenvalue of the short-side Gram matrix instead: exact, but an m×m eigensolve per step (on a 2-core
    CPU the reference tree's step went from ~1.3× to ~4.6× the roofline). ``chebyshev=False``
    refines the warm block with plain power steps instead of the filter (the same products;
    on the demo, 6 power steps left a worst violation of 6.1e-5 against the filter's 4.4e-7)."""

    radius: float = 1.0
    block: int = 32
    exact_norm: bool = False
    chebyshev: bool = True

    def _p(self, shape):
        return max(1, min(self.block, shape[-2], shape[-1]))

    def init_aux(self, W):
        return Aux(v=None)  # update_aux cold-starts the block

    def update_aux(self, W, aux, iters):
        """Warm-started subspace iteration; ``aux.v`` holds the ``[*batch, min(rows, cols), p]``
        block (short side). Without one (``None``), a deterministic cold start (≥ 30
        iterations). The result carries the top singular triple of ``W``."""
        V0 = aux.v
        if V0 is None or V0.shape[-2] != min(W.shape[-2:]):
            V0 = None
        sigma, u, v, V = top_singular_subspace(W, V0, iters, self.block, chebyshev=self.chebyshev)
        return Aux(v=V, sigma=sigma, u=u, vec=v)

    def _pair(self, W, aux):
        if aux.sigma is None:
            aux = self.update_aux(W, aux, 0)
        return aux.sigma, aux.u, aux.vec

    def theta(self, W, aux=None):
        """``Θ = u₁v₁ᵀ``: from ``aux``'s top pair when it carries one (e.g. the previous
        retraction's, which is exactly ``W``'s: the retraction only rescales), else from a
        Rayleigh–Ritz step on ``aux``'s block (a cold start without one)."""
        W = W.astype(jnp.float32)
        if aux is None:
            aux = self.update_aux(W, self.init_aux(W), 40)
        u, v = self._top_vectors(W, aux)
        return u[..., :, None] * v[..., None, :]

    def _top_vectors(self, W, aux):
        """``(u₁, v₁)``: ``aux``'s top pair when it carries one, else a Rayleigh–Ritz step on
        its block."""
        if aux.u is not None and aux.vec is not None:
            return aux.u, aux.vec
        return self._pair(W, aux)[1:]

    def online_dual_step(self, G, W, Y, aux: Aux, eta, msign_fn):
        """One online dual step with the rank-one ``Θ = uvᵀ`` never formed:
        ``(Φ, Y − η₂·uᵀΦv, zero)`` with ``Φ = msign(Ĝ + Y·uvᵀ)`` (``Ĝ = G/RMS-σ(G)``, ``(u, v)``
        the top pair of ``W`` from ``aux``, else a Rayleigh–Ritz step on its block). The
        rank-one term is part of the msign input's elementwise expression and ``⟨Θ, Φ⟩ =
        uᵀΦv`` is a matrix–vector product (a materialized ``Θ`` is an extra write and two
        reads per matrix). ``zero`` marks a zero ``G`` (its multiplier is kept; its ``Φ`` is
        the caller's to discard: it has no steepest direction)."""
        u, v = self._top_vectors(W, aux)
        zero, inv_scale = _inverse_gradient_scale(G)
        Phi = msign_fn(
            G * inv_scale[..., None, None] + (Y[..., None] * u)[..., :, None] * v[..., None, :]
        )
        c = jnp.einsum("...i,...ij,...j->...", u, Phi, v, precision=HIGHEST)
        return Phi, jnp.where(zero, Y, Y - eta * c), zero

    def online_retracted_step(self, G, W, Y, aux: Aux, lr, eta, msign_fn, power_iters: int):
        """One online step and the retraction, ``(r·V/‖V‖₂, Y', aux')`` with ``(Φ, Y')`` from
        :meth:`online_dual_step` and ``V = W − ηΦ`` (a zero ``G`` steps nowhere and keeps
        ``Y``): the same update as :func:`~manifold_optax.dual_ascent` followed by
        :meth:`retract`, with the fewest passes over the matrices (manifold_step's path; the
        zero-gradient guard is folded into ``η``, so there is no pass over ``Φ`` for it).
        Measured in one process on 2 CPU cores, the step without a materialized ``Θ`` went
        from 1.264–1.323× to 1.253–1.254× ``muon``'s on the reference tree and from 1.192× to
        1.153× on the 2× wider one.
        ``aux'``: the block iteration of :meth:`update_aux` on ``V`` (whose top pair is the new
        ``W``'s: the retraction only rescales). ``W``, ``G``: ``[*b, rows, cols]`` float32."""
        Phi, Y, zero = self.online_dual_step(G, W, Y, aux, eta, msign_fn)
        lr = jnp.where(zero, 0.0, lr)  # a zero gradient: Φ = 0, without a pass over Φ
        V = W - lr[..., None, None] * Phi
        aux = self.update_aux(V, aux, power_iters)
        return self.retract(V, aux), Y, aux

    def norm2(self, W, aux=None):
        """``‖W‖₂``: exact (the largest eigenvalue of the short-side Gram, which is
        well-conditioned) when ``exact_norm``; else the estimate from the warm block
        (:func:`~manifold_optax.linalg.top_singular_subspace`)."""
        W32 = jnp.asarray(W, jnp.float32)
        if self.exact_norm or aux is None:
            A = _cross(W32, W32)
            return jnp.sqrt(jnp.maximum(per_matrix(jnp.linalg.eigvalsh, A)[..., -1], 0.0))
        return self._pair(W32, aux)[0]

    def retract(self, W, aux=None):
        W32 = jnp.asarray(W, jnp.float32)
        s = self.norm2(W32, aux)
        out = self.radius * W32 / jnp.where(s > 0, s, 1.0)[..., None, None]
        return out.astype(jnp.result_type(W))

    def distance(self, W):
        s = singular_values(jnp.asarray(W, jnp.float32))[..., 0]
        return jnp.max(jnp.abs(s - self.radius)) / self.radius


@dataclasses.dataclass(frozen=True)
class Stiefel(Manifold):
    """Orthonormal columns when tall (``WᵀW = I``), orthonormal rows when wide or square
    (``WWᵀ = I``; for a square ``W`` the two are the same manifold).

    Tall form (a wide ``W`` reads transposed): ``C_W(Φ) = sym(WᵀΦ)`` (m×m),
    ``C_W*(X) = WX`` for symmetric ``X``, retraction ``msign(V)`` (the polar factor, the nearest
    point). Up to ``retract_steps`` quintic Newton–Schulz steps polish a nearly orthonormal ``V``
    (the training step); a far-off ``V`` (``project_params``) gets the full msign first.

    Every product is written for the matrix as stored (:func:`_cross`, :func:`_apply_sym`), never
    through a transposed view: XLA:CPU runs a product that contracts the lhs's leading axis
    (``AᵀB``) below the rate of ``AB``/``ABᵀ`` (256×256 on 2 cores: first measured 1.2–2.2×
    slower, about 15% re-measured with jaxlib 0.10.2). A
    square ``W`` therefore takes the row form (``sym(WΦᵀ)``, ``X·W``, ``VVᵀ``), in which every
    product is ``AB`` or ``ABᵀ``; its multiplier is the row form's, ``W·X_col·Wᵀ``.
    """

    retract_steps: int = 8  # cap of the polish loop (it stops at float32 accuracy)
    default_dual_learning_rate = 0.1
    project_dual_direction = True

    @staticmethod
    def _tall(x):
        """The tall view (used by the SVD-based solvers, which see only non-square W)."""
        return _t(x) if x.shape[-2] < x.shape[-1] else x

    def multiplier_shape(self, shape):
        m = min(shape[-2:])
        return tuple(shape[:-2]) + (m, m)

    def constraint(self, W, Phi, theta=None):
        return _sym(_cross(W, Phi))

    def adjoint(self, W, Y, theta=None):
        return _apply_sym(W, _sym(Y))

    def theta(self, W, aux=None):
        return None

    def tangent_violation(self, W, Phi, aux=None):
        return _fro(self.constraint(W, Phi)) / jnp.maximum(_fro(Phi), 1e-30)

    def project_tangent(self, W, Phi, aux=None):
        return self.remove_normal(W, Phi, self.constraint(W, Phi))

    def remove_normal(self, W, Phi, c, theta=None):
        """``Φ − W·c`` (``C_W C_W*`` is the identity on symmetric matrices when WᵀW = I)."""
        return Phi - self.adjoint(W, c)

    def initial_multiplier(self, Gn, W, aux):
        return -_sym(_cross(W, Gn))

    @staticmethod
    def _closed_form(W, G, msign_fn):
        """Square ``W`` (row form): ``Φ = msign(skew(GWᵀ))·W``, ``X = −sym(GWᵀ)`` (MATH.md §3's
        ``W·msign(skew(WᵀG))``, conjugated by ``W``), exact and tangent (``ΦWᵀ`` is skew:
        the msign of a skew matrix is skew, to round-off; the polar retraction absorbs that
        round-off, so it is not re-skewed, which would be a pass over every matrix)."""
        GWt = _mm(G, _t(W))
        return _mm(msign_fn(_skew(GWt)), W), -_sym(GWt)

    def dual_step(self, Gn, W, Y, theta, eta, msign_fn):
        """Square ``W``: the closed form (the exact direction, two m×m×m products against the
        dual step's three). Otherwise the generic dual step, ``Φ = msign(Ĝ + W·Y)``,
        ``c = sym(WᵀΦ)``, ``(Φ − W·c, Y − η₂·c)`` (``Φ`` unprojected without
        :attr:`project_dual_direction`), without re-symmetrizing ``Y`` or ``c``
        (:meth:`adjoint` does, for a multiplier of unknown origin): the state's ``Y`` starts
        at zero and changes only by ``c = ½(B + Bᵀ)``, whose two halves are the same
        floating-point sum, so it stays exactly symmetric. A symmetrization reads its
        matrix transposed, which XLA:CPU does at a fraction of the rate of a plain pass
        (measured: 60–100 µs per 256×256 matrix against about 12 µs for a copy)."""
        if W.shape[-2] == W.shape[-1]:
            return self._closed_form(W, Gn, msign_fn)
        Phi = msign_fn(Gn + _apply_sym(W, Y))
        c = self.constraint(W, Phi)
        if self.project_dual_direction:
            Phi = Phi - _apply_sym(W, c)
        return Phi, Y - eta * c

    def _solve(self, Gn, W, Y, aux, solver, config):
        n, m = W.shape[-2:]
        if n == m:
            # Closed form for every solver: Φ = msign(skew(GWᵀ))·W, X = −sym(GWᵀ).
            return self._closed_form(W, Gn, lambda Z: self._msign(Z, config))
        if solver in ("dual_ascent", "online"):
            steps = 1 if solver == "online" else config.inner_steps
            return self._dual_ascent(Gn, W, Y, None, steps, config)
        wide = n < m
        Wt, Gt = self._tall(W), self._tall(Gn)
        if solver == "fixed_point":
            Phi, X, _ = _stiefel_fixed_point(Gt, Wt, Y, config)
        else:
            Phi, X, _ = _stiefel_anderson(Gt, Wt, Y, config)
        return (_t(Phi) if wide else Phi), X

    def retract(self, W, aux=None, *, exact: bool | None = None):
        """The polar factor of ``W`` (the nearest point on the manifold).

        ``exact=False`` (the training step, where ``V = W − ηΦ`` is close to orthonormal):
        with one Gram ``A = VᵀV/c²`` (``VVᵀ`` in the row form; ``c²`` its mean eigenvalue),
        quintic Newton–Schulz steps ``X ← X·p(XᵀX)``, ``p(A) = (15I − 10A + 3A²)/8`` (cubic
        convergence: a deviation ``e = ‖A − I‖₂`` becomes at most ``0.63e³``). If
        ``‖A − I‖_F ≤ 5e-3`` (a tangent step: the deviation is O(η²)) a single step reaches
        float32 accuracy (truncation ``≤ 7.9e-8``, below the float32 rounding of the polish
        itself) and is taken without another Gram: two n×m×m products and one m×m×m in all;
        where the cubic ``X(3I − A)/2`` is certified as accurate (:func:`_polish_certificates`)
        it is taken instead, without the m×m×m (the transforms take that single step with one
        choice for all matrices, :meth:`polish_plan`, and come here only when neither
        suffices). Otherwise steps
        continue until ``max|XᵀX − I| ≤ 1e-6`` or ``‖XᵀX − I‖_F`` stops improving (at most
        ``retract_steps``; 32 after the full msign). A bound on
        ``‖A − I‖₂`` above 0.8 (e.g. parameters never projected) takes the float32-accurate
        msign first, so a far-off ``V`` cannot make the polish diverge. ``exact=True`` /
        ``None`` always takes the full path.
        """
        X = jnp.asarray(W, jnp.float32)
        m = min(X.shape[-2:])
        eye = jnp.eye(m, dtype=jnp.float32)

        def full(X):
            return msign(X, steps=10, precision=HIGHEST)

        def normalized_gram(X):
            return (X, *_normalized_gram(X))

        def full_gram(X):
            # No renormalization after msign: its σ are already in [0, 1.01], and scaling by the
            # RMS σ would push a rank-deficient matrix's nonzero σ out of the quintic's basin.
            X = full(X)
            return X, _cross(X, X), jnp.ones(X.shape[:-2] + (1, 1), X.dtype)

        def fro(A):
            return jnp.max(_fro_from_identity(A))

        def polish(X, A, cap):
            # X ← X·p(A), A ← XᵀX until max|A − I| ≤ 1e-6, or ‖A − I‖_F stops halving once
            # below 0.1 (the float32 floor). Above 0.1 keep going: the quintic lifts a small σ
            # by 1.875× per step, so the error stays large for a few steps before it collapses.
            # The Gram is recomputed from X each step (recurring on A alone drifts to ~4e-6).
            def body(c):
                X, A, _, f, k = c
                X = _apply_sym(X, _quintic(A))
                A = _cross(X, X)
                return X, A, f, fro(A), k + 1

            def go_on(c):
                _, A, prev, f, k = c
                done = jnp.max(jnp.abs(A - eye)) <= 1e-6
                return ~done & ((f < 0.5 * prev) | (f > 0.1)) & (k < cap)

            return jax.lax.while_loop(go_on, body, (X, A, jnp.inf, fro(A), 0))[0]

        # After the full msign, tiny singular values (σ_min/σ_max ≲ 1e-4, e.g. a square
        # Gaussian init) may still need a dozen quintic steps.
        long_cap = max(self.retract_steps, 32)

        def exact_then_polish(X, A, s):
            X, A, _ = full_gram(X)
            return polish(X, A, long_cap)

        branches = [
            lambda X, A, s: _apply_sym(X, _cubic(A) * s),  # certified (_polish_certificates)
            lambda X, A, s: _apply_sym(X, _quintic(A) * s),  # e → 0.63e³ ≤ 7.9e-8
            lambda X, A, s: polish(X * s, A, self.retract_steps),
            exact_then_polish,
        ]
        if exact is None or exact:
            X, A, inv_c = full_gram(X)
            branches = branches[:2] + [lambda X, A, s: polish(X, A, long_cap)]
            far = False
        else:
            X, A, inv_c = normalized_gram(X)
            # ‖A − I‖₂ ≤ max row sum (A symmetric); below 0.8 every σ lies in [0.45, 1.34],
            # inside the quintic's basin. Otherwise (never-projected parameters) go exact.
            # (One switch for both decisions: a cond in front of it returned V through an
            # identity branch, which XLA:CPU copied, a pass over every V.)
            far = jnp.max(_row_sum_from_identity(A)) > 0.8
        cubic_ok, quintic_ok = _polish_certificates(A)
        branch = jnp.where(
            far, 3, jnp.where(jnp.all(cubic_ok), 0, jnp.where(jnp.all(quintic_ok), 1, 2))
        )
        X = jax.lax.switch(branch, branches, X, A, inv_c)
        return X.astype(jnp.result_type(W))

    def polish_plan(self, V):
        """The training retraction's Gram and its certificates: ``(A, 1/c, cubic_ok,
        quintic_ok)`` with ``A = VᵀV/c²`` (``VVᵀ`` in the row form; ``c²`` its mean
        eigenvalue) and per matrix whether one cubic or one quintic polish step, ``V·p(A)/c``,
        is float32-accurate (:func:`_polish_certificates`). The transforms take that step with
        one choice of ``p`` for all matrices of a step (``manifold_transforms._stiefel_updates``)
        and :meth:`retract` (``exact=False``) only where neither suffices. On step_bench's tree at
        η = 0.02 the cubic is certified for every matrix (``‖A − I‖₂ ≈ η²``, bounded by
        1.3–1.5e-3), which saves the quintic's m×m×m product: of the step's matmul FLOPs, 38
        instead of 40 m³ per square matrix (``muon``: 30) and 100 instead of 102 m³ per 4:1
        matrix (60)."""
        X = jnp.asarray(V, jnp.float32)
        A, inv_c = _normalized_gram(X)
        return (A, inv_c, *_polish_certificates(A))

    def distance(self, W):
        W = jnp.asarray(W, jnp.float32)
        m = min(W.shape[-2:])
        return jnp.max(jnp.abs(_cross(W, W) - jnp.eye(m, dtype=jnp.float32)))


# ---- Stiefel solvers (tall W, n > m) ------------------------------------------------------


def _polar_svd(Z):
    """Thin SVD ``Z = UΣVᵀ`` of a tall matrix. In float64, from the eigendecomposition of the
    m×m Gram ``ZᵀZ`` (about 2× faster than an SVD; squaring the conditioning costs nothing at
    float64's precision); in float32 from a true SVD (the Gram would lose small σ)."""
    if Z.dtype == jnp.float64:
        lam, V = jnp.linalg.eigh(_mm(_t(Z), Z))
        lam, V = lam[..., ::-1], V[..., ::-1]
        s = jnp.sqrt(jnp.maximum(lam, 0.0))
        sf = jnp.maximum(s, s[..., :1] * 1e-14 + 1e-300)
        U = _mm(Z, V) / sf[..., None, :]
        return U, s, V
    U, s, Vt = jnp.linalg.svd(Z, full_matrices=False)
    return U, s, _t(Vt)


def _stiefel_residual(Wt, Phi):
    return _sym(_mm(_t(Wt), Phi))


def _su_map(G, W, WtG, X):
    """One step of Su's fixed point; returns ``(F(X), Φ(X), residual(X))``."""
    m = W.shape[-1]
    U, s, V = _polar_svd(G + _mm(W, X))
    Phi = _mm(U, _t(V))
    Q = _mm(V * s[None, :], _t(V))
    rhs = _mm(_mm(_t(V), _sym(_mm(Q, WtG))), V)
    denom = s[:, None] + s[None, :]
    Fx = -2.0 * _mm(_mm(V, rhs / jnp.maximum(denom, 1e-30)), _t(V))
    R = _stiefel_residual(W, Phi)
    return _sym(Fx), Phi, jnp.sqrt(jnp.sum(R * R)) / math.sqrt(m)


def _stiefel_anderson(Gt, Wt, X0, config, depth: int = 12):
    """Su's fixed point accelerated by Anderson mixing (type II, depth ``depth``).

    The plain fixed point needs hundreds to thousands of iterations when n/m is near 1–2;
    Anderson extrapolation over the last ``depth`` iterates cuts that to a few dozen (one SVD
    of ``G + WX`` each). History is kept in fixed-size buffers so the loop jit-compiles.
    """
    m = Wt.shape[-1]
    d = depth

    def one(G, W, X):
        WtG = _mm(_t(W), G)
        Xh = jnp.zeros((d + 1, m * m), W.dtype)
        Fh = jnp.zeros((d + 1, m * m), W.dtype)

        def body(c):
            X, Xh, Fh, k, best = c
            Fx, Phi, res = _su_map(G, W, WtG, X)
            improved = res < best[0]
            best = jax.tree.map(
                lambda new, old: jnp.where(improved, new, old), (res, Phi, X, k), best
            )
            x, f = X.reshape(-1), (Fx - X).reshape(-1)
            Xh = jnp.roll(Xh, -1, axis=0).at[-1].set(x)
            Fh = jnp.roll(Fh, -1, axis=0).at[-1].set(f)
            dX, dF = (Xh[1:] - Xh[:-1]).T, (Fh[1:] - Fh[:-1]).T  # (m², d)
            valid = (jnp.arange(d) >= d - k).astype(W.dtype)
            dX, dF = dX * valid, dF * valid
            # Least squares min‖f − dF·γ‖ by QR (normal equations would square the
            # conditioning and stall in float32); unused columns are unit vectors → γ = 0.
            pad = jnp.zeros((d, d), W.dtype).at[jnp.arange(d), jnp.arange(d)].set(1.0 - valid)
            Qf, Rf = jnp.linalg.qr(jnp.concatenate([dF, pad], axis=0))
            Rf = Rf + jnp.diag(1e-12 * (jnp.abs(jnp.diag(Rf)).max() + 1e-30) * jnp.ones(d, W.dtype))
            rhs = _mm(_t(Qf), jnp.concatenate([f, jnp.zeros(d, W.dtype)])[:, None])
            gamma = jax.scipy.linalg.solve_triangular(Rf, rhs, lower=False)[:, 0] * valid
            xn = x + f - _mm(dX + dF, gamma[:, None])[:, 0]
            return _sym(xn.reshape(m, m)), Xh, Fh, k + 1, best

        def go_on(c):
            _, _, _, k, (res, _, _, k_best) = c
            # Stop at the tolerance, the cap, or when float32 round-off stalls the iteration.
            return (res > config.tol) & (k < config.max_iters) & (k - k_best <= 15)

        best = (jnp.asarray(jnp.inf, W.dtype), jnp.zeros_like(G), X, 0)
        c = jax.lax.while_loop(go_on, body, (X, Xh, Fh, 0, best))
        _, Phi, Xb, _ = c[4]
        return Phi, Xb, c[3]

    # One matrix at a time: each solve stops at its own count; no batched LAPACK call.
    return per_matrix(one, Gt, Wt, _sym(X0), always=True)


def _stiefel_fixed_point(Gt, Wt, X0, config):
    """Su's fixed point (part 3): with ``Z = G + WX = UΣVᵀ``, ``Q = VΣVᵀ``, solve the Lyapunov
    equation ``QX + XQ = −2·sym(QWᵀG)`` in the SVD basis, ``X = −2V[(Vᵀsym(QWᵀG)V) ⊘
    (σ_i + σ_j)]Vᵀ``, and repeat."""

    def one(G, W, X):
        WtG = _mm(_t(W), G)

        def body(c):
            X, k, _, _ = c
            Fx, Phi, res = _su_map(G, W, WtG, X)
            return Fx, k + 1, res, Phi

        c = (X, 0, jnp.inf, jnp.zeros_like(G))
        c = jax.lax.while_loop(lambda c: (c[2] > config.tol) & (c[1] < config.max_iters), body, c)
        return c[3], c[0], c[1]

    # One matrix at a time: each solve stops at its own count; no batched LAPACK call.
    return per_matrix(one, Gt, Wt, _sym(X0), always=True)
