"""Optimizer state shaped like the parameters: every per-leaf buffer (momentum, moments,
multiplier, auxiliary state) lives in a tree with the parameters' structure, so that
``optax.tree_map_params`` maps it and ``mo.state_shardings`` places each leaf by its
parameter's position, never by its shape."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import manifold_optax as mo

MANIFOLDS = {
    "sphere": mo.Sphere(),
    "spectral_sphere": mo.SpectralSphere(),
    "stiefel": mo.Stiefel(),
    "oblique": mo.Oblique(),
}


def make_params():
    rng = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    # "a" is tall: its Stiefel multiplier (4×4) has the shape of "b".
    return {"layer": {"a": f(8, 4), "b": f(4, 4)}, "bias": f(4), "embed": f(10, 4)}


def optimizers():
    out = {
        "muon": (mo.muon(0.02), None),
        "normuon": (mo.normuon(0.02), None),
        "adamuon": (mo.adamuon(1e-3), None),
        "trust_region": (mo.trust_region(0.02), None),
    }
    for name, m in MANIFOLDS.items():
        # (The state's structure is the solver's: the other solvers on one manifold.)
        for solver in ("online", "dual_ascent", "exact") if name == "stiefel" else ("online",):
            out[f"{name}/{solver}"] = (mo.manifold_muon(0.02, m, solver=solver), m)
        blocks = optax.chain(mo.momentum(0.9), mo.dual_ascent(m), optax.scale(-0.1), mo.retract(m))
        out[f"{name}/blocks"] = (blocks, m)
    return out


OPTIMIZERS = optimizers()


def spec(m):
    return {"layer": m, "bias": None, "embed": None}


def setup(name):
    tx, m = OPTIMIZERS[name]
    params = make_params()
    if m is not None:
        params = mo.project_params(params, spec(m))
        if name.endswith("/blocks"):
            params = {"layer": params["layer"]}
    return tx, m, params


def _param_paths(params):
    return {tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


def _at_param(path, param_paths):
    """Whether ``path`` (without trailing attribute keys: an auxiliary state's fields) ends
    with a parameter's path."""
    path = list(path)
    while path and isinstance(path[-1], jax.tree_util.GetAttrKey):
        path.pop()
    return any(tuple(path[-len(p) :]) == p for p in param_paths if len(p) <= len(path))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_tree_map_params_maps_exactly_the_parameter_shaped_trees(name):
    tx, m, params = setup(name)
    state = tx.init(params)
    mapped = optax.tree_map_params(
        tx, lambda x: x.astype(jnp.bfloat16), state, transform_non_params=lambda x: x
    )
    pp = _param_paths(params)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    after = jax.tree.leaves(mapped)
    assert len(flat) == len(after)
    n_mapped = 0
    for (path, x), y in zip(flat, after, strict=True):
        if y.dtype == jnp.bfloat16 and x.dtype != jnp.bfloat16:
            n_mapped += 1
            assert _at_param(path, pp), jax.tree_util.keystr(path)
        else:
            assert not _at_param(path, pp), jax.tree_util.keystr(path)
    assert n_mapped > 0
    # The state still steps after the round trip through the mapped structure.
    back = optax.tree_map_params(tx, lambda x: x.astype(jnp.float32), mapped)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    jax.jit(tx.update).lower(jax.tree.map(jnp.ones_like, params), back, params)


@pytest.mark.parametrize("name", ["stiefel/online", "stiefel/dual_ascent", "oblique/online"])
def test_each_multiplier_sits_at_its_parameter(name):
    tx, m, params = setup(name)
    state = tx.init(params)
    (y,) = [
        x.y
        for x in jax.tree.leaves(
            state, is_leaf=lambda x: isinstance(x, mo.ManifoldStepState | mo.DualAscentState)
        )
        if isinstance(x, mo.ManifoldStepState | mo.DualAscentState)
    ]
    for k in ("a", "b"):
        assert y["layer"][k].shape == m.multiplier_shape(params["layer"][k].shape)
    assert isinstance(y["bias"], optax.MaskedNode) or y["bias"] is None


def test_state_shardings_place_by_position_not_by_shape():
    # One device is enough: the specs are named whatever the device count. "a"'s Stiefel
    # multiplier has "b"'s shape; it must not take "b"'s sharding.
    mesh = jax.make_mesh((1,), ("fsdp",), devices=jax.devices()[:1])
    tx, _, params = setup("stiefel/online")
    specs = {
        "layer": {"a": P("fsdp", None), "b": P(None, "fsdp")},
        "bias": P(),
        "embed": P(None, "fsdp"),
    }
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )
    out = mo.state_shardings(tx, params, shardings)
    got = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(out)[0]}
    y_a = [v for k, v in got.items() if ".y['layer']['a']" in k]
    mu_b = [v for k, v in got.items() if ".mu['layer']['b']" in k or "['mu']['layer']['b']" in k]
    assert y_a == [P()], got
    assert mu_b == [P(None, "fsdp")], got
    # Every leaf of the state has a sharding, in the state's structure.
    assert jax.tree.structure(out) == jax.tree.structure(tx.init(params))


def test_a_state_made_for_other_parameters_is_a_clear_error():
    tx = mo.manifold_muon(0.02, mo.Stiefel())
    params = mo.project_params(make_params(), spec(mo.Stiefel()))
    state = tx.init(params)
    other = dict(params, layer=dict(params["layer"], b=jnp.eye(6)[:, :4]))
    with pytest.raises(ValueError, match=r"'layer/b'.*shape"):
        tx.update(jax.tree.map(jnp.ones_like, other), state, other)


@pytest.mark.parametrize("name", ["spectral_sphere", "stiefel"])
def test_nnx_optimizer_steps_equal_plain_optax_steps(name):
    """``nnx.Optimizer`` hands a named tuple nested in a parameter-shaped state (the spectral
    sphere's warm block) back as an ``nnx.State``; the steps it takes are those of ``tx.update``
    on the plain trees, and the state keeps its structure across them (one trace of the step:
    ``init`` sees the parameters boxed in ``nnx.Param``, ``update`` as arrays)."""
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self):
            @nnx.split_rngs(splits=2)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stack(rngs):
                return nnx.Linear(8, 6, use_bias=False, rngs=rngs)

            self.stack = stack(nnx.Rngs(0))
            self.head = nnx.Linear(6, 3, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.head(jnp.tanh(jnp.einsum("bi,lio->bo", x, self.stack.kernel[...])))

    model = Model()
    spec = mo.by_shape(lambda fi, fo: MANIFOLDS[name])
    nnx.update(model, mo.project_params(nnx.state(model, nnx.Param), spec))
    tx = mo.manifold_muon(0.05, spec)
    params = jax.tree.map(jnp.array, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    state = tx.init(params)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 8)), jnp.float32)
    loss = lambda m: jnp.sum(m(x) ** 2)  # noqa: E731

    traces = []

    @nnx.jit
    def step(m, o):
        traces.append(1)
        o.update(m, nnx.grad(loss)(m))

    def plain_loss(p):
        h = jnp.tanh(jnp.einsum("bi,lio->bo", x, p["stack"]["kernel"]))
        return jnp.sum((h @ p["head"]["kernel"] + p["head"]["bias"]) ** 2)

    for _ in range(3):
        step(model, opt)
        updates, state = jax.jit(tx.update)(jax.grad(plain_loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, params)
    assert len(traces) == 1, f"the nnx.Optimizer step was traced {len(traces)} times in 3 steps"
