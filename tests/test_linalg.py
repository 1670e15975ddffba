"""msign and friends: accuracy against the SVD reference, properties over shapes/scales/dtypes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import log_uniform_spectrum, matrix_with_spectrum
from hypothesis import given, settings
from hypothesis import strategies as st

import manifold_optax as mo


def _sv(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


@pytest.mark.parametrize("shape, rank", [((128, 128), 128), ((512, 512), 512), ((96, 640), 96)])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_eight_steps_float32_accuracy_target(rng, shape, rank, scale):
    # The float32 accuracy target: σ log-uniform on [1e-3, 1]·σ_max, rank ≤ 512 → every σ within 2e-3 of 1.
    g = scale * matrix_with_spectrum(rng, *shape, log_uniform_spectrum(rng, rank, 1e-3))
    s = _sv(mo.msign(jnp.asarray(g, jnp.float32), steps=8))[:rank]
    assert np.abs(s - 1).max() <= 2e-3


def test_plain_frobenius_normalization_misses_the_target(rng):
    # MATH.md §2: Frobenius normalization over-estimates σ_max by up to √rank and misses 2e-3.
    g = matrix_with_spectrum(rng, 128, 128, log_uniform_spectrum(rng, 128, 1e-3))
    s = _sv(mo.msign(jnp.asarray(g, jnp.float32), steps=8, normalization="frobenius"))
    assert np.abs(s - 1).max() > 2e-3


def test_default_at_least_as_accurate_as_jordan_five(rng):
    g = jnp.asarray(matrix_with_spectrum(rng, 256, 256, log_uniform_spectrum(rng, 256, 1e-2)))
    err_default = np.abs(_sv(mo.msign(g)) - 1).max()
    err_jordan = np.abs(_sv(mo.msign(g, 5, "jordan")) - 1).max()
    assert err_default <= 0.32 and err_default <= err_jordan


def test_matches_svd_polar_factor(rng):
    # Singular vectors are untouched by NS: at 8 steps the matrix itself equals UVᵀ.
    g = matrix_with_spectrum(rng, 48, 80, log_uniform_spectrum(rng, 48, 1e-2))
    ours = np.asarray(mo.msign(jnp.asarray(g, jnp.float32), steps=8))
    ref = np.asarray(mo.msign_svd(jnp.asarray(g)))
    assert np.abs(ours - ref).max() < 1e-4


def test_rank_deficient_maps_null_space_to_zero(rng):
    g = matrix_with_spectrum(rng, 64, 40, np.linspace(1.0, 0.1, 10))
    ours = np.asarray(mo.msign(jnp.asarray(g, jnp.float32), steps=8))
    s = _sv(ours)
    np.testing.assert_allclose(s[:10], 1.0, atol=1e-4)
    # A float32 rank-10 matrix has σ ~ 1e-7·σ_max on its null space; 8 steps amplify that
    # round-off (the first Polar Express row has slope 8.3 at 0) to a few 1e-4 at most.
    np.testing.assert_allclose(s[10:], 0.0, atol=2e-3)
    np.testing.assert_allclose(ours, np.asarray(mo.msign_svd(jnp.asarray(g))), atol=2e-3)


def test_zero_gives_zero_and_dtypes_are_kept():
    for dt in (jnp.float32, jnp.bfloat16):
        out = mo.msign(jnp.zeros((3, 5, 7), dt))
        assert out.dtype == dt and not np.any(np.asarray(out, np.float32))


def test_bfloat16_keeps_float32_coefficients(rng):
    # The 5-step Polar Express map's error on this matrix's normalized spectrum is computed in
    # float64 twice: with the schedule's coefficients (what a bfloat16 msign must keep) and
    # with them rounded to bfloat16 (what it must not do: a larger error, MATH.md §2). The
    # bfloat16 msign's error must lie below the midpoint of the two: its own round-off (a few
    # units of 2⁻⁸) is far smaller than the gap between the maps.
    import ml_dtypes

    from manifold_optax import schedules

    sigma = log_uniform_spectrum(rng, 128, 1e-2)
    g = matrix_with_spectrum(rng, 128, 128, sigma)
    out = mo.msign(jnp.asarray(g, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    table = np.asarray(schedules.get_schedule("polar_express", 5)[0], np.float64)
    x = sigma / (np.sum(sigma**8) ** (1 / 8) * (1 + schedules.PE_SAFETY))  # the Schatten-8 norm
    err = {
        name: np.abs(schedules.composed_map(t, x) - 1).max()
        for name, t in [("f32", table), ("bf16", table.astype(ml_dtypes.bfloat16))]
    }
    assert err["bf16"] - err["f32"] > 8 * 2.0**-8, err  # the two maps are well apart
    assert np.abs(_sv(out) - 1).max() < (err["f32"] + err["bf16"]) / 2, err


def test_float64_under_x64(rng):
    g = matrix_with_spectrum(rng, 40, 30, log_uniform_spectrum(rng, 30, 1e-3))
    with jax.enable_x64(True):
        out = mo.msign(jnp.asarray(g, jnp.float64), steps=10)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(_sv(out), 1.0, atol=1e-10)


def test_batched_equals_per_matrix_and_jit_vmap(rng):
    g = jnp.asarray(
        matrix_with_spectrum(rng, 20, 12, np.linspace(1, 0.05, 12), batch=(2, 3)), jnp.float32
    )
    batched = jax.jit(mo.msign)(g)
    per = np.stack([[np.asarray(mo.msign(g[i, j])) for j in range(3)] for i in range(2)])
    # Same math; batched and single matmuls may sum in a different order (float32 round-off).
    np.testing.assert_allclose(batched, per, atol=2e-5)
    np.testing.assert_allclose(jax.vmap(mo.msign)(g), per, atol=2e-5)


def test_a_batch_of_one_runs_as_a_plain_matrix(rng):
    # [1, 1, r, c] is computed as the r×c matrix (XLA:CPU runs batch-1 dots slower): the same
    # program, so the same bits, and the batch axes come back; both orientations, both methods.
    for shape, method in [((24, 40), "standard"), ((40, 24), "gram"), ((40, 24), "standard")]:
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        one = jax.jit(lambda a, m=method: mo.msign(a, method=m))(x[None, None])
        assert one.shape == (1, 1) + shape
        np.testing.assert_array_equal(
            one[0, 0], jax.jit(lambda a, m=method: mo.msign(a, method=m))(x)
        )
        jaxpr = str(jax.make_jaxpr(lambda a, m=method: mo.msign(a, method=m))(x[None, None]))
        assert _dot_batch_dims(jaxpr) == {"[], []"}
    # A real batch keeps its batched products.
    jaxpr = str(jax.make_jaxpr(mo.msign)(jnp.ones((2, 24, 40))))
    assert _dot_batch_dims(jaxpr) == {"[0], [0]"}


def _dot_batch_dims(jaxpr: str) -> set:
    """The batch-dimension pairs of every dot_general in a jaxpr's text."""
    return set(re.findall(r"dimension_numbers=\(\([^)]*\), \(([^)]*)\)\)", jaxpr))


