"""orthogonalize / scale_by_shape / the modular step / momentum."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import manifold_optax as mo


def test_orthogonalize_matrices_and_batches(rng):
    tree = {
        "dense": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
        "stack": jnp.asarray(rng.standard_normal((3, 8, 16)), jnp.float32),
        "other": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
    }
    tx = mo.orthogonalize(ns_steps=8)
    out, _ = tx.update(tree, tx.init(tree))
    np.testing.assert_allclose(out["dense"], mo.msign_svd(tree["dense"]), atol=1e-4)
    for i in range(3):
        np.testing.assert_allclose(out["stack"][i], mo.msign_svd(tree["stack"][i]), atol=1e-4)
    # Grouped (one batched msign per shape) equals per-leaf.
    ungrouped, _ = mo.orthogonalize(ns_steps=8, group=False).update(tree, optax.EmptyState())
    for k in tree:
        np.testing.assert_allclose(out[k], ungrouped[k], atol=2e-5)


@pytest.mark.slow
def test_cpu_grouping_rule_runs_large_matrices_one_at_a_time(rng, monkeypatch):
    # group=None on CPU: matrices with a short side ≥ 128 run one at a time (no stacking, a
    # stack of their own unrolled, a long one looped), smaller same-shape ones are stacked;
    # every rule gives the batched result up to float32 round-off.
    from manifold_optax import _matrix

    monkeypatch.setattr(_matrix, "CPU_PER_MATRIX_MIN_SIDE", 16)  # small sizes, same rule
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    tree = {"a": f32(24, 16), "b": f32(24, 16), "stack": f32(3, 16, 24), "long": f32(34, 16, 16)}
    tree |= {"s1": f32(8, 12), "s2": f32(8, 12)}
    tx = mo.orthogonalize(ns_steps=8)
    out, _ = jax.jit(lambda t: tx.update(t, optax.EmptyState()))(tree)
    stacked, _ = mo.orthogonalize(ns_steps=8, group=True).update(tree, optax.EmptyState())
    for k in tree:
        np.testing.assert_allclose(out[k], stacked[k], atol=2e-5)
    jaxpr = str(jax.make_jaxpr(lambda t: tx.update(t, optax.EmptyState())[0])(tree))
    cpu = jax.default_backend() == "cpu"
    # Only the two small 8×12 leaves are concatenated on CPU; everything same-shape elsewhere.
    concats = jaxpr.count("concatenate[")
    assert concats == (1 if cpu else 2), concats
    assert ("scan[" in jaxpr) == cpu  # the 34-matrix stack is looped (lax.map)


def test_orthogonalize_conv_kernel_spec(rng):
    # A conv kernel (h, w, in, out): reduction = (0, 1, 2), output = 3.
    k = jnp.asarray(rng.standard_normal((3, 3, 4, 8)), jnp.float32)
    spec = mo.MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)
    out, _ = mo.orthogonalize(8, weight_dimension_numbers=spec).update(k, optax.EmptyState())
    flat = np.asarray(out).reshape(36, 8)
    np.testing.assert_allclose(flat.T @ flat, np.eye(8), atol=1e-4)


def test_orthogonalize_rejects_vectors_with_their_path():
    tree = {"layer": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}
    with pytest.raises(ValueError, match="layer/bias"):
        mo.orthogonalize().update(tree, optax.EmptyState())
    spec = {"layer": {"kernel": mo.MuonDimensionNumbers(), "bias": mo.MuonDimensionNumbers()}}
    with pytest.raises(ValueError, match="layer/bias"):
        mo.orthogonalize(weight_dimension_numbers=spec).update(tree, optax.EmptyState())
    # None in the spec tree leaves the leaf alone.
    spec = {"layer": {"kernel": mo.MuonDimensionNumbers(), "bias": None}}
    out, _ = mo.orthogonalize(weight_dimension_numbers=spec).update(tree, optax.EmptyState())
    np.testing.assert_array_equal(out["layer"]["bias"], tree["layer"]["bias"])


def test_scale_by_shape():
    tree = {"a": jnp.ones((4, 16)), "b": jnp.ones((16, 4))}
    out, _ = mo.scale_by_shape().update(tree, optax.EmptyState())
    np.testing.assert_allclose(out["a"], 2.0)  # √(16/4)
    np.testing.assert_allclose(out["b"], 1.0)
    out, _ = mo.scale_by_shape(consistent_rms=0.2).update(tree, optax.EmptyState())
    np.testing.assert_allclose(out["a"], 0.8)


def _model(G, dW, lam, norms, scales):
    lin = sum(float(jnp.vdot(g, d)) for g, d in zip(G, dW, strict=True))
    m = max(
        s**2 * float(mo.primal_norm(n, d)) ** 2 for d, n, s in zip(dW, norms, scales, strict=True)
    )
    return lin + 0.5 * lam * m


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), lam=st.floats(0.3, 3.0))
def test_modular_step_minimizes_the_model(seed, lam):
    rng = np.random.default_rng(seed)
    shapes = [(8, 6), (6, 10), (10,)]
    norms = ["spectral", "rms", "frobenius"]
    scales = [1.0, float(rng.uniform(0.5, 2)), float(rng.uniform(0.5, 2))]
    G = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    tx = optax.chain(
        mo.scale_by_modular_norm(norms=list(norms), scales=list(scales), ns_steps=10),
        optax.scale_by_learning_rate(1.0 / lam),
    )
    dW, _ = tx.update(list(G), tx.init(list(G)))
    best = _model(G, dW, lam, norms, scales)
    # The closed form: −(1/(2λ))·η² with η = Σ‖G_k‖†/s_k.
    eta = sum(float(mo.dual_norm(n, g)) / s for g, n, s in zip(G, norms, scales, strict=True))
    np.testing.assert_allclose(best, -(eta**2) / (2 * lam), rtol=1e-4)
    for _ in range(30):
        mult = rng.uniform(0.5, 1.5, size=3)
        cand = [
            d * m
            + 0.05 * float(jnp.linalg.norm(d)) * rng.standard_normal(d.shape) / np.sqrt(d.size)
            for d, m in zip(dW, mult, strict=True)
        ]
        cand = [jnp.asarray(c, jnp.float32) for c in cand]
        assert _model(G, cand, lam, norms, scales) >= best - 1e-4 * abs(best)


def test_momentum_matches_formula():
    beta = 0.9
    tx = mo.momentum(beta, nesterov=False, bias_correction=False)
    s = tx.init(jnp.zeros(3))
    g1, g2 = jnp.ones(3), 2 * jnp.ones(3)
    u1, s = tx.update(g1, s)
    u2, s = tx.update(g2, s)
    np.testing.assert_allclose(u2, beta * (1 - beta) * 1 + (1 - beta) * 2, rtol=1e-6)
    tx = mo.momentum(beta, nesterov=True, bias_correction=True, mu_dtype=jnp.bfloat16)
    s = tx.init(jnp.zeros(3))
    u, s = tx.update(g1, s)
    assert s.mu.dtype == jnp.bfloat16 and u.dtype == jnp.float32
    # Bias-corrected Nesterov on a constant gradient returns that gradient at step 1:
    # β·(1−β)g/(1−β²) + (1−β)g/(1−β) = g·(β/(1+β) + 1).
    np.testing.assert_allclose(u, beta / (1 + beta) + 1, rtol=1e-6)
    jax.jit(tx.update)(g1, s)
