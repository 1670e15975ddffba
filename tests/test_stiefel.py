"""Stiefel: the square closed form, the fixed point, the online multiplier's symmetry, and the
certified polish of the training retraction."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from manifold_harness import dual_bound, point

import manifold_optax as mo


def test_square_stiefel_closed_form(rng):
    m = mo.Stiefel()
    W = point(m, (24, 24), rng)
    G = jnp.asarray(rng.standard_normal((24, 24)), jnp.float32)
    Phi = m.steepest_direction(G, W, "exact")
    WtG = np.asarray(W, np.float64).T @ np.asarray(G, np.float64)
    ref = np.asarray(W, np.float64) @ np.asarray(mo.msign_svd(jnp.asarray((WtG - WtG.T) / 2)))
    np.testing.assert_allclose(Phi, ref, atol=1e-4)


def test_fixed_point_is_certified_by_its_own_multiplier(rng):
    # Su's fixed point on a tall, skinny Stiefel problem (where it converges fast): its Φ and
    # its multiplier close the duality gap like the exact solver's (1e-4: float32 products in
    # the final msign and SVD, relative ε·κ with κ ~ 1e2 for a 96×16 Gaussian G + WX).
    m = mo.Stiefel()
    W = point(m, (96, 16), rng)
    G = jnp.asarray(rng.standard_normal((96, 16)), jnp.float32)
    Phi, Y, aux, _ = jax.jit(lambda G, W: m.solve(G, W, "fixed_point"))(G, W)
    value = float(np.sum(np.asarray(G, np.float64) * np.asarray(Phi, np.float64)))
    assert abs(dual_bound(m, G, W, Y, aux) - value) / value <= 1e-4
    assert float(m.tangent_violation(W, Phi)) <= 1e-5


@pytest.mark.parametrize("transform", ["dual_ascent", "manifold_step"])
@pytest.mark.parametrize("shape", [(96, 24), (24, 96)])
def test_online_stiefel_multiplier_stays_exactly_symmetric(transform, shape, rng):
    # Stiefel.dual_step reads the state's multiplier without symmetrizing it (that is a
    # transposed pass over every m×m multiplier, slow on XLA:CPU), which is right only while
    # every update keeps it exactly symmetric: bit for bit, step after step, while moving.
    m = mo.Stiefel()
    W = point(m, shape, rng)
    tx = mo.dual_ascent(m, "online") if transform == "dual_ascent" else mo.manifold_step(m, 0.05)
    state, step = tx.init(W), jax.jit(tx.update)
    for k in range(6):
        G = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        updates, state = step(G, state, W)
        if transform == "manifold_step":
            W = optax.apply_updates(W, updates)
        Y = np.asarray(state.y)
        assert np.array_equal(Y, Y.T), (k, np.abs(Y - Y.T).max())
    assert np.abs(Y).max() > 1e-3  # the multiplier moved


def test_online_stiefel_projects_its_direction_only_when_asked(rng):
    # project_dual_direction (a class attribute) decides whether the online step returns Φ
    # projected onto the tangent space; the first step (Y = 0, Φ = msign(Ĝ)) is far from it.
    class Unprojected(mo.Stiefel):
        project_dual_direction = False

    W = point(mo.Stiefel(), (64, 16), rng)
    G = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
    violation = {}
    for m in (mo.Stiefel(), Unprojected()):
        tx = mo.dual_ascent(m, "online")
        phi, _ = jax.jit(tx.update)(G, tx.init(W), W)
        violation[m.project_dual_direction] = float(m.tangent_violation(W, phi))
    assert violation[True] < 1e-5 and violation[False] > 1e-2, violation


@pytest.mark.parametrize("transform", ["manifold_step", "chain"])
def test_stiefel_step_falls_back_only_where_one_polish_step_falls_short(transform, rng):
    # The Stiefel step polishes every matrix with one quintic step (no conditional) and runs the
    # full retraction, under one conditional for all leaves, only where that step falls short
    # of float32 accuracy (‖A − I‖_F > 5e-3: here a large step on "big"). "still" has a zero
    # gradient: it must stay where it is; "big" must land on the polar factor of W − ηΦ.
    m = mo.Stiefel()
    params = {"big": point(m, (48, 24), rng), "still": point(m, (24, 40), rng)}
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
    from manifold_optax.manifolds.stiefel import CUBIC_POLISH_TOLERANCE, polish_certificates

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
        cubic_ok, _ = polish_certificates(jnp.asarray(A, jnp.float32))
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
    W = point(m, (48, 48), rng)
    G = jnp.asarray(rng.standard_normal((48, 48)), jnp.float32)
    tx = mo.dual_ascent(m, "online")
    phi, _ = tx.update(G, tx.init(W), W)
    assert float(m.tangent_violation(W, phi)) < 1e-5
    exact = m.steepest_direction(G, W, "exact")
    cos = float(jnp.vdot(phi, exact) / (jnp.linalg.norm(phi) * jnp.linalg.norm(exact)))
    assert cos > 0.99, cos


def test_stiefel_projection_of_square_gaussians_with_tiny_singular_values():
    # σ_min/σ_max down to 1.5e-5 (a 16-stack of 256×256 Gaussians): the full msign leaves
    # σ_min ≈ 0.24 and the polish must keep going until every matrix is orthogonal.
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 256, 256))
    w = mo.project_params(x, mo.Stiefel(), weight_dimension_numbers=mo.MatrixSpec(-2, -1))
    assert float(mo.Stiefel().distance(w)) < 2e-6


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_training_retraction_takes_each_branch_to_the_polar_factor(shape, rng):
    # The step's retraction (exact=False) picks one of four branches by how far V is from
    # orthonormal: a tangent step (cubic, or quintic: one product), a larger residual (the
    # polish loop), and a V never projected (the full msign first). Each must land on the
    # polar factor of V (float64 SVD), and on the manifold, to float32 accuracy.
    m = mo.Stiefel()
    W = np.asarray(point(m, shape, rng), np.float64)
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


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a property of XLA:CPU's kernels")
@pytest.mark.parametrize("shape", [(64, 64), (128, 64), (64, 128)])
def test_steps_have_no_leading_axis_products_on_cpu(shape):
    # XLA:CPU can run a product that contracts the lhs's leading axis (AᵀB) on a slower,
    # generic kernel (linalg.matmul_tn). muon's msign and the whole Stiefel step (dual step,
    # retraction, and its untaken branches) are written so that no such product is left in
    # the optimized program: square Stiefel in the row form, tall Grams through a transposed
    # copy, the tall Gram iteration accumulating Qᵀ. (The suite compiles with most
    # optimizations off; this check is about the optimized program, so it turns them on.)
    W = jax.random.normal(jax.random.PRNGKey(0), shape)
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        for tx, m in [(mo.muon(0.02), None), (mo.manifold_muon(0.02, mo.Stiefel()), mo.Stiefel())]:
            p = W if m is None else mo.project_params(W, m)
            step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p))
            hlo = step.lower(p, tx.init(p), p).compile().as_text()
            contracted = re.findall(r" dot\([^\n]*lhs_contracting_dims=\{(\d+)\}", hlo)
            assert contracted and "0" not in contracted, (shape, m)
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