def test_schedules_and_explicit_table(rng):
    g = jnp.asarray(matrix_with_spectrum(rng, 64, 64, log_uniform_spectrum(rng, 64, 1e-2)))
    table = mo.polar_express_coefficients(5)
    np.testing.assert_allclose(
        mo.msign(g, coeffs=table, safety=1.01), mo.msign(g, 5, "polar_express"), atol=1e-6
    )
    assert np.abs(_sv(mo.msign(g, coeffs="you")) - 1).max() < 0.05
    with pytest.raises(ValueError, match="exactly 5"):
        mo.msign(g, 6, "you")


def test_parity_with_optax_frobenius_newton_schulz(rng):
    from optax.contrib._muon import orthogonalize_via_newton_schulz

    g = jnp.asarray(rng.standard_normal((48, 96)), jnp.float32)
    ref = orthogonalize_via_newton_schulz(g, jnp.asarray((3.4445, -4.7750, 2.0315)), 5)
    ours = mo.msign(g, 5, "jordan", normalization="frobenius")
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-5


@pytest.mark.parametrize("method", ["standard", "gram"])
def test_tall_input_runs_the_wide_iteration_transposed(rng, method):
    # Tall inputs are never transposed in memory: the iteration runs on XᵀX and X·Bᵀ. At 5
    # steps the result is not yet the polar factor, so any product on the wrong side (or a
    # missing transpose of a non-symmetric m×m factor) changes it far beyond float32
    # round-off, which is all that may differ from the transposed wide computation (1e-5).
    g = jnp.asarray(matrix_with_spectrum(rng, 160, 64, log_uniform_spectrum(rng, 64, 1e-2)))
    g = g.astype(jnp.float32)
    tall = mo.msign(g, method=method, precision=jax.lax.Precision.HIGHEST)
    wide = mo.msign(g.T, method=method, precision=jax.lax.Precision.HIGHEST).T
    assert np.linalg.norm(tall - wide) / np.linalg.norm(wide) < 1e-5
    assert np.abs(_sv(tall) - 1).max() > 1e-3  # (not converged: the comparison has teeth)
    # Parity with optax, which transposes tall inputs.
    from optax.contrib._muon import orthogonalize_via_newton_schulz

    ref = orthogonalize_via_newton_schulz(g, jnp.asarray((3.4445, -4.7750, 2.0315)), 5)
    ours = mo.msign(g, 5, "jordan", normalization="frobenius", method=method)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-5


