"""The contract every manifold keeps, run on each of ``MANIFOLDS``: exact directions certified
against a float64 dual bound, the solvers under x64, the online multiplier, training on the
manifold, the fused step against the explicit chain, zero gradients, bfloat16, specs and bad
input, and the template itself (a manifold defined by its geometry alone)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from manifold_harness import (
    BF16_EPS,
    CONTRACT,
    MANIFOLDS,
    SHAPES,
    dual_bound,
    manifold_id,
    normalized_dual,
    point,
    train,
)

import manifold_optax as mo
from manifold_optax.manifolds.certified import gap_tolerance


def only_leaf(state):
    """``(y, aux)``: the multiplier and auxiliary state of a one-matrix state (``params`` is
    the matrix)."""
    return state.y, None if isinstance(state.aux, optax.MaskedNode) else state.aux


def _slow_if(cond):
    return (pytest.mark.slow,) if cond else ()


@pytest.mark.parametrize("m", CONTRACT, ids=manifold_id)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s != (40, 40)])
def test_exact_direction_is_optimal(m, shape, rng):
    # (Square Stiefel takes its closed form: test_stiefel.py. The nearly square and tiny
    # degenerate cases: test_correctness.py.)
    W = point(m, shape, rng)
    G = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    Phi, Y, aux, _ = jax.jit(lambda G, W: m.solve(G, W, "exact"))(G, W)
    value = float(np.sum(np.asarray(G, np.float64) * np.asarray(Phi, np.float64)))
    bound = dual_bound(m, G, W, Y, aux)
    # Weak duality: value ≤ OPT ≤ bound for feasible Φ, so a small gap certifies optimality.
    # The solver stops at its float32 gap tolerance τ (≥ 256·ε), its gap measured in float32:
    # the lower and the upper bound it compares each carry up to τ of rounding (how XLA fuses
    # and orders the sums changes them), and the value and the bound measured here in float64
    # from the float32 Φ and multiplier differ from those by up to (rows + cols)·ε each.
    f32 = jnp.float32
    tol = 4 * gap_tolerance(mo.SolverConfig(), f32) + 2 * sum(shape) * float(jnp.finfo(f32).eps)
    assert abs(bound - value) / bound <= tol
    Phi64 = np.asarray(Phi, np.float64)
    if isinstance(m, mo.Oblique):
        W64 = np.asarray(W, np.float64)
        c = np.sum(W64 * Phi64, axis=m.axis) / np.linalg.norm(W64, axis=m.axis)
        tv = np.linalg.norm(c) / np.linalg.norm(Phi64)
    elif isinstance(m, mo.Stiefel):
        W64 = np.asarray(W, np.float64)
        Wt, Pt = (W64, Phi64) if shape[0] >= shape[1] else (W64.T, Phi64.T)
        C = Wt.T @ Pt
        tv = np.linalg.norm(C + C.T) / 2 / np.linalg.norm(Phi64)
    else:
        tv = abs(np.sum(np.asarray(m.theta(W, aux), np.float64) * Phi64)) / np.linalg.norm(Phi64)
    assert tv <= 1e-5
    assert np.linalg.svd(Phi64, compute_uv=False)[0] <= 1 + 1e-5


@pytest.mark.parametrize(
    "m, dtype",
    # float32 under x64 on the spheres' scalar root (where x64 once broke the loop state) in
    # the suite, the other manifolds' float32 in the slow checks.
    [
        pytest.param(m, d, marks=_slow_if(d == "float32" and not isinstance(m, mo.Sphere)))
        for m in MANIFOLDS
        for d in ["float32", "float64"]
    ],
    ids=lambda x: manifold_id(x) if isinstance(x, mo.Manifold) else x,
)
def test_solvers_under_x64(m, dtype, rng):
    # With jax_enable_x64 on (a float64 user's setting), float64 parameters get float64 math
    # end to end: with the solver tolerances at 1e-10 every solver that solves ("exact",
    # "fixed_point", the spheres' included) is certified to a 1e-9 relative gap against an
    # independent float64 dual bound, tangent to 1e-9, and the retraction lands on the
    # manifold to 1e-12. float32 parameters keep the float32 path (float32 round-off; the
    # exact solver alone: x64 once broke the scalar root's integer loop state).
    shape = (24, 12)
    precise = dtype == "float64"
    config = mo.manifolds.SolverConfig(tol=1e-10, gap_tol=1e-10)
    tol_gap, tol_tangent, tol_dist = (1e-9, 1e-9, 1e-12) if precise else (1e-4, 1e-5, 1e-5)
    with jax.enable_x64(True):
        W = mo.project_params(jnp.asarray(rng.standard_normal(shape), dtype), m)
        assert float(m.distance(W)) <= tol_dist
        G = jnp.asarray(rng.standard_normal(shape), dtype)
        for solver in ("exact", "fixed_point") if precise else ("exact",):
            Phi, Y, aux, info = jax.jit(lambda G, W, s=solver: m.solve(G, W, s, config=config))(
                G, W
            )
            assert Phi.dtype == jnp.dtype(dtype), solver
            value = float(np.sum(np.asarray(G, np.float64) * np.asarray(Phi, np.float64)))
            gap = (dual_bound(m, G, W, Y, aux) - value) / value
            assert -tol_gap <= gap <= tol_gap, (solver, gap)
            assert abs(float(info.duality_gap) - gap) <= tol_gap, solver
            assert float(m.tangent_violation(W, Phi, aux)) <= tol_tangent, solver
        if not precise:
            return
        R = m.retract(W - 0.05 * Phi)
        assert R.dtype == jnp.dtype(dtype)
        assert float(m.distance(R)) <= tol_dist
        tx = mo.manifold_muon(0.05, m)
        u, _ = jax.jit(tx.update)(G, tx.init(W), W)
        assert u.dtype == jnp.dtype(dtype)
        assert float(m.distance(W + u)) <= tol_dist


@pytest.mark.parametrize("m", CONTRACT, ids=manifold_id)
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
    W = point(m, shape, rng)
    R = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    # A strong normal component (W is normal for each manifold, in part for the spectral
    # sphere), so that the multiplier has far to go from Y₀ = 0.
    G = R + 2.0 * jnp.linalg.norm(R) / jnp.linalg.norm(W) * W
    _, y_star, aux, _ = jax.jit(lambda G, W: m.solve(G, W, "exact"))(G, W)
    y_0 = jnp.zeros(m.multiplier_shape(shape))
    _, y_k, _, _ = jax.jit(lambda G, W, Y: m.solve(G, W, "dual_ascent", Y=Y))(G, W, y_0)
    Gn = G / (jnp.linalg.norm(G) / np.sqrt(min(shape)))
    d_star, d_0, d_k = (normalized_dual(m, G, W, y, aux) for y in (y_star, y_0, y_k))
    assert d_0 - d_star > 0.05 * d_star, (d_0, d_star)  # Y₀ is far from optimal
    assert d_k - d_star <= 0.5 * (d_0 - d_star), (d_0, d_k, d_star)

    def raw_residual(y):
        raw = mo.msign(Gn + m.adjoint(W, y, m.theta(W, aux)), steps=10)
        return float(m.tangent_violation(W, raw, aux))

    assert raw_residual(y_k) <= 0.5 * raw_residual(y_0), (raw_residual(y_0), raw_residual(y_k))


@pytest.mark.parametrize("m", CONTRACT, ids=manifold_id)
@pytest.mark.parametrize("transform", ["dual_ascent", "manifold_step"])
def test_online_multiplier_converges_with_fixed_W_and_G(m, transform, rng):
    # Both online paths: the dual_ascent transform and the fused manifold_step (which has its
    # own multiplier update per manifold); the latter at learning rate 0, so that W stays put
    # (its update R(W) − W is round-off) while the multiplier takes its dual steps. (Oblique
    # rows: 16 rows of 48, not 48 rows spanning 16 dimensions, whose dual is degenerate and
    # which no dual iteration alone solves: docs/math.md, Degenerate duals.)
    shape = (16, 48) if isinstance(m, mo.Oblique) and m.axis == -1 else (48, 16)
    W = point(m, shape, rng)
    G = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    tx = mo.dual_ascent(m, "online") if transform == "dual_ascent" else mo.manifold_step(m, 0.0)
    state = tx.init(W)  # default η₂ per manifold
    step = jax.jit(tx.update)
    # Stiefel returns Φ projected onto the tangent space (violation ~1e-7 from step 1); the
    # multiplier converges when the *unprojected* msign(Ĝ + C*(Y)) becomes tangent.
    Gn = G / (jnp.linalg.norm(G) / jnp.sqrt(min(shape)))

    @jax.jit  # (eagerly, the spectral sphere's block iteration took 140 s over the 400 steps)
    def violations(phi, y, aux):
        aux = m.update_aux(W, aux, 0)  # the state's block, refreshed at W
        raw = mo.msign(Gn + m.adjoint(W, y, m.theta(W, aux)))
        return m.tangent_violation(W, phi, aux), m.tangent_violation(W, raw, aux)

    viol = []
    for _ in range(400):
        phi, state = step(G, state, W)
        projected, raw = violations(phi, *only_leaf(state))
        if m.project_dual_direction and transform == "dual_ascent":
            assert float(projected) < 1e-5
        viol.append(float(raw))
    first = next(i for i, v in enumerate(viol) if v < 1e-4)
    # 400 steps: dual descent at η₂ (0.5 spheres, 0.1 Stiefel) contracts the residual
    # geometrically; the m(m+1)/2 = 136 Stiefel multipliers need the most steps.
    assert max(viol[first:]) < 1e-4, (first, viol[-1])


@pytest.mark.parametrize(
    "m, tol",
    [(mo.Stiefel(), 1e-5), (mo.SpectralSphere(2.0), 1e-5), (mo.Sphere(3.0), 1e-6)],
    ids=["stiefel", "spectral_sphere", "sphere"],
)
def test_training_keeps_params_on_manifold(m, tol, rng):
    params, losses = train(m, "online", 300, rng)
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
    "m, atol, dtype, path",
    # Stiefel and sphere: the same operations in the same order. Spectral sphere: the chain's
    # dual step takes Θ from its own 2-iteration block, the fused step from the retraction's
    # top pair (both float32-converged), and the retractions run 6 vs 10 power iterations.
    # bfloat16 compute on Stiefel (the chain with the most to disagree on: projection and
    # polish): the same operations, the same tolerance.
    # On the accelerator path both defer the spectral retraction to one batched refinement.
    [
        (mo.Stiefel(), 1e-6, None, "cpu"),
        (mo.Sphere(3.0), 1e-6, None, "cpu"),
        (mo.SpectralSphere(2.0), 2e-5, None, "cpu"),
        pytest.param(mo.SpectralSphere(2.0), 2e-5, None, "gpu", marks=pytest.mark.slow),
        pytest.param(mo.Stiefel(), 1e-6, jnp.bfloat16, "cpu", marks=pytest.mark.slow),
    ],
    ids=["Stiefel", "Sphere", "SpectralSphere", "SpectralSphere-accelerator", "Stiefel-bfloat16"],
)
def test_explicit_chain_equals_manifold_muon(m, atol, dtype, path, rng):
    # A tall, a wide and a square matrix (square Stiefel takes the closed form in both).
    params = {
        "w": point(m, (32, 8), rng),
        "v": point(m, (8, 16), rng),
        "s": point(m, (12, 12), rng),
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
        with mo.lowering_for(path):
            uc, sc = chain_step(g, sc, params)
            ua, sa = alias_step(g, sa, params)
        for a, b in zip(jax.tree.leaves(uc), jax.tree.leaves(ua), strict=True):
            np.testing.assert_allclose(a, b, atol=atol)
        params = optax.apply_updates(params, uc)


def test_manifold_step_follows_a_learning_rate_schedule(rng):
    # η(0) = 0: the first update is R(W) − W = 0 (W is on the manifold); η(1) > 0 moves W.
    m = mo.Stiefel()
    W = point(m, (32, 8), rng)
    tx = mo.manifold_step(m, optax.linear_schedule(0.0, 0.1, 10))
    s = tx.init(W)
    G = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
    u0, s = tx.update(G, s, W)
    assert float(jnp.max(jnp.abs(u0))) < 1e-6 and int(s.count) == 1
    u1, s = tx.update(G, s, W)
    assert float(jnp.max(jnp.abs(u1))) > 1e-3
    assert float(m.distance(W + u1)) < 1e-5


@pytest.mark.parametrize("m", CONTRACT, ids=manifold_id)
def test_fused_step_with_zero_gradient_stays_and_keeps_the_multiplier(m, rng):
    # The fused online steps fold the zero-gradient guard into the learning rate (no pass
    # over Φ): a zero gradient must leave W where it is (to the retraction's round-off) and
    # the multiplier bit-for-bit, while a nonzero gradient moves both.
    W = point(m, (48, 16), rng)
    tx = mo.manifold_step(m, 0.1)
    s = tx.init(W)
    G = jnp.asarray(rng.standard_normal(W.shape), jnp.float32)
    u, s = tx.update(G, s, W)  # a nonzero multiplier to keep
    W = optax.apply_updates(W, u)
    y = np.asarray(s.y)
    assert float(np.max(np.abs(y))) > 0
    u, s2 = tx.update(jnp.zeros_like(G), s, W)
    np.testing.assert_array_equal(np.asarray(s2.y), y)
    # 1e-6: a retraction of a point on the manifold moves it by float32 round-off only.
    assert float(jnp.max(jnp.abs(u))) < 1e-6
    u, s3 = tx.update(G, s, W)
    assert float(jnp.max(jnp.abs(u))) > 1e-3
    assert float(np.max(np.abs(np.asarray(s3.y) - y))) > 0


@pytest.mark.parametrize("m", CONTRACT, ids=manifold_id)
def test_online_direction_of_a_zero_gradient_is_zero_and_keeps_the_multiplier(m, rng):
    # dual_ascent's online step: a zero gradient has no steepest direction (Φ = 0, not the
    # msign of the multiplier term alone) and must not move the multiplier.
    W = point(m, (48, 16), rng)
    tx = mo.dual_ascent(m, "online")
    s = tx.init(W)
    G = jnp.asarray(rng.standard_normal(W.shape), jnp.float32)
    _, s = tx.update(G, s, W)  # a nonzero multiplier to keep
    y = np.asarray(s.y)
    assert float(np.max(np.abs(y))) > 0
    phi, s2 = tx.update(jnp.zeros_like(G), s, W)
    assert float(jnp.max(jnp.abs(phi))) == 0.0
    np.testing.assert_array_equal(np.asarray(s2.y), y)


@pytest.mark.parametrize(
    "m, shape",
    # Tall (wide reads transposed) and square (the spectral sphere's square case: -m slow).
    [
        pytest.param(m, s, marks=_slow_if(isinstance(m, mo.SpectralSphere) and s == (48, 48)))
        for m in MANIFOLDS
        for s in [(64, 32), (48, 48)]
    ],
    ids=lambda x: manifold_id(x) if isinstance(x, mo.Manifold) else "x".join(map(str, x)),
)
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
    W0 = point(m, shape, rng)
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
    params = {"w": point(m, (16, 4), rng), "b": jnp.zeros(4)}
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


@pytest.mark.slow
@pytest.mark.parametrize("m", CONTRACT, ids=manifold_id)
def test_grouped_leaves_match_one_leaf_at_a_time(m, rng):
    """Same-shape leaves share one batched dual step and retraction; each leaf's
    update must equal the one it gets alone (float32 round-off of batched vs single matmuls)."""
    params = {f"w{i}": point(m, (24, 16), rng) for i in range(3)}
    params["u"] = point(m, (16, 40), rng)
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


@pytest.mark.parametrize("m", CONTRACT, ids=manifold_id)
@pytest.mark.parametrize("shape", [(24, 10), (3, 10, 24)])
def test_adjoint_is_the_adjoint_of_the_constraint(m, shape, rng):
    # ⟨Y, C_W(Φ)⟩ = ⟨C_W*(Y), Φ⟩ for any multiplier Y and direction Φ: the identity that makes
    # the constraint residual the dual gradient. (Stiefel's multiplier is symmetric.)
    W = point(m, shape, rng)
    Phi = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    Y = jnp.asarray(rng.standard_normal(m.multiplier_shape(shape)), jnp.float32)
    if Y.ndim == W.ndim:
        Y = Y + jnp.swapaxes(Y, -1, -2)

    @jax.jit
    def both(W, Phi, Y):
        theta = m.theta(W)
        c = m.constraint(W, Phi, theta)
        lhs = jnp.sum((Y * c).reshape(shape[:-2] + (-1,)), axis=-1)
        return lhs, jnp.sum(m.adjoint(W, Y, theta) * Phi, axis=(-2, -1))

    lhs, rhs = both(W, Phi, Y)
    scale = float(jnp.max(jnp.abs(Y))) * float(jnp.linalg.norm(Phi)) * np.sqrt(shape[-1])
    np.testing.assert_allclose(lhs, rhs, atol=1e-5 * scale)


@pytest.mark.parametrize("m", CONTRACT, ids=manifold_id)
@pytest.mark.parametrize("shape", [(48, 16), (2, 24, 24)])
def test_fused_step_equals_the_templates_generic_step(m, shape, rng):
    # Each manifold's own online_retracted_step computes the template's generic one (dual step,
    # W − ηΦ, then the retraction) with fewer passes; the two agree to float32 round-off (the
    # spectral sphere's fused step reads Θ from the retraction's pair, the generic one refreshes
    # it at W: both are W's top pair to the block iteration's accuracy).
    W = point(m, shape, rng)
    G = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    Y = jnp.asarray(0.1 * rng.standard_normal(m.multiplier_shape(shape)), jnp.float32)
    if Y.ndim == W.ndim:
        Y = Y + jnp.swapaxes(Y, -1, -2)
    aux = jax.jit(lambda W: m.update_aux(W, m.init_aux(W), 30))(W)
    lr, eta = jnp.float32(0.05), 0.3

    def fused(G, W, Y, aux):
        return m.online_retracted_step(G, W, Y, aux, lr, eta, mo.msign, 6)

    def generic(G, W, Y, aux):
        return mo.Manifold.online_retracted_step(m, G, W, Y, aux, lr, eta, mo.msign, 6)

    fused, generic = (jax.jit(f)(G, W, Y, aux) for f in (fused, generic))
    np.testing.assert_allclose(fused[0], generic[0], atol=3e-5)
    np.testing.assert_allclose(fused[1], generic[1], atol=3e-5)
    if fused[3] is None:  # retracted now: on the manifold
        assert float(m.distance(fused[0])) < 2e-5
