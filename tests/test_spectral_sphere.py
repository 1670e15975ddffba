"""The spectral sphere: tangency to the true top pair, the retraction's accuracy against its
filter degree, the rank-one dual step, and batched groups on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from manifold_harness import point

import manifold_optax as mo


def test_exact_spectral_direction_is_tangent_to_the_true_top_pair():
    # Found by test_fuzz_retract_and_direction: on this 8×8 point (σ₁ = 1.5, σ₂ = 1.02) the
    # exact solver's cold-started Θ ended on two power steps after its last QR, whose nearly
    # rank-one block the shifted-Cholesky Rayleigh–Ritz could not resolve: Θ off by 1.6e-4
    # and Φ off-tangent by 1.06e-4 against the float64 SVD's u₁v₁ᵀ. Ending on the QR: 1.9e-8.
    m = mo.SpectralSphere(1.5)
    rng = np.random.default_rng(205)
    a = rng.standard_normal((8, 8)) @ rng.standard_normal((8, 8))
    W = mo.project_params(jnp.asarray(a / np.abs(a).max(), jnp.float32), m)
    G = jnp.asarray(rng.standard_normal((8, 8)), jnp.float32)
    phi = np.asarray(m.steepest_direction(G, W, "exact"), np.float64)
    u, s, vt = np.linalg.svd(np.asarray(W, np.float64))
    assert s[0] - s[1] > 0.4  # a simple, well-separated top singular value: Θ is defined
    theta = np.outer(u[:, 0], vt[0])
    # float32: the projection leaves ~1e-7 of Φ's scale along Θ.
    assert abs(np.sum(theta * phi)) / np.linalg.norm(phi) <= 1e-6


@pytest.mark.slow
def test_manifold_muon_power_iters_sets_the_spectral_retractions_accuracy():
    # A flat top spectrum (48 singular values within 2% of the top one, more than the 32-vector
    # block holds): the warm block's filter degree decides how well the retraction's Ritz value
    # tracks ‖V‖₂. manifold_muon must hand power_iters to its step (the same update as the
    # explicit momentum → manifold_step chain with that degree), and the degree must matter:
    # with degree 6 the worst |‖W‖₂ − 1| over 10 steps stays below 5e-4 (the Chebyshev filter
    # resolves a 2% cluster), with degree 1 it does not, and neither do 6 plain power steps
    # (SpectralSphere(chebyshev=False): the same products, contracting the cluster's
    # components only by 0.98¹² ≈ 0.8).
    rng = np.random.default_rng(0)
    n = 96
    U = np.linalg.qr(rng.standard_normal((n, n)))[0]
    V = np.linalg.qr(rng.standard_normal((n, n)))[0]
    s = np.concatenate([1 - 0.02 * rng.random(48), 0.5 * rng.random(n - 48)])
    s[0] = 1.0
    m = mo.SpectralSphere(1.0)
    params = {"w": jnp.asarray((U * s) @ V.T, jnp.float32)}
    grads = [{"w": jnp.asarray(rng.standard_normal((n, n)), jnp.float32)} for _ in range(10)]

    def worst_violation(tx):
        p, st, worst, updates = params, tx.init(params), 0.0, []
        for g in grads:
            u, st = jax.jit(tx.update)(g, st, p)
            p = optax.apply_updates(p, u)
            updates.append(u["w"])
            sigma = np.linalg.svd(np.asarray(p["w"], np.float64), compute_uv=False)[0]
            worst = max(worst, abs(sigma - 1.0))
        return worst, updates

    worst6, _ = worst_violation(mo.manifold_muon(0.05, m, power_iters=6))
    worst1, alias1 = worst_violation(mo.manifold_muon(0.05, m, power_iters=1))
    power = mo.SpectralSphere(1.0, chebyshev=False)
    worst_power6, _ = worst_violation(mo.manifold_muon(0.05, power, power_iters=6))
    chain = optax.chain(mo.momentum(0.95), mo.manifold_step(m, 0.05, power_iters=1))
    _, chain1 = worst_violation(chain)
    for a, b in zip(alias1, chain1, strict=True):
        np.testing.assert_array_equal(a, b)
    assert worst6 < 5e-4 < min(worst1, worst_power6)


def test_manifold_muon_keeps_a_separated_top_on_the_spectral_sphere():
    # The opposite of a flat top: σ₁ = 3σ₂. The warm block's filter collapses every column
    # onto the top direction, where a Ritz step alone can give σ̂ = 0 and leave V unscaled
    # (0.51 off the sphere within 30 steps; linalg.spectral._checked_power_step has the mechanism).
    # Float32 round-off of a Ritz value leaves a few ε_f32 per step (1e-5 ≈ 80 ε_f32 over
    # 30 steps), far below that failure.
    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.standard_normal((256, 256)))[0]
    V = np.linalg.qr(rng.standard_normal((256, 256)))[0]
    s = np.sort(rng.uniform(0.1, 1.0, 256))[::-1].copy()
    s[0] = 3 * s[1]
    m = mo.SpectralSphere(1.0)
    params = {"w": jnp.asarray((U * (s / s[0])) @ V.T, jnp.float32)}
    tx = mo.manifold_muon(0.02, m)
    state, step = tx.init(params), jax.jit(tx.update)
    worst = 0.0
    for _ in range(30):
        g = {"w": jnp.asarray(rng.standard_normal((256, 256)), jnp.float32)}
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
        worst = max(worst, float(m.distance(params["w"])))
    assert worst < 1e-5, worst


@pytest.mark.parametrize("shape", [(40, 16), (16, 40), (3, 24, 24)])
def test_spectral_sphere_rank_one_dual_step_matches_the_materialized_theta(shape, rng):
    # The online dual step of the spectral sphere never forms Θ = uvᵀ (the rank-one term is
    # inside the msign input, ⟨Θ, Φ⟩ = uᵀΦv). It must be the generic dual step with Θ formed:
    # the same msign input up to round-off, so Φ and Y agree to 1e-5 (float32 products over
    # ≤ 40-long sums, through a 5-step msign whose Lipschitz constant is a few units).
    m = mo.SpectralSphere(2.0)
    W = point(m, shape, rng)
    G = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    Y = jnp.asarray(rng.uniform(-1.0, 1.0, shape[:-2]), jnp.float32)

    @jax.jit
    def both(G, W, Y):
        aux = m.update_aux(W, m.init_aux(W), 40)
        Gn = G / jnp.sqrt(jnp.sum(G * G, axis=(-2, -1), keepdims=True) / min(shape[-2:]))
        fused = m.online_dual_step(G, W, Y, aux, 0.5, mo.msign)
        return fused, mo.Manifold.dual_step(m, Gn, W, Y, m.theta(W, aux), 0.5, mo.msign)

    (phi, y, zero), (phi_ref, y_ref) = both(G, W, Y)
    assert not bool(jnp.any(zero))
    np.testing.assert_allclose(phi, phi_ref, atol=1e-5)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    assert float(jnp.max(jnp.abs(y - Y))) > 1e-3  # the multiplier moved: a real dual step


@pytest.mark.slow
def test_many_batched_spectral_groups_do_not_deadlock():
    """Three same-shape groups of spectral-sphere leaves in one jitted step: batched LAPACK
    calls scheduled concurrently deadlocked XLA's CPU thread pool (linalg.per_matrix)."""
    import subprocess
    import sys

    code = """
import jax, jax.numpy as jnp, optax, manifold_optax as mo
shapes = {"q": (32, 32), "up": (32, 64), "down": (64, 32)}
params = {f"{n}{b}": jax.random.normal(jax.random.PRNGKey(b), s) for n, s in shapes.items()
          for b in range(4)}
m = mo.SpectralSphere(1.0)
params = mo.project_params(params, m)
tx = mo.manifold_muon(0.02, m, group=True)
state = tx.init(params)
step = jax.jit(lambda p, s, g: tx.update(g, s, p))
for _ in range(2):
    u, state = step(params, state, params)
jax.block_until_ready(u)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=150)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]