def test_gram_newton_schulz_restarts_once_in_five_steps(rng):
    # Five Gram steps restart once, after step 2: four products with the long side (Gram,
    # restart, Gram, final) = 8m²n FLOPs, as the docstring and MATH.md §2 state; a restart
    # before the lone last step would add two more. Ten steps restart after 2, 4, 6 and 8.
    def long_side_products(steps):
        jaxpr = jax.make_jaxpr(lambda x: mo.msign(x, steps, method="gram"))(jnp.ones((160, 64)))
        dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
        return sum(160 in e.invars[0].aval.shape for e in dots)

    assert long_side_products(5) == 4
    assert long_side_products(10) == 10
    # Accuracy stays the standard iteration's: on a spectrum spanning [1e-3, 1] both are within
    # 3e-6 of the float64 iteration; with no restart at all the Gram form drifts to 2e-4.
    g = jnp.asarray(matrix_with_spectrum(rng, 256, 64, log_uniform_spectrum(rng, 64, 1e-3)))
    g = g.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    std = mo.msign(g, method="standard", precision=hi)
    gram = mo.msign(g, method="gram", precision=hi)
    assert np.abs(np.asarray(gram) - np.asarray(std)).max() <= 1e-5


def test_bad_input_errors():
    with pytest.raises(ValueError, match="at least 2 axes"):
        mo.msign(jnp.ones(5))
    with pytest.raises(ValueError, match="floating"):
        mo.msign(jnp.ones((3, 3), jnp.int32))
    with pytest.raises(ValueError, match="normalization"):
        mo.msign(jnp.ones((3, 3)), normalization="nuclear")


