"""The exact solver's matrix-free Newton–CG on the smoothed dual (multipliers above
``SolverConfig.smoothing_max_size``): its Hessian-vector products are the derivative of the
smoothed gradient, its conjugate gradients solve, the oblique preconditioner is the Hessian's
diagonal, and the directions it returns are certified by a duality gap recomputed here in
float64 from the direction and multiplier alone — on degenerate duals (nearly square
matrices), rank-deficient gradients, and tall and wide shapes; the dense and matrix-free
Newton agree where both run. The large shapes of the issue run in the slow checks and in
``benchmarks/solver_bench.py --certified``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from manifold_harness import normalized_dual

import manifold_optax as mo
from manifold_optax.manifolds import SolverConfig
from manifold_optax.manifolds.newton_cg import linearized_gradient, pcg

#: Every multiplier takes the matrix-free path.
MATRIX_FREE = SolverConfig(smoothing_max_size=0)
#: Every multiplier takes the dense Newton.
DENSE = SolverConfig(smoothing_max_size=10**9)


def _problem(m, shape, seed, rank=None, dtype=np.float64):
    """A point ``W`` on ``m`` and a gradient (of rank ``rank`` when given), float64 numpy."""
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        W = np.asarray(m.project(jnp.asarray(rng.standard_normal(shape))))
    if rank is None:
        G = rng.standard_normal(shape)
    else:
        G = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
    return G.astype(dtype), W.astype(dtype)


def _residual64(m, W, Phi):
    """The constraint ``C_W(Φ)`` in float64, written out per manifold."""
    W, Phi = np.asarray(W, np.float64), np.asarray(Phi, np.float64)
    if isinstance(m, mo.Stiefel):
        C = W.T @ Phi if W.shape[0] > W.shape[1] else W @ Phi.T
        return (C + C.T) / 2
    Wu = W / np.linalg.norm(W, axis=m.axis, keepdims=True)
    return np.sum(Wu * Phi, axis=m.axis)


def _gap64(m, G, W, Phi, Y):
    """``(relative gap, σ₁(Φ) − 1, relative tangent violation)`` in float64 from a solve's
    output: ``L = ⟨Ĝ, Φ⟩`` against ``U = ‖Ĝ + C_W*(Y)‖_*``."""
    G64, P64 = np.asarray(G, np.float64), np.asarray(Phi, np.float64)
    U = normalized_dual(m, G, W, Y, None)
    L = np.sum(G64 * P64) / (np.linalg.norm(G64) / np.sqrt(min(G64.shape)))
    s1 = np.linalg.svd(P64, compute_uv=False)[0]
    tv = np.linalg.norm(_residual64(m, W, P64)) / np.linalg.norm(P64)
    return (U - L) / U, s1 - 1.0, tv


@functools.cache
def _solver(m, config):
    return jax.jit(lambda G, W: m.solve(G, W, "exact", config=config))


def _solve(m, G, W, config):
    return _solver(m, config)(G, W)


def _check(m, problems, dtype, gap_tol, config=MATRIX_FREE):
    """Each problem (one shape, stacked) certified within ``gap_tol`` by the float64 recount,
    feasible, and reported as the library's own certificate."""
    G = jnp.asarray(np.stack([g for g, _ in problems]), dtype)
    W = jnp.asarray(np.stack([w for _, w in problems]), dtype)
    sol = _solve(m, G, W, config)
    eps = float(jnp.finfo(dtype).eps)
    out = []
    for i, (g, w) in enumerate(problems):
        gap, over, tv = _gap64(m, g, w, sol.direction[i], sol.multiplier[i])
        assert gap <= gap_tol, (i, gap)
        assert gap >= -256 * eps, (i, gap)  # weak duality, to the float32/64 recount
        assert over <= 64 * eps, (i, over)
        assert tv <= 64 * eps * np.sqrt(g.size), (i, tv)
        assert abs(float(sol.info.duality_gap[i]) - gap) <= 256 * eps, (i, gap)
        assert bool(sol.info.converged[i]), i
        out.append(float(np.sum(np.asarray(g, np.float64) * np.asarray(sol.direction[i]))))
    return np.asarray(out), sol


