"""The shared harness of the manifold tests: the manifolds every contract test runs, points on
them, and float64 references (nuclear norms and the dual bound) computed independently of the
library."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import manifold_optax as mo

#: Every manifold runs through the contract tests (``test_manifold_contract.py``); a new
#: manifold is added here.
MANIFOLDS = [mo.Stiefel(), mo.SpectralSphere(2.0), mo.Sphere(3.0)]

#: The contract's manifolds: ``MANIFOLDS`` in the suite, the oblique manifold (both axes) in
#: the slow checks (``tests/test_oblique.py`` runs its own checks in the suite).
CONTRACT = MANIFOLDS + [
    pytest.param(mo.Oblique(2.0), marks=pytest.mark.slow),
    pytest.param(mo.Oblique(axis=-1), marks=pytest.mark.slow),
]
SHAPES = [(64, 32), (32, 64), (40, 40), (64, 60), (200, 24)]

#: bfloat16's machine epsilon (8-bit significand); its round-to-nearest unit round-off is u/2.
BF16_EPS = 2.0**-8


def manifold_id(m):
    return type(m).__name__ + (f"{m.axis}" if isinstance(m, mo.Oblique) else "")


#: The last two axes are the matrix, leading axes a batch: stated explicitly (without a spec a
#: leaf with more than two axes is ambiguous).
LAST_TWO = mo.MatrixSpec(-2, -1)


def point(m, shape, rng):
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return mo.project_params(x, m, weight_dimension_numbers=LAST_TWO)


def nuclear64(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False).sum()


def dual_bound(m, G, W, Y, aux):
    """‖G + C_W*(Y)‖_* in float64 (Y is in normalized-gradient units: rescale it)."""
    G64 = np.asarray(G, np.float64)
    scale = np.linalg.norm(G64) / np.sqrt(min(G64.shape))
    if isinstance(m, mo.Stiefel):
        W64 = np.asarray(W, np.float64)
        Y64 = np.asarray(Y, np.float64)
        Y64 = (Y64 + Y64.T) / 2
        # Tall: WY (WᵀW = I); wide and square: YW (the row form, WWᵀ = I).
        adj = W64 @ Y64 if W64.shape[0] > W64.shape[1] else Y64 @ W64
    elif isinstance(m, mo.Oblique):
        W64, Y64 = np.asarray(W, np.float64), np.asarray(Y, np.float64)
        Wu = W64 / np.linalg.norm(W64, axis=m.axis, keepdims=True)
        adj = Wu * (Y64[None, :] if m.axis == -2 else Y64[:, None])
    else:
        adj = float(Y) * np.asarray(m.theta(W, aux), np.float64)
    return nuclear64(G64 + scale * adj)


def normalized_dual(m, G, W, Y, aux):
    """The dual objective ``‖Ĝ + C_W*(Y)‖_*`` in float64 (``Ĝ`` the normalized gradient, the
    units the solvers keep ``Y`` in)."""
    G64 = np.asarray(G, np.float64)
    return dual_bound(m, G, W, Y, aux) / (np.linalg.norm(G64) / np.sqrt(min(G64.shape)))


def train(m, solver, steps, rng):
    x = jnp.asarray(rng.standard_normal((128, 24)), jnp.float32)
    t = jnp.tanh(x @ jnp.asarray(rng.standard_normal((24, 12)) / 5, jnp.float32))
    y = t @ jnp.asarray(rng.standard_normal((12, 3)), jnp.float32)
    params = {
        "w1": jnp.asarray(rng.standard_normal((24, 12)), jnp.float32),
        "w2": jnp.asarray(rng.standard_normal((12, 3)), jnp.float32),
        "b": jnp.zeros(3),
    }
    params = mo.project_params(params, m)
    tx = mo.manifold_muon(0.03, m, solver=solver)
    state = tx.init(params)

    def loss(p):
        return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] + p["b"] - y) ** 2)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    losses = []
    for _ in range(steps):
        params, state, value = step(params, state)
        losses.append(float(value))
    return params, losses


def stiefel_problems(count, seed, n_max=16):
    """A seeded search over Stiefel steepest-direction problems: every tall shape ``n×m``
    with ``2 ≤ n ≤ n_max``, ``m < n`` (nearly square ones included), each problem wide (the
    transpose) with probability ½, the gradient scaled by ``10^U(−3, 3)`` and, with
    probability ½, given a strong normal component ``3·W·S`` (``S`` symmetric). Returns
    ``{shape: (G, W)}`` of float64 batches (``W`` on the manifold), ``count`` problems in all.
    """
    rng = np.random.default_rng(seed)
    shapes = [(n, m) for n in range(2, n_max + 1) for m in range(1, n)]
    out = {}
    for k in range(count):
        n, m = shapes[k % len(shapes)]
        W, _ = np.linalg.qr(rng.standard_normal((n, m)))
        G = rng.standard_normal((n, m))
        if rng.random() < 0.5:
            S = rng.standard_normal((m, m))
            G = G + 3.0 * np.linalg.norm(G) / np.sqrt(m) * W @ (S + S.T) / 2
        G = G * 10.0 ** rng.uniform(-3, 3)
        if rng.random() < 0.5:
            W, G = W.T, G.T
        Gs, Ws = out.setdefault(W.shape, ([], []))
        Gs.append(G)
        Ws.append(W)
    return {s: (np.stack(g), np.stack(w)) for s, (g, w) in out.items()}


def certified_gap(m, G, W, Phi, Y):
    """The relative duality gap of one Stiefel solve, recomputed in float64 from its output:
    ``(U − L)/U`` with ``L = ⟨Ĝ, Φ⟩`` and ``U = ‖Ĝ + C_W*(Y)‖_*``; with the feasibility of
    ``Φ`` it certifies (``max(σ₁(Φ) − 1, 0)``, the relative tangent violation)."""
    G64, Phi64 = np.asarray(G, np.float64), np.asarray(Phi, np.float64)
    scale = np.linalg.norm(G64) / np.sqrt(min(G64.shape))
    U = normalized_dual(m, G, W, Y, None)
    L = np.sum(G64 * Phi64) / scale
    s1 = np.linalg.svd(Phi64, compute_uv=False)[0]
    W64 = np.asarray(W, np.float64)
    C = W64.T @ Phi64 if W64.shape[0] > W64.shape[1] else W64 @ Phi64.T
    tv = np.linalg.norm((C + C.T) / 2) / max(np.linalg.norm(Phi64), 1e-300)
    return (U - L) / U, max(s1 - 1.0, 0.0), tv