def test_norms_and_top_pair(rng):
    sig = np.array([3.0, 1.0, 0.5])
    g = jnp.asarray(matrix_with_spectrum(rng, 30, 20, sig), jnp.float32)
    np.testing.assert_allclose(mo.nuclear_norm(g), sig.sum(), rtol=1e-5)
    np.testing.assert_allclose(mo.spectral_norm(g), 3.0, rtol=1e-5)
    s, u, v = mo.top_singular_pair(g, iters=50)
    np.testing.assert_allclose(s, 3.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(u) @ np.asarray(g) @ np.asarray(v), 3.0, rtol=1e-5)
    # Warm start from a nearby vector converges in a few iterations.
    s2, _, _ = mo.top_singular_pair(g, v0=v + 0.01, iters=3)
    np.testing.assert_allclose(s2, 3.0, rtol=1e-5)
    s0, u0, v0 = mo.top_singular_pair(jnp.zeros((4, 3)))
    assert float(s0) == 0.0 and np.all(np.isfinite(u0)) and np.all(np.isfinite(v0))


@pytest.mark.parametrize("path", ["cpu", "gpu"])
@pytest.mark.parametrize("wide", [pytest.param(False, marks=pytest.mark.slow), True])
def test_chebyshev_filter_beats_power_steps_on_a_flat_top_spectrum(wide, path):
    # The spectral sphere's situation: a slowly decaying top spectrum (σ_j = 1 − 0.004j, so
    # σ₁₇/σ₁ = 0.936 for a 16-vector block) and a warm block from a nearby matrix (the
    # previous step's). Six degree-6 filter steps must land within 5e-6 of σ₁ (a float64 SVD;
    # 40 ε_f32, the round-off of a Ritz value from float32 products of length ≤ 192) and be
    # ≥ 4× closer than six power steps (same products; the filter's degree-6 Chebyshev
    # polynomial separates σ₁ from the band [0, σ₁₇] far faster than the sixth power
    # 0.936⁶ = 0.67); a sign or scale error in the three-term recurrence, or a b above λ₁,
    # loses that. On the accelerator path the filter is scaled by scalars instead of
    # normalized per step and Rayleigh–Ritz whitens the block by an eigensolve
    # (linalg.warm_block); the power steps are the CPU path's on both.
    from manifold_optax.linalg import top_singular_subspace

    rng = np.random.default_rng(0)
    n, m, p = 192, 128, 16
    U, _ = np.linalg.qr(rng.standard_normal((n, m)))
    V, _ = np.linalg.qr(rng.standard_normal((m, m)))
    x = (U * (1 - 0.004 * np.arange(m))) @ V.T
    prev = x + 0.02 * rng.standard_normal((n, m)) / np.sqrt(n)
    warm = np.linalg.svd(prev)[2][:p].T
    x, true = (x.T, V[:, 0]) if wide else (x, V[:, 0])
    err = {}
    for cheb in (True, False):
        with mo.lowering_for(path):
            s, u, v, _ = top_singular_subspace(
                jnp.asarray(x, jnp.float32), warm, 6, p, chebyshev=cheb
            )
        err[cheb] = abs(float(s) - 1.0)
        short = np.asarray(u if wide else v)
        assert abs(abs(short @ true) - 1) < 1e-3  # the top vector, on the short side
    assert err[True] < 5e-6, err
    assert err[True] < 0.25 * err[False], err


