"""Arriving from optax.contrib.muon and Flax: optax's keywords and presets, one default for the
fallback paths (whole components), options that reach every leaf, precision, vmap."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import manifold_optax as mo

EPS32 = float(jnp.finfo(jnp.float32).eps)


def _tree(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "w": jax.random.normal(k[0], (16, 12)),
        "v": jax.random.normal(k[1], (12, 10)),
        "b": jax.random.normal(k[2], (12,)),
    }


def _run(tx, params, steps=3):
    state = tx.init(params)
    step = jax.jit(tx.update)
    out = []
    for t in range(steps):
        g = jax.tree.map(lambda p, t=t: jnp.sin(p * (t + 1.0)) + 0.1 * p, params)
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
        out.append(u)
    return out


# --- optax.contrib.muon's signature -------------------------------------------------------


def _optax_defaults():
    sig = inspect.signature(optax.contrib.muon)
    return {n: p.default for n, p in sig.parameters.items() if n != "learning_rate"}


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"adaptive": True, "consistent_rms": 0.2},
        {
            "ns_coeffs": "dion",
            "weight_decay": 0.1,
            "weight_decay_mask": {"w": True, "v": False, "b": False},
        },
        {"ns_coeffs": "standard", "preconditioning": "schatten", "nesterov": False},
        {"adam_weight_decay": 0.01, "adam_eps_root": 1e-6, "adam_learning_rate": 0.003},
    ],
)
def test_every_optax_keyword_is_accepted_with_parity_at_optax_settings(change):
    kwargs = {**_optax_defaults(), **change}  # every keyword optax.contrib.muon has
    params = _tree()
    ours = _run(mo.muon(0.02, **kwargs, fallback_patterns=()), params)
    theirs = _run(optax.contrib.muon(0.02, **kwargs), params)
    for a, b in zip(ours, theirs, strict=True):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            # 5 Newton–Schulz steps in float32, computed in another order: round-off of
            # order ε·(σ_max/σ_min)·steps, relative to the update's scale.
            scale = float(jnp.max(jnp.abs(y)))
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e3 * EPS32 * scale)


def test_optax_names_for_stacked_leaves_and_moment_dtype():
    params = {"stack": jax.random.normal(jax.random.key(0), (3, 8, 6)), "b": jnp.zeros(6)}
    dims = {"stack": optax.contrib.MuonDimensionNumbers(1, 2), "b": None}
    common = dict(muon_weight_dimension_numbers=dims, mu_dtype=jnp.bfloat16)
    ours = _run(mo.muon(0.02, "standard", preconditioning="frobenius", **common), params)
    theirs = _run(optax.contrib.muon(0.02, **common), params)
    for a, b in zip(ours, theirs, strict=True):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=0.02 * 2e-2)
    moments = [x for x in jax.tree.leaves(mo.muon(0.02, **common).init(params)) if x.ndim == 3]
    assert [x.dtype for x in moments] == [jnp.dtype(jnp.bfloat16)]
    with pytest.raises(ValueError, match="not both"):
        mo.muon(0.1, weight_dimension_numbers=dims, muon_weight_dimension_numbers=dims)
    with pytest.raises(ValueError, match="preconditioning"):
        mo.muon(0.1, preconditioning="newton")


def test_adam_weight_decay_mask_restricts_the_fallback_decay():
    params = {"w": jnp.eye(4), "b": jnp.ones(4), "c": jnp.ones(4)}
    tx = mo.muon(
        0.0,
        adam_learning_rate=0.1,
        adam_weight_decay=0.5,
        adam_weight_decay_mask={"w": False, "b": True, "c": False},
    )
    zeros = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(u["b"], -0.1 * 0.5 * np.ones(4), rtol=1e-6)
    np.testing.assert_array_equal(u["c"], np.zeros(4))


# --- fallback paths ------------------------------------------------------------------------


def test_one_default_for_the_fallback_paths_matching_whole_components():
    for fn in (
        mo.muon,
        mo.manifold_muon,
        mo.trust_region,
        mo.flax_dimension_numbers,
        mo.label_params,
    ):
        assert inspect.signature(fn).parameters["fallback_patterns"].default == (
            mo.DEFAULT_FALLBACK_PATTERNS
        ), fn.__name__

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(20, 8, rngs=rngs)
            self.multi_head = nnx.Linear(8, 8, rngs=rngs)
            self.heads_mixer = nnx.Linear(8, 8, rngs=rngs)
            self.lm_head = nnx.Linear(8, 20, rngs=rngs)

    model = Model(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param).to_pure_dict()
    labels = mo.label_params(params)
    assert labels["multi_head"]["kernel"] == "matrix"
    assert labels["heads_mixer"]["kernel"] == "matrix"
    assert labels["lm_head"]["kernel"] == "fallback"
    assert labels["embed"]["embedding"] == "fallback"
    specs = nnx.to_pure_dict(mo.flax_dimension_numbers(model))
    assert specs["multi_head"]["kernel"] is not None and specs["lm_head"]["kernel"] is None
    # A regex over whole components, a run of components, or none at all.
    assert mo.label_params(params, fallback_patterns=("multi_.*",))["multi_head"]["kernel"] == (
        "fallback"
    )
    assert mo.label_params(params, fallback_patterns=())["lm_head"]["kernel"] == "matrix"
    # manifold_muon keeps the same paths off the manifold.
    tx = mo.manifold_muon(0.1, mo.Stiefel())
    on = mo.project_params(params, mo.Stiefel())
    state = tx.init(on)
    g = jax.tree.map(jnp.ones_like, on)
    u, _ = tx.update(g, state, on)
    w = optax.apply_updates(on, u)["multi_head"]["kernel"]
    np.testing.assert_allclose(w.T @ w, np.eye(8), atol=1e-5)
    # trust_region: the fallback paths take fallback_norm (sign) instead of the spectral norm.
    tr = mo.trust_region(1.0, beta=0.0)
    u, _ = tr.update(g, tr.init(params))
    np.testing.assert_array_equal(np.abs(u["lm_head"]["kernel"]), np.ones((8, 20)))


def test_manifold_muon_muon_fallback_is_muon_with_every_option():
    params = _tree()
    params["embed"] = jax.random.normal(jax.random.key(9), (30, 12))
    on = {**params, "w": mo.project_params(params["w"], mo.Stiefel())}
    spec = {"w": mo.Stiefel(), "v": None, "b": None, "embed": None}
    options = dict(
        normalization="frobenius",
        precision=jax.lax.Precision.HIGHEST,
        consistent_rms=0.2,
        adam_eps_root=1e-6,
        adam_eps=1e-6,
        eps=1e-7,
        ns_coeffs="standard",
    )
    tx = mo.manifold_muon(0.05, spec, fallback="muon", fallback_patterns=("embed",), **options)
    ref = mo.muon(0.05, fallback_patterns=("embed",), **options)
    ours = _run(tx, on)
    sub = {k: v for k, v in on.items() if k != "w"}
    theirs = _run(ref, sub)
    for a, b in zip(ours, theirs, strict=True):
        for k in ("v", "b", "embed"):
            np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-6, atol=1e-7)
    # The embedding went to AdamW (with the AdamW options given).
    adam = optax.adamw(0.05, eps=1e-6, eps_root=1e-6, weight_decay=0.0, nesterov=True)
    g = jax.tree.map(lambda p: jnp.sin(p) + 0.1 * p, on["embed"])
    first = adam.update(g, adam.init(on["embed"]), on["embed"])[0]
    np.testing.assert_allclose(np.asarray(ours[0]["embed"]), np.asarray(first), rtol=1e-5)


# --- the spec decides: scale_by_shape and by_shape ------------------------------------------


def test_scale_by_shape_leaves_a_leaf_without_a_spec_untouched():
    spec = {"w": mo.MatrixSpec(0, 1), "b": None}
    u = {"w": jnp.ones((8, 64)), "b": jnp.ones(64)}
    tx = mo.scale_by_shape(spec)
    out, _ = tx.update(u, tx.init(None))
    np.testing.assert_array_equal(out["b"], np.ones(64))
    np.testing.assert_allclose(out["w"], np.sqrt(64 / 8) * np.ones((8, 64)))


def test_by_shape_reads_the_fans_of_the_leafs_matrix_view():
    seen = {}

    def factory(fan_in, fan_out):
        seen[(fan_in, fan_out)] = True
        return mo.Sphere(float(fan_in) ** 0.5)

    params = {
        "conv": jax.random.normal(jax.random.key(0), (3, 3, 8, 16)),
        "out": jax.random.normal(jax.random.key(1), (4, 8, 32)),  # (heads, head_dim, d)
        "qkv": jax.random.normal(jax.random.key(2), (32, 96)),
    }
    dims = {
        "conv": mo.MatrixSpec((0, 1, 2), (3,)),
        "out": mo.MatrixSpec((0, 1), (2,)),
        "qkv": mo.MatrixSpec(0, 1, split=3),
    }
    on = mo.project_params(params, mo.by_shape(factory), weight_dimension_numbers=dims)
    assert set(seen) == {(72, 16), (32, 32)}
    np.testing.assert_allclose(jnp.linalg.norm(on["conv"]), 72**0.5, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(on["out"]), 32**0.5, rtol=1e-5)
    for part in jnp.split(on["qkv"], 3, axis=1):
        np.testing.assert_allclose(jnp.linalg.norm(part), 32**0.5, rtol=1e-5)


# --- solver options ---------------------------------------------------------------------------


def test_a_config_is_not_overridden_by_keywords_left_at_their_defaults():
    w = mo.project_params(jax.random.normal(jax.random.key(0), (12, 6)), mo.Stiefel())
    g = jax.random.normal(jax.random.key(1), (12, 6))

    def direction(**kw):
        tx = mo.dual_ascent(mo.Stiefel(), "dual_ascent", **kw)
        return tx.update({"w": g}, tx.init({"w": w}), {"w": w})[0]["w"]

    two = direction(inner_steps=2)
    np.testing.assert_array_equal(direction(exact_config=mo.SolverConfig(inner_steps=2)), two)
    assert float(jnp.max(jnp.abs(direction() - two))) > 1e-4  # 20 steps differ from 2
    # An explicit keyword wins over the config.
    np.testing.assert_array_equal(
        direction(exact_config=mo.SolverConfig(inner_steps=7), inner_steps=2), two
    )


def test_one_power_iters_default_for_the_config_and_the_transforms():
    m = mo.SpectralSphere(2.0)
    w = mo.project_params(jax.random.normal(jax.random.key(0), (16, 8)), m)
    g = {"w": jax.random.normal(jax.random.key(1), (16, 8))}

    def aux(tx):
        return jax.tree.leaves(tx.update(g, tx.init({"w": w}), {"w": w})[1])

    n = mo.SolverConfig().power_iters
    for make in (
        lambda **kw: mo.dual_ascent(m, **kw),
        lambda **kw: mo.manifold_step(m, 0.1, **kw),
    ):
        for a, b in zip(
            aux(make()), aux(make(exact_config=mo.SolverConfig(power_iters=n))), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    default = inspect.signature(mo.manifold_step).parameters["power_iters"].default
    assert default is None and n == 6


# --- precision and vmap ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "manifold",
    [mo.Sphere(1.0), mo.SpectralSphere(1.0), mo.Stiefel(), mo.Oblique(1.0)],
    ids=lambda m: type(m).__name__,
)
def test_bfloat16_gradients_keep_float32_parameters_on_the_manifold(manifold):
    params = {"w": mo.project_params(jax.random.normal(jax.random.key(0), (24, 12)), manifold)}
    tx = mo.manifold_muon(0.05, manifold)

    @jax.jit
    def steps(params, state, key):
        def body(carry, k):
            p, s = carry
            g = jax.tree.map(lambda x: jax.random.normal(k, x.shape, jnp.bfloat16), p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, state), jax.random.split(key, 200))[0]

    params, _ = steps(params, tx.init(params), jax.random.key(1))
    assert params["w"].dtype == jnp.float32
    assert float(manifold.distance(params["w"])) <= 1e-5


@pytest.mark.parametrize(
    "manifold",
    [None, mo.Sphere(1.0), mo.SpectralSphere(1.0), mo.Stiefel(), mo.Oblique(1.0)],
    ids=lambda m: "muon" if m is None else type(m).__name__,
)
def test_vmap_over_an_ensemble_gives_each_member_its_own_step(manifold):
    tx = mo.muon(0.05) if manifold is None else mo.manifold_muon(0.05, manifold)
    on = []
    for i in range(3):
        p = {k: v for k, v in _tree(i).items() if k != "v"}
        on.append(p if manifold is None else mo.project_params(p, manifold))
    grads = [jax.tree.map(lambda x, i=i: jnp.cos(x * (i + 2.0)), p) for i, p in enumerate(on)]
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
    states = [tx.init(p) for p in on]
    vu, vs = jax.jit(jax.vmap(tx.update))(stack(grads), stack(states), stack(on))
    for i in range(3):
        u, s = jax.jit(tx.update)(grads[i], states[i], on[i])
        for a, b in zip(jax.tree.leaves((u, s)), jax.tree.leaves((vu, vs)), strict=True):
            np.testing.assert_allclose(np.asarray(b[i]), np.asarray(a), rtol=1e-5, atol=1e-6)
    # vmap(init) builds the same stacked state.
    vinit = jax.vmap(tx.init)(stack(on))
    for a, b in zip(jax.tree.leaves(vinit), jax.tree.leaves(stack(states)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
