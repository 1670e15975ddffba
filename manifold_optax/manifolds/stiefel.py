"""The Stiefel manifold: orthonormal columns (tall) or rows (wide and square)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from manifold_optax.linalg import msign, per_matrix
from manifold_optax.manifolds import solvers
from manifold_optax.manifolds._ops import (
    HIGHEST,
    apply_sym,
    cross,
    distances_from_identity,
    fro,
    fro_from_identity,
    hp_matmul,
    row_sum_from_identity,
    skew,
    sym,
    transpose,
    working,
)
from manifold_optax.manifolds.base import Manifold, PolishPlan

__all__ = ["Stiefel", "polish_certificates", "CUBIC_POLISH_TOLERANCE", "QUINTIC_POLISH_TOLERANCE"]

#: Largest certified truncation ``‖XᵀX − I‖₂`` for which one cubic polish step replaces the
#: quintic (saving its m×m×m product): the order of the rounding a float32 polish leaves
#: anyway (a few ε₃₂ times the short side's square root).
CUBIC_POLISH_TOLERANCE = 2e-6

#: ``‖A − I‖_F`` up to which one quintic polish step is float32-accurate (truncation
#: ``≤ 0.63e³ ≤ 7.9e-8``).
QUINTIC_POLISH_TOLERANCE = 5e-3


def normalized_gram(X):
    """``(A, 1/c)``: the short-side Gram of ``X/c``, ``c²`` its mean eigenvalue (the scale is
    folded into the m×m polish factor ``p(A)/c`` rather than applied to ``X``)."""
    m = min(X.shape[-2:])
    A = cross(X, X)
    c2 = jnp.trace(A, axis1=-2, axis2=-1) / m
    c2 = jnp.where(c2 > 0, c2, 1.0)[..., None, None]
    return A / c2, jax.lax.rsqrt(c2)


def quintic(A):
    """``p(A) = (15I − 10A + 3A²)/8``: one Newton–Schulz step toward ``A^{-1/2}``."""
    eye = jnp.eye(A.shape[-1], dtype=A.dtype)
    return 1.875 * eye - 1.25 * A + 0.375 * hp_matmul(A, A)


def cubic(A):
    """``p(A) = (3I − A)/2``: the cubic Newton–Schulz step toward ``A^{-1/2}`` (no product)."""
    eye = jnp.eye(A.shape[-1], dtype=A.dtype)
    return 1.5 * eye - 0.5 * A


def polish_tolerances(dtype):
    """``(cubic, quintic)`` thresholds of :func:`polish_certificates` for a working dtype: the
    float32 constants, or for float64 a cubic truncation of ``64·ε`` and the quintic's
    ``‖A − I‖_F`` whose bound ``0.63e³`` is that."""
    if dtype == jnp.float64:
        t = 64 * float(jnp.finfo(jnp.float64).eps)
        return t, (t / 0.63) ** (1.0 / 3.0)
    return CUBIC_POLISH_TOLERANCE, QUINTIC_POLISH_TOLERANCE


def polish_certificates(A):
    """``(cubic_ok, quintic_ok)`` per matrix for a normalized Gram ``A`` (trace ``m``).

    With ``D = A − I`` and ``X = V·p(A)/c``, ``XᵀX − I = A·p(A)² − I`` exactly (``p(A)``
    commutes with ``A``): ``−¾D² + ¼D³`` for the cubic, ``⅝D³ + O(D⁴)`` for the quintic. Their
    spectral norms are bounded by ``¾e²(1 + e/3)`` and ``0.63e³`` (``e ≤ 5e-3``) for any upper
    bound ``e ≥ ‖D‖₂``; here ``e = min(‖D‖_F, max row sum of |D|)`` (Frobenius and Gershgorin;
    ``D`` is symmetric). ``cubic_ok``: the cubic's bound is within
    :data:`CUBIC_POLISH_TOLERANCE`; ``quintic_ok``: ``‖D‖_F ≤`` :data:`QUINTIC_POLISH_TOLERANCE`
    (float32; float64 ``A`` uses :func:`polish_tolerances`).
    """
    cubic_tol, quintic_tol = polish_tolerances(A.dtype)
    f, rows = distances_from_identity(A)
    e = jnp.minimum(f, rows)
    cubic_ok = 0.75 * e * e * (1.0 + e / 3.0) <= cubic_tol
    return cubic_ok, f <= quintic_tol


#: Anderson steps of ``"exact"`` before the certified Newton takes over: tall, skinny
#: problems converge within them, nearly square ones (degenerate or slowly contracting duals)
#: stall at one SVD a step, where a Newton step on the smoothed dual costs about as much.
EXACT_ANDERSON = 20


@dataclasses.dataclass(frozen=True)
class Stiefel(Manifold):
    """Orthonormal columns when tall (``WᵀW = I``), orthonormal rows when wide or square
    (``WWᵀ = I``; for a square ``W`` both) (``docs/math.md``, Stiefel).

    In the tall form (a wide ``W`` reads transposed):

    .. math::

       C_W(Φ) = \\operatorname{sym}(W^⊤Φ),\\quad C_W^*(X) = WX\\ (X = X^⊤),\\quad
       R(V) = \\operatorname{msign}(V),

    the polar factor, which is the nearest point. The multiplier is a symmetric ``m×m``
    matrix (``m`` the short side). A square ``W`` has the closed form
    ``Φ = W·msign(skew(WᵀG))`` under every solver. Every product is written for the matrix
    as stored, never through a transposed copy: a square ``W`` takes the row form
    (``sym(WΦᵀ)``, ``X·W``, ``VVᵀ``).

    Solvers: ``"exact"`` is Su's fixed point accelerated by Anderson mixing (at most
    :data:`EXACT_ANDERSON` steps), certified by its duality gap and continued by Newton's
    method on the smoothed dual where a gap is left (degenerate duals of nearly square
    matrices; :mod:`~manifold_optax.manifolds.certified`);
    ``"fixed_point"`` the plain one (fast for tall, skinny matrices), both one matrix at a
    time; the dual-ascent solvers return ``Φ`` projected onto the tangent space and divided by
    ``1 + ‖W·c‖_F`` (:meth:`tangent_in_ball`).

    Attributes:
      retract_steps: cap of the polish loop of the training retraction.

    Example:
      >>> import jax.numpy as jnp, manifold_optax as mo
      >>> W = mo.Stiefel().project(jnp.array([[2.0, 0.0], [0.0, 0.5], [0.0, 0.0]]))
      >>> bool(jnp.allclose(W.T @ W, jnp.eye(2), atol=1e-5))
      True

    References:
      Su Jianlin, "Steepest descent on manifolds", parts 3–5 (kexue.fm, 2025); Bernstein,
      "Modular Manifolds" (Thinking Machines, 2025).
    """

    retract_steps: int = 8
    default_dual_learning_rate = 0.1
    project_dual_direction = True

    def multiplier_shape(self, shape):
        m = min(shape[-2:])
        return tuple(shape[:-2]) + (m, m)

    def constraint(self, W, Phi, theta=None):
        return sym(cross(W, Phi))

    def adjoint(self, W, Y, theta=None):
        return apply_sym(W, sym(Y))

    def theta(self, W, aux=None):
        return None

    def tangent_violation(self, W, Phi, aux=None):
        return fro(self.constraint(W, Phi)) / jnp.maximum(fro(Phi), 1e-30)

    def project_tangent(self, W, Phi, aux=None):
        return self.remove_normal(W, Phi, self.constraint(W, Phi))

    def remove_normal(self, W, Phi, c, theta=None):
        """``Φ − W·c`` (``C_W C_W*`` is the identity on symmetric matrices when WᵀW = I)."""
        return Phi - self.adjoint(W, c)

    def initial_multiplier(self, Gn, W, aux):
        return -sym(cross(W, Gn))

    def dual_preconditioner(self, W, theta, U, s, V, mu):
        """The Lyapunov preconditioner ``R ↦ B[(BᵀRB) ⊙ (r_i + r_j)/2]Bᵀ``, ``B`` the
        short-side singular basis of ``Z = Ĝ + W·Y`` (``V`` tall, ``U`` wide),
        ``r = √(σ² + μ²)``: the inverse of the smoothed dual's Hessian when ``W`` spans ``Z``'s
        column space, where the Hessian scales ``BᵀDB`` by ``2/(r_i + r_j)`` (the polar
        factor's derivative: the skew part by ``2/(σ_i + σ_j)``, the normal part by ``1/σ``;
        Su's Lyapunov step is this map at ``μ = 0``)."""
        B = V if W.shape[-2] > W.shape[-1] else U
        r = jnp.sqrt(s * s + mu * mu)
        scale = 0.5 * (r[:, None] + r[None, :])
        return lambda R: hp_matmul(
            hp_matmul(B, scale * hp_matmul(hp_matmul(transpose(B), R), B)), transpose(B)
        )

    def reads_multiplier(self, shape) -> bool:
        return shape[-1] != shape[-2]

    @staticmethod
    def _closed_form(W, G, msign_fn):
        """Square ``W`` (row form): ``Φ = msign(skew(GWᵀ))·W``, ``X = −sym(GWᵀ)`` (the column
        form's ``W·msign(skew(WᵀG))`` conjugated by ``W``), exact and tangent: ``ΦWᵀ`` is
        skew to round-off, which the polar retraction absorbs."""
        GWt = hp_matmul(G, transpose(W))
        return hp_matmul(msign_fn(skew(GWt)), W), -sym(GWt)

    def dual_step(self, Gn, W, Y, theta, eta, msign_fn):
        """Square ``W``: the closed form. Otherwise ``Φ = msign(Ĝ + W·Y)``, ``c = sym(WᵀΦ)``,
        ``((Φ − W·c)/(1 + ‖c‖_F), Y − η₂·c)`` (:meth:`tangent_in_ball`), without
        re-symmetrizing ``Y``: a multiplier that starts at
        zero and changes only by ``c = ½(B + Bᵀ)``, whose two halves are the same
        floating-point sum, stays exactly symmetric."""
        if W.shape[-2] == W.shape[-1]:
            return self._closed_form(W, Gn, msign_fn)
        Phi = msign_fn(Gn + apply_sym(W, Y))
        c = self.constraint(W, Phi)
        if self.project_dual_direction:
            Phi = self.tangent_in_ball(W, Phi, c)
        return Phi, Y - eta * c

    def tangent_in_ball(self, W, Phi, c, theta=None):
        """``(Φ − W·c)/(1 + ‖c‖_F)`` (``‖W·c‖_F = ‖c‖_F`` on the manifold: an ``m×m``
        reduction bounds the normal part; see :meth:`Manifold.tangent_in_ball`)."""
        return (Phi - apply_sym(W, c)) / (1.0 + fro(c))[..., None, None]

    def solve_multiplier(self, Gn, W, Y, aux, solver, config):
        n, m = W.shape[-2:]
        if n == m:
            return self._closed_form(W, Gn, lambda Z: self.solver_msign(Z, config))
        if solver in ("dual_ascent", "online"):
            steps = 1 if solver == "online" else config.inner_steps
            return solvers.dual_ascent(self, Gn, W, Y, None, steps, config)
        tall = lambda x: transpose(x) if x.shape[-2] < x.shape[-1] else x
        if solver == "exact":  # the certified Newton continues where the fixed point stalls
            config = dataclasses.replace(config, max_iters=min(config.max_iters, EXACT_ANDERSON))
        Phi, X, _ = su_solve(tall(Gn), tall(W), Y, config, anderson=solver == "exact")
        return (transpose(Phi) if n < m else Phi), X

    def retract(self, W, aux=None, *, exact: bool | None = None):
        """The polar factor of ``W`` (the nearest point on the manifold).

        ``exact=False`` (the training step, where ``V = W − ηΦ`` is close to orthonormal):
        with one Gram ``A = VᵀV/c²`` (``c²`` its mean eigenvalue), quintic Newton–Schulz steps
        ``X ← X·p(XᵀX)``, ``p(A) = (15I − 10A + 3A²)/8`` (cubic convergence: a deviation
        ``e = ‖A − I‖₂`` becomes at most ``0.63e³``). One step where certified
        (:func:`polish_certificates`: the cubic ``X(3I − A)/2``, else the quintic); otherwise
        steps continue until ``max|XᵀX − I| ≤ 1e-6`` or ``‖XᵀX − I‖_F`` stops improving (at
        most ``retract_steps``; 32 after the full msign). A bound on ``‖A − I‖₂`` above 0.8
        (parameters never projected) takes the float32-accurate msign first, so a far-off
        ``V`` cannot make the polish diverge. ``exact=True`` / ``None`` always takes the full
        msign first.
        """
        X = working(W)
        m = min(X.shape[-2:])
        eye = jnp.eye(m, dtype=X.dtype)
        # Where the polish stops: float32's rounding, or float64's.
        done_tol = 1e-6 if X.dtype == jnp.float32 else 1e-14

        def full_gram(X):
            # No renormalization after msign: its σ are already in [0, 1.01], and scaling by the
            # RMS σ would push a rank-deficient matrix's nonzero σ out of the quintic's basin.
            X = msign(X, steps=10, precision=HIGHEST).astype(X.dtype)
            return X, cross(X, X), jnp.ones(X.shape[:-2] + (1, 1), X.dtype)

        def err(A):
            return jnp.max(fro_from_identity(A))

        def polish(X, A, cap):
            # Until max|A − I| ≤ 1e-6, or ‖A − I‖_F stops halving once below 0.1 (the float32
            # floor). Above 0.1 keep going: the quintic lifts a small σ by 1.875× per step, so
            # the error stays large for a few steps before it collapses. The Gram is recomputed
            # from X each step (a recurrence on A alone drifts).
            def body(c):
                X, A, _, f, k = c
                X = apply_sym(X, quintic(A))
                A = cross(X, X)
                return X, A, f, err(A), k + 1

            def go_on(c):
                _, A, prev, f, k = c
                done = jnp.max(jnp.abs(A - eye)) <= done_tol
                return ~done & ((f < 0.5 * prev) | (f > 0.1)) & (k < cap)

            return jax.lax.while_loop(go_on, body, (X, A, jnp.inf, err(A), 0))[0]

        # After the full msign, tiny singular values (σ_min/σ_max ≲ 1e-4, e.g. a square
        # Gaussian init) may still need a dozen quintic steps.
        long_cap = max(self.retract_steps, 32)

        def exact_then_polish(X, A, s):
            X, A, _ = full_gram(X)
            return polish(X, A, long_cap)

        branches = [
            lambda X, A, s: apply_sym(X, cubic(A) * s),  # certified (polish_certificates)
            lambda X, A, s: apply_sym(X, quintic(A) * s),  # e → 0.63e³ ≤ 7.9e-8
            lambda X, A, s: polish(X * s, A, self.retract_steps),
            exact_then_polish,
        ]
        if exact is None or exact:
            X, A, inv_c = full_gram(X)
            branches = branches[:2] + [lambda X, A, s: polish(X, A, long_cap)]
            far = False
        else:
            X, A, inv_c = (X, *normalized_gram(X))
            # ‖A − I‖₂ ≤ max row sum (A symmetric); below 0.8 every σ lies in [0.45, 1.34],
            # inside the quintic's basin. Otherwise (never-projected parameters) go exact.
            far = jnp.max(row_sum_from_identity(A)) > 0.8
        cubic_ok, quintic_ok = polish_certificates(A)
        branch = jnp.where(
            far, 3, jnp.where(jnp.all(cubic_ok), 0, jnp.where(jnp.all(quintic_ok), 1, 2))
        )
        X = jax.lax.switch(branch, branches, X, A, inv_c)
        return X.astype(jnp.result_type(W))

    def project(self, W):
        return self.retract(W, exact=True)

    def polish_plan(self, V) -> PolishPlan:
        """The training retraction's Gram and its certificates: ``A = VᵀV/c²`` (``VVᵀ`` in the
        row form; ``c²`` its mean eigenvalue), ``1/c``, and per matrix whether one cubic or
        one quintic polish step ``V·p(A)/c`` is float32-accurate
        (:func:`polish_certificates`)."""
        X = working(V)
        A, inv_c = normalized_gram(X)
        return PolishPlan(A, inv_c, *polish_certificates(A))

    def begin_retraction(self, V, aux, power_iters: int):
        """``V`` and its :meth:`polish_plan`: the transformations take one polish step for all
        Stiefel leaves of a step together, with the cubic where every matrix certifies it,
        and :meth:`fallback_retraction` only where the quintic too falls short."""
        return V, aux, self.polish_plan(V)

    def polish_factor(self, plan: PolishPlan, cheap: bool):
        return (cubic(plan.A) if cheap else quintic(plan.A)) * plan.inv_c

    def apply_polish(self, V, P):
        return apply_sym(V, P)

    def fallback_retraction(self, V):
        return self.retract(V, exact=False)

    def distance(self, W):
        W = working(W)
        m = min(W.shape[-2:])
        return jnp.max(jnp.abs(cross(W, W) - jnp.eye(m, dtype=W.dtype)))


# ---- Su's fixed point (tall W, n > m) ----------------------------------------------------


def _polar_svd(Z):
    """Thin SVD ``Z = UΣVᵀ`` of a tall matrix (``V`` not transposed)."""
    U, s, Vt = jnp.linalg.svd(Z, full_matrices=False)
    return U, s, transpose(Vt)


def _su_map(G, W, WtG, X):
    """One step of Su's fixed point: with ``Z = G + WX = UΣVᵀ``, ``Q = VΣVᵀ``, the solution of
    the Lyapunov equation ``QX + XQ = −2·sym(QWᵀG)`` in the SVD basis,
    ``X = −2V[(Vᵀsym(QWᵀG)V) ⊘ (σ_i + σ_j)]Vᵀ``. Returns ``(F(X), Φ(X), residual(X))``."""
    m = W.shape[-1]
    U, s, V = _polar_svd(G + hp_matmul(W, X))
    Phi = hp_matmul(U, transpose(V))
    Q = hp_matmul(V * s[None, :], transpose(V))
    rhs = hp_matmul(hp_matmul(transpose(V), sym(hp_matmul(Q, WtG))), V)
    # σ_i + σ_j = 0 (a rank-deficient Z, a degenerate dual) has no Lyapunov solution: that
    # block of X is left at zero (the certified solver takes over where it matters).
    denom = s[:, None] + s[None, :]
    ok = denom > s[0] * jnp.finfo(s.dtype).eps * m
    Fx = -2.0 * hp_matmul(
        hp_matmul(V, jnp.where(ok, rhs / jnp.where(ok, denom, 1.0), 0.0)), transpose(V)
    )
    R = sym(hp_matmul(transpose(W), Phi))
    return sym(Fx), Phi, jnp.sqrt(jnp.sum(R * R)) / math.sqrt(m)


def su_solve(Gt, Wt, X0, config, anderson: bool):
    """Su's fixed point on tall ``(G, W)``, with Anderson mixing or plain; one matrix at a
    time (each solve stops at its own count). Returns ``(Φ, X, iterations)``."""

    def one(G, W, X):
        WtG = hp_matmul(transpose(W), G)
        step = lambda X: _su_map(G, W, WtG, X)
        if anderson:
            return solvers.anderson(step, X, jnp.zeros_like(G), config)
        return solvers.fixed_point(step, X, jnp.zeros_like(G), config)

    return per_matrix(one, Gt, Wt, sym(X0), always=True)