@pytest.mark.parametrize(
    "gap, path",
    [(1.5, "cpu"), (3.0, "cpu"), (1.5, "gpu"), pytest.param(3.0, "gpu", marks=pytest.mark.slow)],
)
def test_warm_block_iteration_survives_a_block_collapsed_onto_a_separated_top(gap, path):
    # σ₁ = gap·σ₂: the degree-6 filter aligns the warm block's columns with the top direction,
    # the block's Gram is numerically rank one, and the whitened projection in _ritz_top
    # carries spurious eigenvalues as large as λ₁: picking the largest of them gives σ₁ = 0
    # (the retraction then leaves W unscaled) or a Θ = u₁v₁ᵀ off by 1e-3. The checked power
    # steps must give σ₁ to float32 round-off (1e-6 ≈ 8 ε_f32: a Rayleigh quotient is second
    # order in its vector's error) and Θ within 2e-6 (16 ε_f32) of the float64 top pair, on
    # 20 seeds at either gap (a start picked by Rayleigh quotient alone, without the
    # residual tie-break, misses 2e-6 on some of them). The accelerator path forms the
    # projected matrix after whitening the block (linalg.warm_block), which must hold the
    # same bounds without the checked steps.
    from manifold_optax.linalg import top_singular_subspace

    warm_jit = jax.jit(lambda x, v0: top_singular_subspace(x, v0, 6, 32))

    def warm_run(x, v0):
        with mo.lowering_for(path):  # (traced on the first call, inside the block)
            return warm_jit(x, v0)

    cold_run = jax.jit(lambda x: top_singular_subspace(x, None, 30, 32)[3])
    for seed in range(20):
        rng = np.random.default_rng(seed)
        U, _ = np.linalg.qr(rng.standard_normal((256, 256)))
        V, _ = np.linalg.qr(rng.standard_normal((256, 256)))
        s = np.sort(rng.uniform(0.1, 1.0, 256))[::-1].copy()
        s[0] = gap * s[1]
        x = jnp.asarray((U * s) @ V.T, jnp.float32)
        # The warm block of the previous step: the same matrix before a 2% perturbation.
        prev = x + 0.02 * jnp.asarray(rng.standard_normal((256, 256)) / 16, jnp.float32)
        sigma, u, v, _ = warm_run(x, cold_run(prev))
        assert abs(float(sigma) - s[0]) / s[0] < 1e-6, (seed, float(sigma), s[0])
        theta = np.outer(np.asarray(u, np.float64), np.asarray(v, np.float64))
        true = np.outer(U[:, 0], V[:, 0])
        err = min(np.linalg.norm(theta - true), np.linalg.norm(theta + true))
        assert err < 2e-6, (seed, err)


def test_unrolled_warm_block_iteration_matches_the_loop_and_drops_its_loops(monkeypatch):
    # Off CPU the warm path's two short loops (the Chebyshev recurrence, the Ritz squarings)
    # are unrolled: an XLA:GPU while loop reads its predicate back to the host every
    # iteration. CI has no GPU, so force that path here: it must compute what the loops
    # compute (the same operations: float32 round-off only) and lower to a program with
    # exactly those two while loops fewer (on CPU one stays: per_matrix's one-at-a-time
    # Cholesky, a batched call on other backends).
    from manifold_optax.linalg import _small, spectral

    rng = np.random.default_rng(1)
    # A top singular value 10% above the rest, so the top pair is well conditioned.
    U, _ = np.linalg.qr(rng.standard_normal((3, 160, 96)))
    V, _ = np.linalg.qr(rng.standard_normal((3, 96, 96)))
    s = np.concatenate([[1.0], 0.9 * rng.uniform(0, 1, 95)])
    x = jnp.asarray(np.swapaxes((U * s) @ np.swapaxes(V, -1, -2), -1, -2), jnp.float32)
    warm = jnp.asarray(rng.standard_normal((3, 96, 16)), jnp.float32)
    outs, loops = {}, {}
    for unroll in (False, True):
        for module in (spectral, _small):
            monkeypatch.setattr(module, "unroll_fixed_loops", lambda unroll=unroll: unroll)
        run = jax.jit(lambda x, warm: spectral.top_singular_subspace(x, warm, 6, 16))
        outs[unroll] = run(x, warm)
        loops[unroll] = run.lower(x, warm).as_text().count("stablehlo.while")
    cholesky_maps = 1 if jax.default_backend() == "cpu" else 0
    assert loops == {False: 2 + cholesky_maps, True: cholesky_maps}, loops
    # σ to float32 round-off. The Ritz vectors come out of a nearly rank-deficient filtered
    # block, which amplifies round-off in their entries, not in their angle: compare angles.
    np.testing.assert_allclose(np.asarray(outs[False][0]), np.asarray(outs[True][0]), rtol=1e-6)
    for a, b in zip(outs[False][1:3], outs[True][1:3], strict=True):
        cos = np.abs(np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64), axis=-1))
        assert np.all(cos > 1 - 1e-6), cos


