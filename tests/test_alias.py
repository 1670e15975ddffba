"""muon and trust_region: parity with optax.contrib.muon, training, and composition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from models import MLP, regression_data, train

import manifold_optax as mo

JORDAN = (3.4445, -4.7750, 2.0315)


def _grad_stream(params, steps, seed=0):
    leaves, treedef = jax.tree.flatten(params)
    key = jax.random.PRNGKey(seed)
    for t in range(steps):
        k = jax.random.fold_in(key, t)
        yield jax.tree.unflatten(
            treedef,
            [jax.random.normal(jax.random.fold_in(k, i), l.shape) for i, l in enumerate(leaves)],
        )


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_parity_with_optax_contrib_muon(weight_decay):
    model = MLP(rngs=nnx.Rngs(0))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    ours = mo.muon(
        0.02, ns_coeffs=JORDAN, ns_steps=5, normalization="frobenius", weight_decay=weight_decay
    )
    theirs = optax.contrib.muon(0.02, weight_decay=weight_decay)
    so, st = ours.init(params), theirs.init(params)
    upd_o, upd_t = jax.jit(ours.update), jax.jit(theirs.update)
    for g in _grad_stream(params, 10):
        uo, so = upd_o(g, so, params)
        ut, st = upd_t(g, st, params)
        for a, b in zip(jax.tree.leaves(uo), jax.tree.leaves(ut), strict=True):
            # NS in float32 amplifies round-off a little: 5 steps × 20 ε relative (the two
            # compile their products and fusions differently).
            tol = 5 * 20 * float(jnp.finfo(jnp.float32).eps)
            assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) <= tol
        params = optax.apply_updates(params, ut)


def test_muon_labels_and_fallback_patterns():
    model = MLP(rngs=nnx.Rngs(0))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    labels = mo.label_params(params, fallback_patterns=("layers/2",))
    assert labels["layers"][0]["kernel"] == "matrix"
    assert labels["layers"][0]["bias"] == "fallback"
    assert labels["layers"][2]["kernel"] == "fallback"
    # The same labels on the Variable-holding state nnx.Optimizer gives tx.init.
    labels_v = mo.label_params(nnx.state(model, nnx.Param), fallback_patterns=("layers/2",))
    assert jax.tree.leaves(labels_v) == jax.tree.leaves(labels)


def test_muon_trains_under_nnx_jit():
    x, y = regression_data()
    losses = train(MLP(rngs=nnx.Rngs(0)), mo.muon(0.02, adam_learning_rate=3e-3), x, y)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("norm", mo.NORMS)
def test_trust_region_trains_for_each_norm(norm):
    x, y = regression_data()
    lr = {"sign": 3e-3, "frobenius": 0.1, "row": 0.01, "column": 0.01}.get(norm, 0.02)
    losses = train(MLP(rngs=nnx.Rngs(0)), mo.trust_region(lr, norm, beta=0.9), x, y)
    assert losses[-1] < 0.7 * losses[0], (norm, losses[0], losses[-1])


def test_trust_region_radius_is_decoupled_weight_decay():
    w = {"w": jnp.eye(3) * 2.0}
    g = {"w": jnp.zeros((3, 3)).at[0, 1].set(1.0)}
    tx = mo.trust_region(0.1, "spectral", beta=0.0, radius=4.0, ns_steps=8)
    u, _ = tx.update(g, tx.init(w), w)
    expected = -0.1 * (np.asarray(mo.msign_svd(g["w"])) + w["w"] / 4.0)
    np.testing.assert_allclose(u["w"], expected, atol=1e-5)


def test_composition_inject_hyperparams_no_retrace():
    model = MLP(rngs=nnx.Rngs(0))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    tx = optax.inject_hyperparams(mo.muon)(learning_rate=0.02)
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(p, s, g):
        traces.append(1)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for i, g in enumerate(_grad_stream(params, 4)):
        state.hyperparams["learning_rate"] = jnp.asarray(0.02 / (i + 1))
        params, state = step(params, state, g)
    assert len(traces) == 1


def test_multisteps_and_apply_if_finite():
    model = MLP(rngs=nnx.Rngs(0))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    tx = optax.MultiSteps(mo.muon(0.02), every_k_schedule=2)
    s = tx.init(params)
    grads = list(_grad_stream(params, 2))
    u1, s = tx.update(grads[0], s, params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(u1))
    u2, s = tx.update(grads[1], s, params)
    assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(u2))

    tx = optax.apply_if_finite(mo.muon(0.02), max_consecutive_errors=3)
    s0 = tx.init(params)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads[0])
    u, s1 = jax.jit(tx.update)(bad, s0, params)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
    for a, b in zip(jax.tree.leaves(s1.inner_state), jax.tree.leaves(s0.inner_state), strict=True):
        np.testing.assert_array_equal(a, b)
    u, s2 = jax.jit(tx.update)(grads[0], s1, params)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(u))
    assert int(s2.notfinite_count) == 0
