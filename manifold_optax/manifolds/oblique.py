"""The oblique manifold: every column (or every row) of the matrix at norm ``r``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from manifold_optax.manifolds import solvers
from manifold_optax.manifolds._ops import fro, hp_matmul, transpose, working
from manifold_optax.manifolds.base import SOLVERS, Manifold
from manifold_optax.manifolds.newton_cg import spectral_scales

__all__ = ["Oblique"]


@dataclasses.dataclass(frozen=True)
class Oblique(Manifold):
    """Unit-norm columns (``axis=-2``) or rows (``axis=-1``), scaled to ``r``
    (``docs/math.md``, Oblique). For columns (``Wᵀ`` for rows):

    .. math::

       C_W(Φ) = \\operatorname{diag}(Ŵ^⊤Φ),\\quad C_W^*(λ) = Ŵ\\operatorname{diag}(λ),\\quad
       R(V) = r·V\\operatorname{diag}(1/‖v_j‖_2),

    with ``Ŵ = W/r`` the unit columns (the multiplier's units do not depend on ``r``), one
    multiplier per column (``[*batch, cols]``; rows: ``[*batch, rows]``); the retraction,
    a rescaling of each column, is the nearest point. ``axis=-2`` is one output's weights of a
    Flax ``(in, out)`` kernel (weight-normalized layers, nGPT); ``axis=-1`` one input's
    (embedding rows). A zero column has no direction: :meth:`check_point` rejects it.

    Solvers: ``"exact"`` starts from the tangent projection's multiplier and is certified,
    continued by Newton's method on the smoothed dual where needed (square oblique problems
    have degenerate duals); ``"dual_ascent"`` and ``"online"`` as for every manifold;
    ``"fixed_point"`` has no oblique form (a ValueError says so).

    Attributes:
      radius: ``r > 0``.
      axis: ``-2`` (columns) or ``-1`` (rows; 0-D/1-D leaves are then ``(1, d)`` rows).

    Example:
      >>> import jax.numpy as jnp, manifold_optax as mo
      >>> W = mo.Oblique().project(jnp.array([[3.0, 0.0], [4.0, 2.0]]))
      >>> jnp.linalg.norm(W, axis=0).tolist()
      [1.0, 1.0]

    References:
      Absil & Gallivan, "Joint diagonalization on the oblique manifold" (2006); Loshchilov et
      al., "nGPT" (arXiv:2410.01131, 2024).
    """

    radius: float = 1.0
    axis: int = -2
    default_dual_learning_rate = 0.5

    def __post_init__(self):
        if self.axis not in (-1, -2):
            raise ValueError(f"Oblique axis must be -2 (columns) or -1 (rows), got {self.axis}")

    @property
    def vector_ok(self) -> bool:  # a vector is one row: fine for rows only
        return self.axis == -1

    def _norms(self, W):
        return jnp.sqrt(jnp.sum(W * W, axis=self.axis, keepdims=True))

    def multiplier_shape(self, shape):
        return tuple(shape[:-2]) + (shape[-1] if self.axis == -2 else shape[-2],)

    def theta(self, W, aux=None):
        return None

    def _unit(self, W):
        n = self._norms(W)
        return W / jnp.where(n > 0, n, 1.0)

    def constraint(self, W, Phi, theta=None):
        return jnp.sum(self._unit(W) * Phi, axis=self.axis)

    def adjoint(self, W, Y, theta=None):
        return self._unit(W) * jnp.expand_dims(Y, self.axis)

    def remove_normal(self, W, Phi, c, theta=None):
        """``Φ − Ŵ·diag(c)`` (``C_W C_W*`` is the identity)."""
        return Phi - self.adjoint(W, c)

    def tangent_violation(self, W, Phi, aux=None):
        c = self.constraint(W, Phi)
        return jnp.sqrt(jnp.sum(c * c, axis=-1)) / jnp.maximum(fro(Phi), 1e-30)

    def initial_multiplier(self, Gn, W, aux):
        return -self.constraint(W, Gn)

    def dual_preconditioner(self, W, theta, U, s, V, mu):
        """Jacobi: ``R ↦ R/diag(∇²f_μ)``, the exact diagonal of the smoothed dual's Hessian
        in closed form, from one product ``P = UᵀŴ``. With ``a = P e_k``, ``b = Vᵀe_k`` (so
        ``Uᵀ C_W*(e_k) V = abᵀ``) and the divided differences ``A`` (symmetric part) and
        ``B`` (skew part) of :func:`~manifold_optax.manifolds.newton_cg.spectral_scales`,

        .. math::

           H_{kk} = (a^{∘2})^⊤\\tfrac{A+B}{2}b^{∘2} + (a∘b)^⊤\\tfrac{A-B}{2}(a∘b)
                  + (1 - ‖a‖^2)\\,(b^{∘2})^⊤r^{-1} + (1 - ‖b‖^2)\\,(a^{∘2})^⊤r^{-1}

        (the last two terms: the parts of ``C_W*(e_k)`` outside the column and row spans of
        ``Z``). Rows (``axis=-1``) read the transpose."""
        Wu = self._unit(W)
        if self.axis == -1:
            Wu, U, V = transpose(Wu), V, U
        r = jnp.sqrt(s * s + mu * mu)
        A, B = spectral_scales(s, r, mu)
        P = hp_matmul(transpose(U), Wu)  # [k, cols]: column j is Uᵀŵ_j
        Vb = transpose(V)  # [k, cols]: column j is Vᵀe_j
        ab = P * Vb
        d = jnp.sum(P * P * hp_matmul(0.5 * (A + B), Vb * Vb), axis=0)
        d = d + jnp.sum(ab * hp_matmul(0.5 * (A - B), ab), axis=0)
        d = d + (1.0 - jnp.sum(P * P, axis=0)) * hp_matmul(1.0 / r, Vb * Vb)
        d = d + (1.0 - jnp.sum(Vb * Vb, axis=0)) * hp_matmul(1.0 / r, P * P)
        floor = jnp.finfo(d.dtype).eps * jnp.max(jnp.abs(d))
        return lambda R: R / jnp.maximum(d, floor)

    def solve_multiplier(self, Gn, W, Y, aux, solver, config):
        if solver in ("dual_ascent", "online"):
            steps = 1 if solver == "online" else config.inner_steps
            return solvers.dual_ascent(self, Gn, W, Y, None, steps, config)
        if solver == "fixed_point":
            raise ValueError(
                f"{self} has no fixed-point solver; use one of "
                f"{tuple(s for s in SOLVERS if s != 'fixed_point')}"
            )
        # "exact": the certified solve (Manifold.solve) continues from here.
        return self.solver_msign(Gn + self.adjoint(W, Y), config), Y

    def retract(self, W, aux=None):
        X = working(W)
        Xm = X if X.ndim >= 2 else X.reshape(1, -1)
        n = self._norms(Xm)
        out = self.radius * Xm / jnp.where(n > 0, n, 1.0)
        return out.reshape(jnp.shape(W)).astype(jnp.result_type(W))

    def check_point(self, W, path: str) -> None:
        """ValueError naming ``path`` if a column (row) of a concrete ``W`` is zero."""
        if isinstance(W, jax.core.Tracer):
            return
        Wm = W if jnp.ndim(W) >= 2 else jnp.reshape(W, (1, -1))
        if bool(jnp.any(self._norms(working(Wm)) == 0)):
            what = "column" if self.axis == -2 else "row"
            raise ValueError(
                f"parameter {path!r} has a zero {what}: {type(self).__name__}(axis="
                f"{self.axis}) cannot put it at norm {self.radius} (no direction is defined)"
            )

    def distance(self, W):
        X = working(W)
        Xm = X if X.ndim >= 2 else X.reshape(1, -1)
        return jnp.max(jnp.abs(self._norms(Xm) - self.radius)) / self.radius