def test_lower_inverse_is_exact_for_every_block_size():
    # The nilpotent product (I − N)(I + N²)(I + N⁴)··· must cover N^(p−1): one factor too few
    # leaves an O(1) error in the last subdiagonals for p just above a power of two.
    from manifold_optax.linalg._small import lower_inverse

    rng = np.random.default_rng(0)
    for p in (1, 2, 3, 5, 17, 33):  # each just above a power of two, and the smallest
        a = rng.standard_normal((2, p, p))
        L = np.linalg.cholesky(a @ a.transpose(0, 2, 1) + p * np.eye(p))
        Li = np.asarray(lower_inverse(jnp.asarray(L, jnp.float32)), np.float64)
        assert np.abs(Li @ L - np.eye(p)).max() < 1e-5, p  # float32, cond(L) ≲ 10


@pytest.mark.parametrize("p", [2, 32, 200])
def test_top_eigvec_squarings_do_not_underflow_on_a_flat_spectrum(p):
    # The squarings renormalize only every few steps. A flat spectrum is the worst case: after
    # a normalization every eigenvalue is 1/p, and too many squarings before the next one
    # underflow the whole matrix to zero (then the result is the fallback e₀, not the top
    # eigenvector). Top eigenvalue 0.1% above the rest, in a random basis.
    from manifold_optax.linalg._small import squarings_between_normalizations, top_eigvec_psd

    k = squarings_between_normalizations(p)
    assert k >= 1 and 2**k * np.log2(max(p, 2)) <= 100 < 2 ** (k + 1) * np.log2(max(p, 2))
    Q, _ = np.linalg.qr(np.random.default_rng(p).standard_normal((p, p)))
    H = (Q * np.concatenate([[1.001], np.ones(p - 1)])) @ Q.T
    c = np.asarray(top_eigvec_psd(jnp.asarray(H, jnp.float32), 24), np.float64)
    assert abs(abs(c @ Q[:, 0]) - 1) < 1e-4


def _cluster(duplicate: bool):
    """``(S, V, E)``: S = E·diag(λ)·Eᵀ (64×64) with a top cluster 1, 1 − 1e-5, 1 − 2e-5, …
    and a block V spanning the top eigenvector among 7 other eigenvectors (plus a copy of its
    first column when ``duplicate``)."""
    rng = np.random.default_rng(1)
    s, p = 64, 8
    E, _ = np.linalg.qr(rng.standard_normal((s, s)))
    lam = np.concatenate([1 - 1e-5 * np.arange(12), 0.5 * rng.random(s - 12)])
    S = (E * lam) @ E.T
    mix, _ = np.linalg.qr(rng.standard_normal((p, p)))
    V = E[:, [0, 3, 5, 9, 14, 20, 30, 40]] @ mix
    if duplicate:
        V = np.concatenate([V, V[:, :1]], axis=1)
    return S, V, E


@pytest.mark.parametrize("duplicate", [False, True])
def test_matmul_only_rayleigh_ritz_resolves_a_cluster(duplicate):
    # S with a top cluster 1, 1 − 1e-5, 1 − 2e-5, … (closer than any fixed number of power
    # steps separates) and a block that contains the top eigenvector among 7 other directions.
    # The Ritz value must be λ₁ to float32 accuracy (2e-7 relative; the squaring's bound is
    # p/(2e·2²⁴) = 2e-7), and the vector must be the top one. With a duplicated column the
    # Gram of the block is singular: the shifted Cholesky must still give finite results.
    from manifold_optax.linalg.spectral import _ritz_top

    S, V, E = _cluster(duplicate)
    lam1, z, Q = _ritz_top(jnp.asarray(V, jnp.float32), jnp.asarray(S @ V, jnp.float32))
    assert np.isfinite(np.asarray(Q)).all()
    assert abs(float(lam1) - 1.0) < 2e-7, float(lam1)
    assert abs(abs(float(np.asarray(z, np.float64) @ E[:, 0])) - 1) < 1e-3


