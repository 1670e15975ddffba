"""Manifold Muon: optimality of the exact solvers against a float64 SVD certificate, the online
solver, retractions, training on the manifold, the explicit chain, and bad input."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import manifold_optax as mo

MANIFOLDS = [mo.Stiefel(), mo.SpectralSphere(2.0), mo.Sphere(3.0)]
SHAPES = [(64, 32), (32, 64), (40, 40), (64, 60), (200, 24)]


def _point(m, shape, rng):
    return mo.project_params(jnp.asarray(rng.standard_normal(shape), jnp.float32), m)


def _nuclear64(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False).sum()


def _dual_bound(m, G, W, Y, aux):
    """‖G + C_W*(Y)‖_* in float64 (Y is in normalized-gradient units: rescale it)."""
    G64 = np.asarray(G, np.float64)
    scale = np.linalg.norm(G64) / np.sqrt(min(G64.shape))
    if isinstance(m, mo.Stiefel):
        W64 = np.asarray(W, np.float64)
        Y64 = np.asarray(Y, np.float64)
        Y64 = (Y64 + Y64.T) / 2
        # Tall: WY (WᵀW = I); wide and square: YW (the row form, WWᵀ = I).
        adj = W64 @ Y64 if W64.shape[0] > W64.shape[1] else Y64 @ W64
    else:
        adj = float(Y) * np.asarray(m.theta(W, aux), np.float64)
    return _nuclear64(G64 + scale * adj)


@pytest.mark.parametrize("m", MANIFOLDS, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("shape", SHAPES)
def test_exact_direction_is_optimal(m, shape, rng):
    W = _point(m, shape, rng)
    G = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    Phi, Y, aux = jax.jit(lambda G, W: m.solve(G, W, "exact"))(G, W)
    value = float(np.sum(np.asarray(G, np.float64) * np.asarray(Phi, np.float64)))
    bound = _dual_bound(m, G, W, Y, aux)
    # Weak duality: value ≤ OPT ≤ bound for feasible Φ, so a small gap certifies optimality.
    assert abs(bound - value) / bound <= 1e-4
    Phi64 = np.asarray(Phi, np.float64)
    if isinstance(m, mo.Stiefel):
        W64 = np.asarray(W, np.float64)
        Wt, Pt = (W64, Phi64) if shape[0] >= shape[1] else (W64.T, Phi64.T)
        C = Wt.T @ Pt
        tv = np.linalg.norm(C + C.T) / 2 / np.linalg.norm(Phi64)
    else:
        tv = abs(np.sum(np.asarray(m.theta(W, aux), np.float64) * Phi64)) / np.linalg.norm(Phi64)
    assert tv <= 1e-5
    assert np.linalg.svd(Phi64, compute_uv=False)[0] <= 1 + 1e-4


@pytest.mark.parametrize("m", MANIFOLDS, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_solvers_under_x64(m, dtype, rng):
    # With jax_enable_x64 on (a float64 user's setting), the exact solvers run for float32 and
    # float64 parameters and keep their dtype. float32: the gap bound of the float32 test
    # above (1e-4). float64: the iterations stop at their own tolerances (residual RMS
    # tol = 1e-6, a bracket 1e-7 wide), and the gap is first order in the residual,
    # ⟨Y, C_W(Φ)⟩ ≤ ‖Y‖·‖C_W(Φ)‖ with ‖Y‖ = O(√m) in normalized units against a value of
    # O(m): ≤ 10·tol; the final tangent projection is exact to float64 round-off
    # (ε·m ≈ 1e-14 ≪ 1e-10). The spectral sphere's Θ comes from a float32 block iteration,
    # so its float64 results are float32's. (The spheres' "fixed_point" is the same regula
    # falsi as "exact".)
    shape = (24, 12)
    precise = dtype == "float64" and not isinstance(m, mo.SpectralSphere)
    config = mo.manifolds.SolverConfig()
    tol_gap, tol_tangent = (10 * config.tol, 1e-10) if precise else (1e-4, 1e-5)
    solvers = ("exact", "fixed_point") if isinstance(m, mo.Stiefel) else ("exact",)
    with jax.enable_x64(True):
        W = mo.project_params(jnp.asarray(rng.standard_normal(shape), dtype), m)
        G = jnp.asarray(rng.standard_normal(shape), dtype)
        for solver in solvers:
            Phi, Y, aux = jax.jit(lambda G, W, s=solver: m.solve(G, W, s, config=config))(G, W)
            assert Phi.dtype == jnp.dtype(dtype), solver
            value = float(np.sum(np.asarray(G, np.float64) * np.asarray(Phi, np.float64)))
            gap = (_dual_bound(m, G, W, Y, aux) - value) / value
            assert -tol_gap <= gap <= tol_gap, (solver, gap)
            assert float(m.tangent_violation(W, Phi, aux)) <= tol_tangent, solver
        tx = mo.manifold_muon(0.05, m, solver="exact")
        u, _ = jax.jit(tx.update)(G, tx.init(W), W)
        assert u.dtype == jnp.dtype(dtype)
        assert float(m.distance(W + u)) <= 2e-6


def test_square_stiefel_closed_form(rng):
    m = mo.Stiefel()
    W = _point(m, (24, 24), rng)
    G = jnp.asarray(rng.standard_normal((24, 24)), jnp.float32)
    Phi = m.steepest_direction(G, W, "exact")
    WtG = np.asarray(W, np.float64).T @ np.asarray(G, np.float64)
    ref = np.asarray(W, np.float64) @ np.asarray(mo.msign_svd(jnp.asarray((WtG - WtG.T) / 2)))
    np.testing.assert_allclose(Phi, ref, atol=1e-4)


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


def test_fixed_point_is_certified_by_its_own_multiplier(rng):
    # Su's fixed point on a tall, skinny Stiefel problem (where it converges fast): its Φ and
    # its multiplier close the duality gap like the exact solver's (1e-4: float32 products in
    # the final msign and SVD, relative ε·κ with κ ~ 1e2 for a 96×16 Gaussian G + WX).
    m = mo.Stiefel()
    W = _point(m, (96, 16), rng)
    G = jnp.asarray(rng.standard_normal((96, 16)), jnp.float32)
    Phi, Y, aux = jax.jit(lambda G, W: m.solve(G, W, "fixed_point"))(G, W)
    value = float(np.sum(np.asarray(G, np.float64) * np.asarray(Phi, np.float64)))
    assert abs(_dual_bound(m, G, W, Y, aux) - value) / value <= 1e-4
    assert float(m.tangent_violation(W, Phi)) <= 1e-5


def _normalized_dual(m, G, W, Y, aux):
    """The dual objective ``‖Ĝ + C_W*(Y)‖_*`` in float64 (``Ĝ`` the normalized gradient, the
    units the solvers keep ``Y`` in)."""
    G64 = np.asarray(G, np.float64)
    return _dual_bound(m, G, W, Y, aux) / (np.linalg.norm(G64) / np.sqrt(min(G64.shape)))


@pytest.mark.parametrize("m", MANIFOLDS, ids=lambda m: type(m).__name__)
def test_dual_ascent_moves_the_multiplier_towards_the_dual_minimum(m, rng):
    # The "dual_ascent" solver runs k steps Y ← Y − η₂·C_W(Φ) from a warm start Y₀ (here 0:
    # the projection's multiplier, its default start, is near-optimal for the spheres). Its
    # direction is projected onto the tangent space (Stiefel) or rescaled by the retraction
    # (spheres) whatever Y is, so the check is on the multiplier itself: the dual
    # objective D(Y) = ‖Ĝ + C_W*(Y)‖_* (convex, minimized by the exact solver's Y*) must close
    # most of its gap, D(Y_k) − D(Y*) ≤ ½·(D(Y₀) − D(Y*)), and the raw residual
    # C_W(msign(Ĝ + C_W*(Y_k))) must shrink below ½ of Y₀'s. η₂ = 0 leaves both at Y₀, a
    # flipped sign makes both grow. (A 48×16 problem: not square, so Stiefel has no closed
    # form, and no sphere step is trivially tangent.)
    shape = (48, 16)
    W = _point(m, shape, rng)
    R = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    # A strong normal component (W is normal for each manifold, in part for the spectral
    # sphere), so that the multiplier has far to go from Y₀ = 0.
    G = R + 2.0 * jnp.linalg.norm(R) / jnp.linalg.norm(W) * W
    _, y_star, aux = jax.jit(lambda G, W: m.solve(G, W, "exact"))(G, W)
    y_0 = jnp.zeros(m.multiplier_shape(shape))
    _, y_k, _ = jax.jit(lambda G, W, Y: m.solve(G, W, "dual_ascent", Y=Y))(G, W, y_0)
    Gn = G / (jnp.linalg.norm(G) / np.sqrt(min(shape)))
    d_star, d_0, d_k = (_normalized_dual(m, G, W, y, aux) for y in (y_star, y_0, y_k))
    assert d_0 - d_star > 0.05 * d_star, (d_0, d_star)  # Y₀ is far from optimal
    assert d_k - d_star <= 0.5 * (d_0 - d_star), (d_0, d_k, d_star)

    def raw_residual(y):
        raw = mo.msign(Gn + m.adjoint(W, y, m.theta(W, aux)), steps=10)
        return float(m.tangent_violation(W, raw, aux))

    assert raw_residual(y_k) <= 0.5 * raw_residual(y_0), (raw_residual(y_0), raw_residual(y_k))


@pytest.mark.parametrize("m", MANIFOLDS, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("transform", ["dual_ascent", "manifold_step"])
def test_online_multiplier_converges_with_fixed_W_and_G(m, transform, rng):
    # Both online paths: the dual_ascent transform and the fused manifold_step (which has its
    # own multiplier update per manifold); the latter at learning rate 0, so that W stays put
    # (its update R(W) − W is round-off) while the multiplier takes its dual steps.
    shape = (48, 16)
    W = _point(m, shape, rng)
    G = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    tx = mo.dual_ascent(m, "online") if transform == "dual_ascent" else mo.manifold_step(m, 0.0)
    state = tx.init(W)  # default η₂ per manifold
    step = jax.jit(tx.update)
    # Stiefel returns Φ projected onto the tangent space (violation ~1e-7 from step 1); the
    # multiplier converges when the *unprojected* msign(Ĝ + C*(Y)) becomes tangent.
    Gn = G / (jnp.linalg.norm(G) / jnp.sqrt(min(shape)))

    @jax.jit  # (eagerly, the spectral sphere's block iteration took 140 s over the 400 steps)
    def violations(phi, leaf):
        aux = mo.manifolds.Aux(leaf.v)
        raw = mo.msign(Gn + m.adjoint(W, leaf.y, m.theta(W, aux)))
        return m.tangent_violation(W, phi, aux), m.tangent_violation(W, raw, aux)

    viol = []
    for _ in range(400):
        phi, state = step(G, state, W)
        projected, raw = violations(phi, state.leaves[0])
        if m.project_dual_direction and transform == "dual_ascent":
            assert float(projected) < 1e-5
        viol.append(float(raw))
    first = next(i for i, v in enumerate(viol) if v < 1e-4)
    # 400 steps: dual descent at η₂ (0.5 spheres, 0.1 Stiefel) contracts the residual
    # geometrically; the m(m+1)/2 = 136 Stiefel multipliers need the most steps.
    assert max(viol[first:]) < 1e-4, (first, viol[-1])


@pytest.mark.parametrize("transform", ["dual_ascent", "manifold_step"])
@pytest.mark.parametrize("shape", [(96, 24), (24, 96)])
def test_online_stiefel_multiplier_stays_exactly_symmetric(transform, shape, rng):
    # Stiefel.dual_step reads the state's multiplier without symmetrizing it (that is a
    # transposed pass over every m×m multiplier, slow on XLA:CPU), which is right only while
    # every update keeps it exactly symmetric: bit for bit, step after step, while moving.
    m = mo.Stiefel()
    W = _point(m, shape, rng)
    tx = mo.dual_ascent(m, "online") if transform == "dual_ascent" else mo.manifold_step(m, 0.05)
    state, step = tx.init(W), jax.jit(tx.update)
    for k in range(6):
        G = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        updates, state = step(G, state, W)
        if transform == "manifold_step":
            W = optax.apply_updates(W, updates)
        Y = np.asarray(state.leaves[0].y)
        assert np.array_equal(Y, Y.T), (k, np.abs(Y - Y.T).max())
    assert np.abs(Y).max() > 1e-3  # the multiplier moved


def test_online_stiefel_projects_its_direction_only_when_asked(rng):
    # project_dual_direction (a class attribute) decides whether the online step returns Φ
    # projected onto the tangent space; the first step (Y = 0, Φ = msign(Ĝ)) is far from it.
    class Unprojected(mo.Stiefel):
        project_dual_direction = False

    W = _point(mo.Stiefel(), (64, 16), rng)
    G = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
    violation = {}
    for m in (mo.Stiefel(), Unprojected()):
        tx = mo.dual_ascent(m, "online")
        phi, _ = jax.jit(tx.update)(G, tx.init(W), W)
        violation[m.project_dual_direction] = float(m.tangent_violation(W, phi))
    assert violation[True] < 1e-5 and violation[False] > 1e-2, violation


def _train(m, solver, steps, rng):
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


@pytest.mark.parametrize(
    "m, tol",
    [(mo.Stiefel(), 1e-5), (mo.SpectralSphere(2.0), 1e-5), (mo.Sphere(3.0), 1e-6)],
    ids=["stiefel", "spectral_sphere", "sphere"],
)
def test_training_keeps_params_on_manifold(m, tol, rng):
    params, losses = _train(m, "online", 300, rng)
    assert losses[-1] < 0.8 * losses[0]
    for k in ("w1", "w2"):
        W = np.asarray(params[k], np.float64)
        if isinstance(m, mo.Stiefel):
            Wt = W if W.shape[0] >= W.shape[1] else W.T
            assert np.abs(Wt.T @ Wt - np.eye(Wt.shape[1])).max() <= tol
        elif isinstance(m, mo.SpectralSphere):
            assert abs(np.linalg.svd(W, compute_uv=False)[0] - m.radius) / m.radius <= tol
        else:
            assert abs(np.linalg.norm(W) - m.radius) / m.radius <= tol


@pytest.mark.parametrize(
    "m, atol",
    # Stiefel and sphere: the same operations in the same order. Spectral sphere: the chain's
    # dual step takes Θ from its own 2-iteration block, the fused step from the retraction's
    # top pair (both float32-converged), and the retractions run 6 vs 10 power iterations.
    [(mo.Stiefel(), 1e-6), (mo.Sphere(3.0), 1e-6), (mo.SpectralSphere(2.0), 2e-5)],
    ids=lambda x: type(x).__name__ if isinstance(x, mo.Manifold) else "",
)
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_explicit_chain_equals_manifold_muon(m, atol, dtype, rng):
    # A tall, a wide and a square matrix (square Stiefel takes the closed form in both).
    # bfloat16 compute: Stiefel and sphere still run the same operations (same tolerance);
    # the spectral sphere's Θ differs at ~1e-6, which can flip a bfloat16 rounding of the
    # msign input (a relative 2⁻⁸) and pass through ~10 rounded products: η·2⁻⁸·10 = 2e-3.
    if dtype is not None and isinstance(m, mo.SpectralSphere):
        atol = 2e-3
    params = {
        "w": _point(m, (32, 8), rng),
        "v": _point(m, (8, 16), rng),
        "s": _point(m, (12, 12), rng),
    }
    chain = optax.chain(
        mo.momentum(0.9),
        mo.dual_ascent(m, "online", compute_dtype=dtype),
        optax.scale_by_learning_rate(0.05),
        mo.retract(m),
    )
    alias = mo.manifold_muon(0.05, m, beta=0.9, compute_dtype=dtype)
    sc, sa = chain.init(params), alias.init(params)
    chain_step, alias_step = jax.jit(chain.update), jax.jit(alias.update)
    for _ in range(3):
        g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
        uc, sc = chain_step(g, sc, params)
        ua, sa = alias_step(g, sa, params)
        for a, b in zip(jax.tree.leaves(uc), jax.tree.leaves(ua), strict=True):
            np.testing.assert_allclose(a, b, atol=atol)
        params = optax.apply_updates(params, uc)


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


@pytest.mark.parametrize("transform", ["manifold_step", "chain"])
def test_stiefel_step_falls_back_only_where_one_polish_step_falls_short(transform, rng):
    # The Stiefel step polishes every matrix with one quintic step (no conditional) and runs the
    # full retraction, under one conditional for all leaves, only where that step falls short
    # of float32 accuracy (‖A − I‖_F > 5e-3: here a large step on "big"). "still" has a zero
    # gradient: it must stay where it is; "big" must land on the polar factor of W − ηΦ.
    m = mo.Stiefel()
    params = {"big": _point(m, (48, 24), rng), "still": _point(m, (24, 40), rng)}
    grads = {"big": jnp.asarray(rng.standard_normal((48, 24)), jnp.float32)}
    grads["still"] = jnp.zeros((24, 40), jnp.float32)
    lr = 0.5
    direction = mo.dual_ascent(m, "online")
    phi, _ = direction.update(grads, direction.init(params), params)
    V = {k: params[k] - lr * phi[k] for k in params}
    big, still = m.polish_plan(V["big"]), m.polish_plan(V["still"])
    assert not bool(big[2]) and not bool(big[3]) and bool(still[2]) and bool(still[3])
    if transform == "manifold_step":
        tx = mo.manifold_step(m, lr)
    else:
        tx = optax.chain(
            mo.dual_ascent(m, "online"), optax.scale_by_learning_rate(lr), mo.retract(m)
        )
    upd, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    new = optax.apply_updates(params, upd)
    assert np.abs(np.asarray(upd["still"])).max() <= 1e-6
    u, _, vt = np.linalg.svd(np.asarray(V["big"], np.float64), full_matrices=False)
    np.testing.assert_allclose(new["big"], u @ vt, atol=2e-5)
    for k in new:
        assert float(m.distance(new[k])) < 2e-6, k


def _near_orthonormal(shape, e, rank, rng):
    """``Q·(I + E)`` (tall view) with ``Q`` orthonormal and ``E`` symmetric of the given rank
    with eigenvalues ±e: its normalized Gram deviates from I by about ``2e`` in spectral norm
    and ``2e·√rank`` in Frobenius norm."""
    n, m = max(shape), min(shape)
    Q, _ = np.linalg.qr(rng.standard_normal((n, m)))
    U, _ = np.linalg.qr(rng.standard_normal((m, rank)))
    E = (U * (e * np.sign(rng.standard_normal(rank)))) @ U.T
    V = Q @ (np.eye(m) + E)
    return jnp.asarray(V if shape[0] >= shape[1] else V.T, jnp.float32)


@pytest.mark.parametrize("structure", ["rank_one", "full"])
def test_cubic_polish_certificate_bounds_its_truncation(structure, rng):
    # One cubic step X = V·(3I − A)/(2c) leaves XᵀX − I = −¾D² + ¼D³ (D = A − I). The
    # certificate must accept it only when that is within CUBIC_POLISH_TOLERANCE in spectral
    # norm (checked in float64), and must accept the small deviations of a training step. A
    # rank-one D is the case a Frobenius- or entry-based bound divided by √m would miss.
    from manifold_optax.manifolds import CUBIC_POLISH_TOLERANCE, _polish_certificates

    m = 32
    accepted = []
    for e in [1e-5, 1e-4, 3e-4, 6e-4, 1e-3, 2e-3, 4e-3]:
        U, _ = np.linalg.qr(rng.standard_normal((m, m)))
        lam = np.zeros(m)
        if structure == "rank_one":
            lam[0] = e
        else:
            lam = e * np.sign(rng.standard_normal(m)) * rng.uniform(0.5, 1.0, m)
        A = np.eye(m) + (U * lam) @ U.T
        A = A * m / np.trace(A)  # normalized as polish_plan does (mean eigenvalue 1)
        D = A - np.eye(m)
        truncation = np.linalg.norm(
            A @ (1.5 * np.eye(m) - 0.5 * A) @ (1.5 * np.eye(m) - 0.5 * A) - np.eye(m), 2
        )
        cubic_ok, _ = _polish_certificates(jnp.asarray(A, jnp.float32))
        if bool(cubic_ok):
            accepted.append(e)
            # 1.01: the certificate is computed from the float32 Gram (rounding ~1e-7 of D).
            assert truncation <= 1.01 * CUBIC_POLISH_TOLERANCE, (e, truncation)
        assert bool(cubic_ok) or 0.75 * np.linalg.norm(D, 2) ** 2 > 1e-7, e
    assert 1e-5 in accepted and 3e-4 in accepted  # not vacuous: small deviations pass
    assert 4e-3 not in accepted


def test_stiefel_polish_takes_the_cubic_only_where_it_is_certified(rng):
    # The training retraction polishes every Stiefel matrix with one step: the cubic when it is
    # certified for all of them, else the quintic (its A² costs an m×m×m product), else the full
    # retraction. "small" (deviation 2e-4) certifies the cubic; "medium" (2e-3, rank one) only
    # the quintic, where one cubic step would leave an error of ~1e-5, so the step must take
    # the quintic for every matrix. Each result must be the float64 polar factor of V to 1e-6.
    m = mo.Stiefel()
    shapes = {"tall": (48, 24), "wide": (24, 40), "square": (32, 32)}
    small = {k: _near_orthonormal(s, 1e-4, 24, rng) for k, s in shapes.items()}
    medium = dict(small, tall=_near_orthonormal(shapes["tall"], 1e-3, 1, rng))
    plans = {k: m.polish_plan(V) for k, V in medium.items()}
    assert all(bool(p[2]) for k, p in plans.items() if k != "tall")
    assert not bool(plans["tall"][2]) and bool(plans["tall"][3])
    for Vs in (small, medium):
        W = mo.project_params(Vs, m)
        u, _ = jax.jit(mo.retract(m).update)(
            jax.tree.map(jnp.subtract, Vs, W), mo.retract(m).init(W), W
        )
        new = optax.apply_updates(W, u)
        for k, V in Vs.items():
            a, _, b = np.linalg.svd(np.asarray(V, np.float64), full_matrices=False)
            np.testing.assert_allclose(new[k], a @ b, atol=1e-6, err_msg=k)


def test_online_square_stiefel_is_exactly_tangent_from_the_first_step(rng):
    # The closed form needs no multiplier to converge: tangent at float32 round-off at once,
    # and the same direction as the exact solver (which runs 10 msign steps instead of 5).
    m = mo.Stiefel()
    W = _point(m, (48, 48), rng)
    G = jnp.asarray(rng.standard_normal((48, 48)), jnp.float32)
    tx = mo.dual_ascent(m, "online")
    phi, _ = tx.update(G, tx.init(W), W)
    assert float(m.tangent_violation(W, phi)) < 1e-5
    exact = m.steepest_direction(G, W, "exact")
    cos = float(jnp.vdot(phi, exact) / (jnp.linalg.norm(phi) * jnp.linalg.norm(exact)))
    assert cos > 0.99, cos


def test_manifold_step_follows_a_learning_rate_schedule(rng):
    # η(0) = 0: the first update is R(W) − W = 0 (W is on the manifold); η(1) > 0 moves W.
    m = mo.Stiefel()
    W = _point(m, (32, 8), rng)
    tx = mo.manifold_step(m, optax.linear_schedule(0.0, 0.1, 10))
    s = tx.init(W)
    G = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
    u0, s = tx.update(G, s, W)
    assert float(jnp.max(jnp.abs(u0))) < 1e-6 and int(s.count) == 1
    u1, s = tx.update(G, s, W)
    assert float(jnp.max(jnp.abs(u1))) > 1e-3
    assert float(m.distance(W + u1)) < 1e-5


@pytest.mark.parametrize("m", MANIFOLDS, ids=lambda m: type(m).__name__)
def test_fused_step_with_zero_gradient_stays_and_keeps_the_multiplier(m, rng):
    # The fused online steps fold the zero-gradient guard into the learning rate (no pass
    # over Φ): a zero gradient must leave W where it is (to the retraction's round-off) and
    # the multiplier bit-for-bit, while a nonzero gradient moves both.
    W = _point(m, (48, 16), rng)
    tx = mo.manifold_step(m, 0.1)
    s = tx.init(W)
    G = jnp.asarray(rng.standard_normal(W.shape), jnp.float32)
    u, s = tx.update(G, s, W)  # a nonzero multiplier to keep
    W = optax.apply_updates(W, u)
    y = np.asarray(s.leaves[0].y)
    assert float(np.max(np.abs(y))) > 0
    u, s2 = tx.update(jnp.zeros_like(G), s, W)
    np.testing.assert_array_equal(np.asarray(s2.leaves[0].y), y)
    # 1e-6: a retraction of a point on the manifold moves it by float32 round-off only.
    assert float(jnp.max(jnp.abs(u))) < 1e-6
    u, s3 = tx.update(G, s, W)
    assert float(jnp.max(jnp.abs(u))) > 1e-3
    assert float(np.max(np.abs(np.asarray(s3.leaves[0].y) - y))) > 0


@pytest.mark.parametrize("shape", [(40, 16), (16, 40), (3, 24, 24)])
def test_spectral_sphere_rank_one_dual_step_matches_the_materialized_theta(shape, rng):
    # The online dual step of the spectral sphere never forms Θ = uvᵀ (the rank-one term is
    # inside the msign input, ⟨Θ, Φ⟩ = uᵀΦv). It must be the generic dual step with Θ formed:
    # the same msign input up to round-off, so Φ and Y agree to 1e-5 (float32 products over
    # ≤ 40-long sums, through a 5-step msign whose Lipschitz constant is a few units).
    m = mo.SpectralSphere(2.0)
    W = _point(m, shape, rng)
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


@pytest.mark.parametrize("m", MANIFOLDS, ids=lambda m: type(m).__name__)
def test_online_direction_of_a_zero_gradient_is_zero_and_keeps_the_multiplier(m, rng):
    # dual_ascent's online step: a zero gradient has no steepest direction (Φ = 0, not the
    # msign of the multiplier term alone) and must not move the multiplier.
    W = _point(m, (48, 16), rng)
    tx = mo.dual_ascent(m, "online")
    s = tx.init(W)
    G = jnp.asarray(rng.standard_normal(W.shape), jnp.float32)
    _, s = tx.update(G, s, W)  # a nonzero multiplier to keep
    y = np.asarray(s.leaves[0].y)
    assert float(np.max(np.abs(y))) > 0
    phi, s2 = tx.update(jnp.zeros_like(G), s, W)
    assert float(jnp.max(jnp.abs(phi))) == 0.0
    np.testing.assert_array_equal(np.asarray(s2.leaves[0].y), y)


#: bfloat16's machine epsilon (8-bit significand); its round-to-nearest unit round-off is u/2.
BF16_EPS = 2.0**-8


@pytest.mark.parametrize("m", MANIFOLDS, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_bfloat16_compute_moves_like_float32_and_stays_on_the_manifold(m, shape, rng):
    # compute_dtype=bfloat16 runs the online msign's products in bfloat16, while the multiplier,
    # the tangent projection and the retraction stay float32. Three properties:
    # 1. From the same state (W, multiplier, momentum), the bfloat16 update is the float32 one
    #    up to bfloat16 round-off: the default msign rounds its input and each of its
    #    3 products per step to bfloat16 (1 + 3·5 = 16 roundings of relative size ≤ ε = 2⁻⁸,
    #    summed in the worst case), and the later Newton–Schulz steps pass a perturbation on
    #    with a gain of at most 2 (their polynomials' slopes near σ = 1), so
    #    ‖Δu‖_F/‖u‖_F ≤ 2·16·ε = 0.125. Comparing one step from a shared state keeps
    #    trajectories from compounding the difference (20 steps apart, the directions of two
    #    runs diverge by an amount no precision bound controls).
    # 2. bfloat16 really ran: rounding the msign input alone moves Φ by ~ε/√3 relative, far
    #    above the float32 round-off of the same program (~1e-6): require ≥ ε/16.
    # 3. The bfloat16-compute run's own parameters stay on the manifold to float32 accuracy
    #    (2e-6, the bound the float32 steps are held to): the retraction is float32.
    # Catches: a bfloat16 path that drops or flips the multiplier term or the momentum (O(1)
    # apart), one that silently computes in float32 (property 2), a retraction run in
    # bfloat16 (distance ~ε, property 3).
    W0 = _point(m, shape, rng)
    grads = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(10)]
    txs = {d: mo.manifold_muon(0.05, m, compute_dtype=d) for d in (None, jnp.bfloat16)}
    steps = {d: jax.jit(tx.update) for d, tx in txs.items()}
    bound = 2 * (1 + 3 * 5) * BF16_EPS
    W, W16, s, s16 = W0, W0, txs[None].init(W0), txs[jnp.bfloat16].init(W0)
    rels = []
    for G in grads:
        u32, s_next = steps[None](G, s, W)
        u16, _ = steps[jnp.bfloat16](G, s, W)  # the same state as the float32 step
        rels.append(float(jnp.linalg.norm(u16 - u32) / jnp.linalg.norm(u32)))
        W, s = optax.apply_updates(W, u32), s_next
        u, s16 = steps[jnp.bfloat16](G, s16, W16)  # the bfloat16 run's own trajectory
        W16 = optax.apply_updates(W16, u)
    assert max(rels) <= bound, (max(rels), bound)
    assert min(rels) >= BF16_EPS / 16, min(rels)
    assert float(m.distance(W16)) < 2e-6
    assert float(m.distance(W)) < 2e-6


def test_manifold_spec_forms_and_static_config(rng):
    params = {"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32), "b": jnp.ones(4)}
    # A single manifold applies to matrices only; Sphere may be given to a vector explicitly.
    assert mo.resolve_manifolds(mo.Stiefel(), params) == [None, mo.Stiefel()]
    spec = {"w": mo.Stiefel(), "b": mo.Sphere(2.0)}
    assert mo.resolve_manifolds(spec, params) == [mo.Sphere(2.0), mo.Stiefel()]
    assert mo.resolve_manifolds(lambda p: spec, params) == [mo.Sphere(2.0), mo.Stiefel()]
    assert hash(mo.Stiefel()) == hash(mo.Stiefel())
    assert jax.tree.leaves(spec) == [mo.Sphere(2.0), mo.Stiefel()]  # leaves, not pytrees
    projected = mo.project_params(params, spec)
    assert float(mo.Sphere(2.0).distance(projected["b"])) < 1e-6
    assert float(mo.Stiefel().distance(projected["w"])) < 1e-6


@pytest.mark.parametrize("bad", [mo.Stiefel(), mo.SpectralSphere()])
def test_vector_on_matrix_manifold_names_the_path(bad):
    params = {"layer": {"kernel": jnp.eye(4), "bias": jnp.ones(4)}}
    with pytest.raises(ValueError, match="layer/bias"):
        mo.manifold_muon(0.1, {"layer": {"kernel": mo.Stiefel(), "bias": bad}}).init(params)
    with pytest.raises(ValueError, match="layer/bias"):
        mo.dual_ascent(lambda p: {"layer": {"kernel": None, "bias": bad}}).init(params)


def test_spec_tree_mismatch_and_off_manifold_and_dtypes(rng):
    params = {"w": mo.project_params(jnp.asarray(rng.standard_normal((8, 4))), mo.Stiefel())}
    with pytest.raises(ValueError, match="does not match"):
        mo.manifold_muon(0.1, {"v": mo.Stiefel()}).init(params)
    with pytest.raises(ValueError, match="project_params"):
        mo.manifold_muon(0.1, mo.Stiefel()).init({"w": params["w"] * 2})
    # Under tracing the check is skipped (params are abstract).
    jax.jit(mo.manifold_muon(0.1, mo.Stiefel()).init)({"w": params["w"] * 2})
    with pytest.raises(ValueError, match="floating"):
        mo.manifold_muon(0.1, {"w": mo.Sphere()}).init({"w": jnp.ones((3, 3), jnp.int32)})


def test_diagnostics(rng):
    m = mo.Stiefel()
    params = {"w": _point(m, (16, 4), rng), "b": jnp.zeros(4)}
    tx = mo.dual_ascent(m, "exact")
    s = tx.init(params)
    g = {"w": jnp.asarray(rng.standard_normal((16, 4)), jnp.float32), "b": jnp.ones(4)}
    phi, s = tx.update(g, s, params)
    d = mo.diagnostics(params, m, s, phi)
    assert set(d) == {"w"}
    assert float(d["w"]["distance"]) < 1e-5 and float(d["w"]["tangent_violation"]) < 1e-5
    assert float(d["w"]["multiplier_norm"]) > 0


def test_bfloat16_params_stay_close(rng):
    m = mo.Sphere(1.0)
    W = mo.project_params(jnp.asarray(rng.standard_normal((16, 8)), jnp.bfloat16), m)
    tx = mo.manifold_muon(0.05, m)
    s = tx.init(W)
    u, s = tx.update(jnp.asarray(rng.standard_normal((16, 8)), jnp.bfloat16), s, W)
    W2 = optax.apply_updates(W, u)
    assert W2.dtype == jnp.bfloat16
    # Computed in float32 and rounded once to bfloat16: each entry moves by ≤ 2⁻⁹ relative, so
    # ‖W‖_F by ≤ 2⁻⁹ (a step computed in bfloat16 would drift by more, a missing retraction
    # by the step's O(η) radial part): bound 2⁻⁸.
    assert float(m.distance(W2)) < BF16_EPS


@pytest.mark.parametrize("m", MANIFOLDS, ids=lambda m: type(m).__name__)
def test_grouped_leaves_match_one_leaf_at_a_time(m, rng):
    """Same-shape leaves share one batched dual step and retraction; each leaf's
    update must equal the one it gets alone (float32 round-off of batched vs single matmuls)."""
    params = {f"w{i}": _point(m, (24, 16), rng) for i in range(3)}
    params["u"] = _point(m, (16, 40), rng)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    tx = mo.manifold_muon(0.05, m, group=True)
    state, step = tx.init(params), jax.jit(tx.update)
    single = {k: tx.init({k: params[k]}) for k in params}
    for _ in range(2):
        upd, state = step(grads, state, params)
        for k in params:
            alone, single[k] = step({k: grads[k]}, single[k], {k: params[k]})
            np.testing.assert_allclose(upd[k], alone[k], rtol=0, atol=2e-5)
        params = optax.apply_updates(params, upd)


def test_stiefel_projection_of_square_gaussians_with_tiny_singular_values():
    # σ_min/σ_max down to 1.5e-5 (a 16-stack of 256×256 Gaussians): the full msign leaves
    # σ_min ≈ 0.24 and the polish must keep going until every matrix is orthogonal.
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 256, 256))
    w = mo.project_params(x, mo.Stiefel())
    assert float(mo.Stiefel().distance(w)) < 2e-6


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_training_retraction_takes_each_branch_to_the_polar_factor(shape, rng):
    # The step's retraction (exact=False) picks one of four branches by how far V is from
    # orthonormal: a tangent step (cubic, or quintic: one product), a larger residual (the
    # polish loop), and a V never projected (the full msign first). Each must land on the
    # polar factor of V (float64 SVD), and on the manifold, to float32 accuracy.
    m = mo.Stiefel()
    W = np.asarray(_point(m, shape, rng), np.float64)
    tall = W if shape[0] >= shape[1] else W.T
    skew = rng.standard_normal((tall.shape[1],) * 2)
    eye = np.eye(tall.shape[1])
    cases = [(eye + t * (skew - skew.T), b) for t, b in [(5e-4, 0), (2e-3, 1), (0.02, 2)]]
    for V, branch in [(tall @ M, b) for M, b in cases] + [(rng.standard_normal(tall.shape), 3)]:
        # The branch the retraction takes (its own test on A = VᵀV/mean eigenvalue):
        A = V.T @ V / (np.trace(V.T @ V) / V.shape[1]) - eye
        e, bound = np.linalg.norm(A), np.abs(A).sum(1).max()
        assert branch == (3 if bound > 0.8 else 0 if e <= 3e-4 else 1 if e <= 5e-3 else 2)
        V = V if shape[0] >= shape[1] else V.T
        out = np.asarray(m.retract(jnp.asarray(V, jnp.float32), exact=False), np.float64)
        u, _, vt = np.linalg.svd(V, full_matrices=False)
        np.testing.assert_allclose(out, u @ vt, atol=2e-5)
        assert float(m.distance(jnp.asarray(out, jnp.float32))) < 2e-6


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


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a property of XLA:CPU's kernels")
@pytest.mark.parametrize("shape", [(64, 64), (128, 64), (64, 128)])
def test_steps_have_no_leading_axis_products_on_cpu(shape):
    # XLA:CPU runs a product that contracts the lhs's leading axis (AᵀB) on a generic kernel,
    # measured 1.2–2.2× slower than AB or ABᵀ (linalg.matmul_tn). muon's msign and the whole
    # Stiefel step (dual step, retraction, and its untaken branches) are written so that no
    # such product is left in the compiled program: square Stiefel in the row form, tall
    # Grams through a transposed copy, the tall Gram iteration accumulating Qᵀ.
    W = jax.random.normal(jax.random.PRNGKey(0), shape)
    for tx, m in [(mo.muon(0.02), None), (mo.manifold_muon(0.02, mo.Stiefel()), mo.Stiefel())]:
        p = W if m is None else mo.project_params(W, m)
        step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p))
        hlo = step.lower(p, tx.init(p), p).compile().as_text()
        contracted = re.findall(r" dot\([^\n]*lhs_contracting_dims=\{(\d+)\}", hlo)
        assert contracted and "0" not in contracted, (shape, m)
