"""The oblique manifold, columns and rows: its adjoint, the certified exact direction on tall,
wide and square matrices, the online multiplier, training with the columns kept at their
radius, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from manifold_harness import LAST_TWO

import manifold_optax as mo

AXES = [-2, -1]


def _point(m, shape, rng, dtype=jnp.float32):
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    return mo.project_params(x, m, weight_dimension_numbers=LAST_TWO)


@pytest.mark.parametrize("axis", AXES)
def test_adjoint_and_tangent_projection(axis, rng):
    m = mo.Oblique(2.0, axis=axis)
    W = _point(m, (7, 5), rng)
    Phi = jnp.asarray(rng.standard_normal((7, 5)), jnp.float32)
    lam = jnp.asarray(rng.standard_normal(m.multiplier_shape((7, 5))), jnp.float32)
    np.testing.assert_allclose(
        float(jnp.vdot(lam, m.constraint(W, Phi))),
        float(jnp.vdot(m.adjoint(W, lam), Phi)),
        rtol=1e-5,
    )
    P = m.project_tangent(W, Phi)
    norms = jnp.linalg.norm(W, axis=axis)
    np.testing.assert_allclose(norms, 2.0, rtol=1e-6)
    assert float(jnp.max(jnp.abs(jnp.sum(W * P, axis=axis)))) <= 1e-5


def _nuclear(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False).sum()


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("dtype", ["float64", pytest.param("float32", marks=pytest.mark.slow)])
def test_exact_direction_is_certified(axis, dtype, rng):
    # Tall, wide and square (square oblique duals are degenerate), one with a strong normal
    # component on one column: a feasible Φ (‖Φ‖₂ ≤ 1, tangent) within the relative gap of
    # the float64 dual value at the returned multiplier, recomputed here.
    m = mo.Oblique(axis=axis)
    gap_tol = 1e-6 if dtype == "float64" else 2e-3
    with jax.enable_x64(True):
        for shape, normal in [((48, 24), 0.0), ((24, 48), 0.0), ((16, 16), 0.0), ((48, 24), 30.0)]:
            W = _point(m, shape, rng, jnp.dtype(dtype))
            G = np.asarray(rng.standard_normal(shape))
            if normal:
                G[:, 0] += normal * np.asarray(W, np.float64)[:, 0] * np.linalg.norm(G)
            sol = jax.jit(lambda G, W: m.solve(G, W, "exact"))(jnp.asarray(G, dtype), W)
            Phi = np.asarray(sol.direction, np.float64)
            W64, G64 = np.asarray(W, np.float64), np.asarray(G, np.float64)
            scale = np.linalg.norm(G64) / np.sqrt(min(shape))
            lam = np.asarray(sol.multiplier, np.float64)
            Wu = W64 / np.linalg.norm(W64, axis=axis, keepdims=True)
            adj = Wu * (lam[None, :] if axis == -2 else lam[:, None])
            U = _nuclear(G64 / scale + adj)
            L = np.sum(G64 * Phi) / scale
            assert (U - L) / U <= gap_tol, (shape, (U - L) / U)
            assert np.linalg.svd(Phi, compute_uv=False)[0] <= 1 + 1e-5
            c = np.sum(W64 * Phi, axis=axis)
            assert np.max(np.abs(c)) <= (1e-9 if dtype == "float64" else 1e-5), shape


@pytest.mark.parametrize("axis", [-2, pytest.param(-1, marks=pytest.mark.slow)])
def test_online_multiplier_converges_with_fixed_w_and_g(axis, rng):
    m = mo.Oblique(axis=axis)
    W = _point(m, (40, 24), rng)
    G = jnp.asarray(rng.standard_normal((40, 24)), jnp.float32)
    tx = mo.dual_ascent(m, "online", ns_steps=10)
    state = tx.init(W)

    @jax.jit
    def run(state):
        def body(_, s):
            return tx.update(G, s, W)[1]

        return jax.lax.fori_loop(0, 300, body, state)

    state = run(state)
    phi, _ = tx.update(G, state, W)
    assert float(m.tangent_violation(W, phi)) <= 2e-3
    exact = m.solve(G, W, "exact").direction
    value = lambda p: float(jnp.vdot(G, p / max(1.0, float(jnp.linalg.norm(p, 2)))))
    assert value(phi) >= (1 - 2e-3) * value(exact)


@pytest.mark.parametrize("axis", AXES)
def test_training_keeps_columns_at_the_radius(axis, rng):
    m = mo.Oblique(1.5, axis=axis)
    x = jnp.asarray(rng.standard_normal((128, 24)), jnp.float32)
    y = jnp.tanh(x @ jnp.asarray(rng.standard_normal((24, 3)), jnp.float32))
    params = mo.project_params({"w": jnp.asarray(rng.standard_normal((24, 3)))}, m)
    tx = mo.manifold_muon(0.02, m)
    state = tx.init(params)
    loss = lambda p: jnp.mean((jnp.tanh(x @ p["w"]) - y) ** 2)

    @jax.jit
    def run(p, s):
        def body(_, c):
            p, s = c
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, u), s

        return jax.lax.fori_loop(0, 1000, body, (p, s))

    first = float(loss(params))
    params, state = run(params, state)
    norms = jnp.linalg.norm(params["w"], axis=axis)
    assert float(jnp.max(jnp.abs(norms - 1.5))) <= 1e-5 * 1.5
    assert float(loss(params)) < 0.5 * first


def test_bad_input_names_the_path():
    with pytest.raises(ValueError, match=r"'w'.*zero column"):
        mo.project_params({"w": jnp.zeros((3, 2)).at[0, 0].set(1.0)}, mo.Oblique())
    with pytest.raises(ValueError, match=r"'b'.*matrix"):
        mo.project_params({"b": jnp.ones(3)}, {"b": mo.Oblique()})
    v = mo.project_params({"b": jnp.arange(1.0, 4.0)}, {"b": mo.Oblique(axis=-1)})["b"]
    np.testing.assert_allclose(float(jnp.linalg.norm(v)), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="no fixed-point solver"):
        mo.Oblique().solve(jnp.ones((3, 2)), mo.Oblique().project(jnp.eye(3, 2)), "fixed_point")
    with pytest.raises(ValueError, match="axis"):
        mo.Oblique(axis=0)