@pytest.mark.parametrize("duplicate", [False, True])
def test_accelerator_rayleigh_ritz_resolves_a_cluster_and_a_zero_matrix(duplicate):
    # The accelerator path's refinement (linalg.warm_block) on the cluster above, from the
    # block itself with the lowest filter degree: the Ritz value within float32 round-off of
    # λ₁ (4ε relative: the Rayleigh quotient of a vector formed after whitening, a ratio of
    # two float32 reductions of length 64, each rounded, lands a few ulps from λ₁) and the
    # top vector; a duplicated column (singular block Gram)
    # stays finite. A zero matrix gives λ = 0 and a unit vector.
    from manifold_optax.linalg.warm_block import refine_warm_block

    S, V, E = _cluster(duplicate)
    for degree in (1, 6):
        lam1, z, Q = refine_warm_block(
            jnp.asarray(S, jnp.float32), jnp.asarray(V, jnp.float32), degree
        )
        assert np.isfinite(np.asarray(Q)).all()
        assert abs(float(lam1) - 1.0) <= 4 * np.finfo(np.float32).eps, (degree, float(lam1))
        assert abs(abs(float(np.asarray(z, np.float64) @ E[:, 0])) - 1) < 1e-3
    lam0, z0, Q0 = refine_warm_block(jnp.zeros((2, 8, 8)), jnp.ones((2, 8, 3)), 3)
    assert np.all(np.asarray(lam0) == 0) and np.all(np.isfinite(np.asarray(Q0)))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(z0), axis=-1), 1.0, rtol=1e-6)


# ---- property tests ---------------------------------------------------------------------------

_msign8 = jax.jit(lambda x: mo.msign(x, steps=8))


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 64),
    cols=st.integers(1, 64),
    batch=st.sampled_from([(), (2,)]),
    log_scale=st.floats(-20, 20),
    rank_frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    seed=st.integers(0, 2**16),
)
def test_msign_properties(rows, cols, batch, log_scale, rank_frac, dtype, seed):
    rng = np.random.default_rng(seed)
    k = min(rows, cols)
    rank = int(round(rank_frac * k))
    sigma = np.exp(rng.uniform(np.log(1e-2), 0, rank)) if rank else np.zeros(0)
    if rank:
        sigma[0] = 1.0
    g = matrix_with_spectrum(rng, rows, cols, sigma, batch=batch) * 10.0**log_scale
    x = jnp.asarray(g, dtype)
    out = _msign8(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    out = np.asarray(out, np.float64)
    assert np.all(np.isfinite(out))
    x64 = np.asarray(x, np.float64)
    for idx in np.ndindex(*batch):
        s = np.linalg.svd(out[idx], compute_uv=False)
        sx = np.linalg.svd(x64[idx], compute_uv=False)
        if sx.size == 0 or sx[0] == 0:
            assert np.all(out[idx] == 0)
            continue
        # bf16 inputs are rounded: recount their numerical rank from the rounded matrix.
        tol = 5e-3 if dtype == "bfloat16" else 1e-4
        big = sx > sx[0] * (2e-2 if dtype == "bfloat16" else 5e-3)
        small = sx < sx[0] * 1e-6
        assert np.abs(s[big] - 1).max() <= (0.05 if dtype == "bfloat16" else tol)
        if dtype == "float32":
            # bf16 matmuls add ~4e-3 relative noise, which msign rightly sends towards 1;
            # in float32 an exactly-zero direction stays near zero.
            assert np.all(s[small] <= 1e-2)