# --- the pieces --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m,shape",
    [(mo.Stiefel(), (24, 10)), (mo.Stiefel(), (10, 24)), (mo.Oblique(), (24, 10)),
     (mo.Oblique(axis=-1), (10, 24))],
    ids=["stiefel-tall", "stiefel-wide", "oblique-cols", "oblique-rows"],
)  # fmt: skip
def test_hessian_vector_product_is_the_derivative_of_the_gradient(m, shape):
    # The product CG runs on against central differences of the smoothed gradient, the SVD
    # recomputed at each point (float64: truncation h² ≈ 1e-10 and round-off ε/h ≈ 1e-11 of
    # the gradient's scale), at a small μ where the spectrum straddles it; and the Hessian is
    # self-adjoint. A wrong sign or a dropped term of the polar factor's derivative fails.
    with jax.enable_x64(True):
        G, W = (jnp.asarray(x) for x in _problem(m, shape, seed=3, rank=min(shape) - 2))
        Y = m.initial_multiplier(G, W, None)
        mu = jnp.asarray(0.05)

        def svd(Y):
            U, s, Vt = jnp.linalg.svd(G + m.adjoint(W, Y), full_matrices=False)
            return U, s, Vt.T

        def grad(Y, mu):
            return linearized_gradient(m, G, W, None, Y, svd(Y), mu)[0]

        _, lin, _ = linearized_gradient(m, G, W, None, Y, svd(Y), mu)
        rng = np.random.default_rng(0)
        sym = (lambda a: (a + a.T) / 2) if isinstance(m, mo.Stiefel) else (lambda a: a)
        D1, D2 = (sym(jnp.asarray(rng.standard_normal(Y.shape))) for _ in range(2))
        h = 1e-5
        fd = (grad(Y + h * D1, mu) - grad(Y - h * D1, mu)) / (2 * h)
        hv = lin(D1, 0.0)
        assert float(jnp.max(jnp.abs(hv - fd))) <= 1e-7 * float(jnp.max(jnp.abs(fd)))
        assert float(jnp.sum(D1 * hv)) > 0  # convex
        lhs, rhs = float(jnp.sum(D2 * hv)), float(jnp.sum(D1 * lin(D2, 0.0)))
        assert abs(lhs - rhs) <= 1e-12 * abs(lhs) + 1e-14
        # The derivative in μ (the continuation's predictor).
        fd_mu = (grad(Y, mu + h) - grad(Y, mu - h)) / (2 * h)
        dmu = lin(jnp.zeros_like(Y), 1.0)
        assert float(jnp.max(jnp.abs(dmu - fd_mu))) <= 1e-7 * float(jnp.max(jnp.abs(fd_mu)))


def test_conjugate_gradients_solve_to_their_tolerance():
    # An SPD system of condition 1e3 in 40 unknowns: CG (exact in 40 products in exact
    # arithmetic; float64 round-off delays it) reaches a 1e-10 residual within 3×40; a
    # dropped term of the search direction's update (steepest descent) needs
    # ~κ·ln(1/tol) ≈ 2e4 products and fails. The Jacobi
    # preconditioner solves a diagonal system in one product.
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        Q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
        A = jnp.asarray(Q @ np.diag(np.geomspace(1.0, 1e3, 40)) @ Q.T)
        b = jnp.asarray(rng.standard_normal(40))
        x, k = pcg(lambda v: A @ v, b, lambda r: r, 1e-10, 120)
        assert float(jnp.linalg.norm(A @ x - b)) <= 1e-10 * float(jnp.linalg.norm(b))
        d = jnp.asarray(np.geomspace(1.0, 1e6, 40))
        x, k = pcg(lambda v: d * v, b, lambda r: r / d, 1e-12, 80)
        assert int(k) == 1 and float(jnp.max(jnp.abs(d * x - b))) <= 1e-12 * 1e3
        # A singular PSD system with b in its range: the residual still closes.
        P = jnp.asarray(Q[:, :30] @ np.diag(np.geomspace(1.0, 1e2, 30)) @ Q[:, :30].T)
        b = P @ jnp.asarray(rng.standard_normal(40))
        x, _ = pcg(lambda v: P @ v, b, lambda r: r, 1e-10, 80)
        assert float(jnp.linalg.norm(P @ x - b)) <= 1e-9 * float(jnp.linalg.norm(b))


