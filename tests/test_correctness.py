"""Correct on every input a user can give: the certified exact solver on degenerate duals,
float64 end to end, the directions' spectral-norm contract, the spheres' fixed point,
optax's inject_hyperparams, and mismatched gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from manifold_harness import (
    LAST_TWO,
    MANIFOLDS,
    certified_gap,
    manifold_id,
    point,
    stiefel_problems,
)

import manifold_optax as mo
from manifold_optax.schedules import overshoot

SOLVERS = mo.manifolds.SOLVERS


def _pinned_stiefel_cases():
    """Nearly square problems whose dual minimizer ``Ĝ + WX*`` is rank-deficient (the fixed
    point's projected msign was 7–13% short there), a tiny one, a tall one with gradient
    scale 1e3 and a strong normal component, and a wide one."""
    rng = np.random.default_rng(1)
    out = []
    for shape, scale, normal in [
        ((15, 14), 1.0, 0.0),
        ((13, 12), 1e-3, 0.0),
        ((3, 2), 1.0, 3.0),
        ((16, 10), 1e3, 3.0),
        ((7, 12), 1.0, 3.0),
    ]:
        n, m = max(shape), min(shape)
        W, _ = np.linalg.qr(rng.standard_normal((n, m)))
        S = rng.standard_normal((m, m))
        G = rng.standard_normal((n, m)) + normal * np.sqrt(n) * W @ (S + S.T) / 2
        G = scale * G
        if shape[0] < shape[1]:
            W, G = W.T, G.T
        out.append((W, G))
    return out


def _check_exact(dtype, problems, gap_tol, others=False):
    """``exact`` certified within ``gap_tol`` on every problem (and, with ``others``, finite
    directions from ``fixed_point`` and ``dual_ascent``)."""
    st = mo.Stiefel()
    for shape, (G, W) in problems.items():
        if others:
            for solver in ("fixed_point", "dual_ascent"):
                phi = jax.jit(lambda G, W, s=solver: st.solve(G, W, s, certify=False).direction)
                assert np.all(np.isfinite(np.asarray(phi(G.astype(dtype), W.astype(dtype)))))
        sol = jax.jit(lambda G, W: st.solve(G, W, "exact"))(
            jnp.asarray(G, dtype), jnp.asarray(W, dtype)
        )
        P, Y = np.asarray(sol.direction), np.asarray(sol.multiplier)
        assert np.all(np.isfinite(P)), shape
        for i in range(G.shape[0]):
            gap, over, tv = certified_gap(st, G[i], W[i], P[i], Y[i])
            assert gap <= gap_tol, (shape, i, gap)
            assert over <= 1e-5, (shape, i, over)
            assert tv <= (1e-6 if dtype == jnp.float64 else 1e-5), (shape, i, tv)
            # The reported certificate is the independent one (to the working precision).
            assert abs(float(sol.info.duality_gap[i]) - gap) <= 1e-4, (shape, i)
            assert bool(sol.info.converged[i]) or gap > 1e-6


@pytest.mark.parametrize("dtype", ["float64", pytest.param("float32", marks=pytest.mark.slow)])
def test_exact_stiefel_certified_on_degenerate_duals(dtype):
    # A certificate, recomputed here in float64 from the solver's output alone: a feasible Φ
    # (‖Φ‖₂ ≤ 1, tangent) whose value is within the gap of the dual value at the returned
    # multiplier. float32's bound: the final SVD and nuclear norm are accurate to a few
    # hundred ε relative.
    with jax.enable_x64(True):
        cases = _pinned_stiefel_cases()
        problems = {}
        for W, G in cases:
            problems.setdefault(W.shape, ([], []))
            problems[W.shape][0].append(G)
            problems[W.shape][1].append(W)
        problems = {s: (np.stack(g), np.stack(w)) for s, (g, w) in problems.items()}
        _check_exact(jnp.dtype(dtype), problems, 1e-6 if dtype == "float64" else 2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_exact_stiefel_certified_over_a_random_search(dtype):
    with jax.enable_x64(True):
        problems = stiefel_problems(2000, seed=0)
        gap_tol = 1e-6 if dtype == "float64" else 2e-3
        _check_exact(jnp.dtype(dtype), problems, gap_tol, others=dtype == "float64")


def test_no_nan_on_degenerate_duals():
    # Su's Lyapunov map has no solution where σ_i + σ_j = 0 (a rank-deficient Ĝ + WX): the
    # fixed point leaves that block at zero instead of dividing by it.
    st = mo.Stiefel()
    with jax.enable_x64(True):
        for W, G in _pinned_stiefel_cases()[:2]:
            for solver in ("fixed_point", "dual_ascent"):
                sol = jax.jit(lambda G, W, s=solver: st.solve(G, W, s))(G, W)
                assert np.all(np.isfinite(np.asarray(sol.direction))), (solver, W.shape)
                assert float(jnp.linalg.norm(sol.direction, 2)) <= 1 + 1e-5


def _adversarial(m, shape, rng):
    """A random gradient, one with a large normal component and a nearly rank-deficient one
    (singular values from 1 to 1e-6), stacked as a batch at one point ``W``."""
    W = point(m, shape, rng)
    G = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    normal = G + 30.0 * jnp.linalg.norm(G) * W / jnp.linalg.norm(W)
    U, _, Vt = np.linalg.svd(np.asarray(G), full_matrices=False)
    low = jnp.asarray((U * np.geomspace(1.0, 1e-6, min(shape))) @ Vt, jnp.float32)
    return jnp.broadcast_to(W, (3, *shape)), jnp.stack([G, normal, low])


@pytest.mark.parametrize(
    "m,shape",
    [
        (MANIFOLDS[0], (48, 12)),
        pytest.param(MANIFOLDS[0], (12, 48), marks=pytest.mark.slow),
        pytest.param(MANIFOLDS[1], (12, 48), marks=pytest.mark.slow),
        pytest.param(MANIFOLDS[2], (48, 12), marks=pytest.mark.slow),
    ],
    ids=lambda x: manifold_id(x) if not isinstance(x, tuple) else "x".join(map(str, x)),
)
def test_direction_norm_contract(m, shape, rng):
    # The online step from a cold multiplier and dual ascent with two inner steps give
    # ‖Φ‖₂ ≤ 1 + e_s + 1e-5, e_s the 5-step msign schedule's overshoot (the tangent
    # projection must not add to it); the exact solvers' ‖Φ‖₂ ≤ 1 is checked with their gaps.
    e_s = overshoot("polar_express", 5)
    config = mo.manifolds.SolverConfig(inner_steps=2, ns_steps=5)
    W, G = _adversarial(m, shape, rng)

    @jax.jit
    def directions(G, W):
        out = [m.solve(G, W, s, config=config, certify=False).direction for s in SOLVERS[2:]]
        tx = mo.dual_ascent(m, "online", ns_steps=5, weight_dimension_numbers=LAST_TWO)
        return out + [tx.update(G, tx.init(W), W)[0]]

    for solver, phi in zip(("dual_ascent", "online", "transform"), directions(G, W), strict=True):
        s1 = np.linalg.svd(np.asarray(phi, np.float64), compute_uv=False)[:, 0]
        assert np.all(s1 <= 1 + e_s + 1e-5), (solver, s1)


def test_schedule_overshoot_bounds_msign(rng):
    for coeffs, steps in [("polar_express", 5), ("jordan", 5), ("you", 5)]:
        e = overshoot(coeffs, steps)
        x = jnp.asarray(rng.standard_normal((64, 16)), jnp.float32)
        s1 = float(jnp.linalg.norm(mo.msign(x, steps=steps, coeffs=coeffs), 2))
        assert s1 <= 1 + e + 1e-5, coeffs
    assert overshoot("polar_express", 10) < 1e-6


def _inject_cases():
    """Every alias with its defaults, on every manifold and solver; the suite runs the cases
    that read an integer option (dual ascent's inner steps, the spectral sphere's filter
    degree) and the default solver, the slow checks the rest."""
    yield "muon", None, None
    yield "trust_region", None, None
    for m in MANIFOLDS:
        for solver in SOLVERS:
            stiefel, spectral = isinstance(m, mo.Stiefel), isinstance(m, mo.SpectralSphere)
            fast = (stiefel and solver == "dual_ascent") or (spectral and solver == "online")
            marks = () if fast else (pytest.mark.slow,)
            yield pytest.param("manifold_muon", m, solver, marks=marks)


@pytest.mark.parametrize("alias,m,solver", list(_inject_cases()))
def test_inject_hyperparams_under_jit(alias, m, solver, rng):
    params = {"w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32), "b": jnp.zeros(8)}
    grads = {"w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32), "b": jnp.ones(8)}
    if m is None:
        tx = optax.inject_hyperparams(getattr(mo, alias))(learning_rate=0.1)
    else:
        params = mo.project_params(params, m)
        tx = optax.inject_hyperparams(mo.manifold_muon)(
            learning_rate=0.1, manifold=m, solver=solver
        )
    state = jax.jit(tx.init)(params)
    update = jax.jit(tx.update)
    u1, _ = update(grads, state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.01)
    u2, _ = update(grads, state, params)
    assert not np.allclose(u1["w"], u2["w"])
    np.testing.assert_allclose(u2["b"], u1["b"] * 0.1, rtol=1e-4, atol=1e-7)


def test_structural_integers_are_static():
    tx = optax.inject_hyperparams(mo.manifold_muon)(
        learning_rate=0.1, manifold=mo.Stiefel(), inner_steps=4
    )
    w = jax.random.normal(jax.random.key(0), (6, 3))
    params = mo.project_params({"w": w}, mo.Stiefel())
    state = tx.init(params)
    with pytest.raises(ValueError, match="static_args=\\('inner_steps',\\)"):
        jax.jit(tx.update)({"w": jnp.ones((6, 3))}, state, params)
    tx = optax.inject_hyperparams(mo.manifold_muon, static_args=("inner_steps",))(
        learning_rate=0.1, manifold=mo.Stiefel(), inner_steps=4, solver="dual_ascent"
    )
    jax.jit(tx.update)({"w": jnp.ones((6, 3))}, tx.init(params), params)


@pytest.mark.parametrize("alias", ["muon", "trust_region", "manifold_muon"])
@pytest.mark.parametrize("with_params", [True, False])
def test_transposed_gradient_names_its_path(alias, with_params, rng):
    w = jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)
    params = {"layer": {"kernel": mo.project_params(w, mo.Stiefel())}, "b": jnp.zeros(4)}
    grads = {"layer": {"kernel": w.T}, "b": jnp.ones(4)}
    tx = (
        mo.manifold_muon(0.1, mo.Stiefel()) if alias == "manifold_muon" else getattr(mo, alias)(0.1)
    )
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"'layer/kernel'.*\(32, 16\)"):
        tx.update(grads, state, params if with_params else None)


def test_diagnostics_reports_the_certificate(rng):
    m = mo.Stiefel()
    W = point(m, (15, 14), rng)
    G = jnp.asarray(rng.standard_normal((15, 14)), jnp.float32)
    # The projected msign of the gradient is feasible but not optimal: its gap shows.
    phi = mo.msign(G - W @ ((W.T @ G + G.T @ W) / 2), steps=10)

    @jax.jit
    def both(W, G, phi):
        alone = mo.diagnostics({"w": W}, m, grads={"w": G})["w"]
        given = mo.diagnostics({"w": W}, m, directions={"w": phi}, grads={"w": G})["w"]
        return alone, given

    d, e = both(W, G, phi)
    assert bool(d["converged"]) and float(d["duality_gap"]) <= 2e-3
    assert float(e["duality_gap"]) > 1e-3 and not bool(e["converged"])