@pytest.mark.parametrize(
    "m,shape", [(mo.Oblique(), (20, 8)), (mo.Oblique(axis=-1), (20, 8))], ids=["cols", "rows"]
)
def test_oblique_preconditioner_is_the_hessian_diagonal(m, shape):
    # The closed form against the diagonal of the Hessian assembled from one product per
    # multiplier entry (float64: both are sums of O(m) terms of size 1/μ).
    with jax.enable_x64(True):
        G, W = (jnp.asarray(x) for x in _problem(m, shape, seed=1))
        Y = m.initial_multiplier(G, W, None)
        mu = jnp.asarray(0.03)
        U, s, Vt = jnp.linalg.svd(G + m.adjoint(W, Y), full_matrices=False)
        _, lin, _ = linearized_gradient(m, G, W, None, Y, (U, s, Vt.T), mu)
        H = jax.vmap(lambda e: lin(e, 0.0))(jnp.eye(Y.size))
        diag = 1.0 / m.dual_preconditioner(W, None, U, s, Vt.T, mu)(jnp.ones_like(Y))
        assert np.allclose(np.diag(H), diag, rtol=1e-10, atol=0)


# --- certified solves on the matrix-free path --------------------------------------------


def _stiefel_problems(shape):
    """Two problems of one shape: a random gradient and one of rank 5."""
    return [_problem(mo.Stiefel(), shape, seed=s, rank=r) for s, r in [(0, None), (1, 5)]]


def test_stiefel_degenerate_duals_certified_matrix_free():
    # Nearly square (n = m + 1, whose dual minimizers are rank-deficient; the fixed point's
    # projected msign is ~8% short there), tall and wide, with a full-rank and a
    # rank-deficient gradient: float64 to the default 1e-6 from the float64 recount.
    with jax.enable_x64(True):
        for shape in [(15, 14), (14, 15)]:
            _check(mo.Stiefel(), _stiefel_problems(shape), jnp.float64, 1e-6)


def test_oblique_certified_matrix_free():
    # The oblique dual has no fixed point: the solve starts at the projection's multiplier
    # and Newton–CG carries it. float64 to 1e-6 (a random and a rank-deficient gradient);
    # float32 to 2e-3 on square problems, whose duals are degenerate (the float32 SVDs of
    # the certificate are accurate to some hundred ε relative, ~1e-5, well inside).
    ob = mo.Oblique()
    with jax.enable_x64(True):
        probs = [_problem(ob, (96, 24), seed=s, rank=r) for s, r in [(0, None), (1, 6)]]
        _check(ob, probs, jnp.float64, 1e-6)
        probs = [_problem(ob, (24, 24), seed=s, dtype=np.float32) for s in range(2)]
        _check(ob, probs, jnp.float32, 2e-3, SolverConfig(smoothing_max_size=0, gap_tol=2e-3))


def test_dense_and_matrix_free_newton_agree():
    # Where both run, the two Newton solves certify the same optimum: values within the sum
    # of their gaps (relative to the dual value, ~ the value itself).
    with jax.enable_x64(True):
        probs = _stiefel_problems((15, 14))
        free, _ = _check(mo.Stiefel(), probs, jnp.float64, 1e-6, MATRIX_FREE)
        dense, _ = _check(mo.Stiefel(), probs, jnp.float64, 1e-6, DENSE)
        assert np.allclose(free, dense, rtol=2e-6, atol=0)


# --- the shapes ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("m", [mo.Stiefel(), mo.Oblique()], ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("shape", [(1024, 256), (256, 1024)], ids=["tall", "wide"])
def test_float32_certified_at_layer_size(m, shape):
    # float32 to 2e-3 at a layer's size (default configuration: the dense cap sends every
    # such multiplier to Newton–CG).
    with jax.enable_x64(True):
        _check(m, [_problem(m, shape, seed=0, dtype=np.float32)], jnp.float32, 2e-3,
               SolverConfig(gap_tol=2e-3))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "m,shape,rank",
    [(mo.Stiefel(), (512, 128), None), (mo.Oblique(), (512, 128), None),
     (mo.Stiefel(), (128, 127), None), (mo.Stiefel(), (128, 124), None),
     (mo.Stiefel(), (256, 64), 16), (mo.Oblique(), (128, 128), None)],
    ids=["stiefel-512x128", "oblique-512x128", "stiefel-n-1", "stiefel-n-4",
         "stiefel-rank16", "oblique-square"],
)  # fmt: skip
def test_float64_certified_at_scale(m, shape, rank):
    with jax.enable_x64(True):
        _check(m, [_problem(m, shape, seed=0, rank=rank)], jnp.float64, 1e-6, SolverConfig())
