"""Layer shapes: every Flax layer's parameters are the matrices they should be, for Muon and for
the manifolds, whichever form the spec tree takes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import manifold_optax as mo


def _msign64(a):
    u, _, vt = np.linalg.svd(a, full_matrices=False)
    return u @ vt


def _well_conditioned(rng, rows, cols):
    u = np.linalg.qr(rng.standard_normal((rows, rows)))[0][:, : min(rows, cols)]
    v = np.linalg.qr(rng.standard_normal((cols, cols)))[0][:, : min(rows, cols)]
    return (u * rng.uniform(0.5, 1.0, min(rows, cols))) @ v.T


# Each case: a module, the path of its kernel, the helper's options, and the intended matrices
# written independently: ``to_views(kernel) → [matrices]`` and ``from_views([matrices])``.
def _cases():
    d, h, hd = 16, 4, 4
    mha = dict(num_heads=h, in_features=d, qkv_features=h * hd, decode=False)
    return {
        "linear": (
            lambda r: nnx.Linear(12, 20, rngs=r),
            ("kernel",),
            {},
            lambda k: [k],
            lambda v: v[0],
        ),
        "fused_qkv": (
            lambda r: nnx.Linear(12, 3 * 8, rngs=r),
            ("kernel",),
            {"split_fused": 3},
            lambda k: [k[:, 8 * i : 8 * (i + 1)] for i in range(3)],
            lambda v: np.concatenate(v, axis=1),
        ),
        "query_joint": (
            lambda r: nnx.MultiHeadAttention(**mha, rngs=r),
            ("query", "kernel"),
            {"heads": "joint"},
            lambda k: [k.reshape(d, h * hd)],
            lambda v: v[0].reshape(d, h, hd),
        ),
        "query_split": (
            lambda r: nnx.MultiHeadAttention(**mha, rngs=r),
            ("query", "kernel"),
            {"heads": "split"},
            lambda k: [k[:, i, :] for i in range(h)],
            lambda v: np.stack(v, axis=1),
        ),
        "out_joint": (
            lambda r: nnx.MultiHeadAttention(**mha, rngs=r),
            ("out", "kernel"),
            {"heads": "joint"},
            lambda k: [k.reshape(h * hd, d)],
            lambda v: v[0].reshape(h, hd, d),
        ),
        "out_split": (
            lambda r: nnx.MultiHeadAttention(**mha, rngs=r),
            ("out", "kernel"),
            {"heads": "split"},
            lambda k: [k[i] for i in range(h)],
            lambda v: np.stack(v, axis=0),
        ),
        "conv_transpose": (
            lambda r: nnx.ConvTranspose(4, 6, kernel_size=(3,), rngs=r),
            ("kernel",),
            {},
            lambda k: [k.reshape(12, 6)],
            lambda v: v[0].reshape(3, 4, 6),
        ),
        "conv2d": (
            lambda r: nnx.Conv(3, 8, kernel_size=(3, 3), rngs=r),
            ("kernel",),
            {},
            lambda k: [k.reshape(27, 8)],
            lambda v: v[0].reshape(3, 3, 3, 8),
        ),
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_each_layer_is_orthogonalized_as_its_intended_matrix(case, rng):
    make, path, opts, to_views, from_views = CASES[case]
    model = make(nnx.Rngs(0))
    spec = mo.flax_dimension_numbers(model, fallback_patterns=(), **opts)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    kernel = params
    for key in path:
        kernel = kernel[key]
    views = [_well_conditioned(rng, *v.shape) for v in to_views(np.asarray(kernel))]
    grads = jax.tree.map(jnp.zeros_like, params)
    leaf = grads
    for key in path[:-1]:
        leaf = leaf[key]
    leaf[path[-1]] = jnp.asarray(from_views(views), jnp.float32)
    tx = mo.orthogonalize(ns_steps=10, weight_dimension_numbers=spec)
    out, _ = tx.update(grads, tx.init(params))
    got = out
    for key in path:
        got = got[key]
    want = from_views([_msign64(v) for v in views])
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
    # The first muon step through nnx.Optimizer is parallel to it: −η·√max(1, out/in)·msign.
    opt = nnx.Optimizer(
        model, mo.muon(0.1, ns_steps=10, weight_dimension_numbers=spec), wrt=nnx.Param
    )
    before = np.asarray(kernel)
    grad_state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(grad_state, grads)
    opt.update(model, grad_state)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for key in path:
        after = after[key]
    step = (np.asarray(after) - before).ravel()
    cos = -step @ want.ravel() / (np.linalg.norm(step) * np.linalg.norm(want))
    assert cos > 1 - 1e-4, cos


class Stack(nnx.Module):
    """Three ``nnx.vmap``-stacked Linear layers: kernel (3, 32, 32), bias (3, 32)."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return nnx.Linear(32, 32, rngs=rngs)

        self.layers = make(rngs)
        self.head = nnx.Linear(32, 2, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(layer, x):
            return jnp.tanh(layer(x))

        return self.head(body(self.layers, x))


def test_stacked_layers_are_batches_of_matrices_and_their_biases_vectors(rng):
    model = Stack(nnx.Rngs(0))
    spec = mo.flax_dimension_numbers(model)
    params = nnx.state(model, nnx.Param)
    labels = mo.label_params(nnx.to_pure_dict(params), weight_dimension_numbers=spec)
    assert labels["layers"] == {"kernel": "matrix", "bias": "fallback"}
    assert labels["head"] == {"kernel": "fallback", "bias": "fallback"}
    # Under manifold_muon: project, init, and a step keep every layer's kernel on Stiefel.
    st = mo.Stiefel()
    nnx.update(model, mo.project_params(params, st, weight_dimension_numbers=spec))
    tx = mo.manifold_muon(0.05, st, weight_dimension_numbers=spec)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)

    @nnx.jit
    def step(m, o):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(m)
        o.update(m, g)
        return loss

    for _ in range(3):
        step(model, opt)
    k = model.layers.kernel[...]
    assert k.shape == (3, 32, 32)
    assert float(jnp.max(jnp.abs(jnp.einsum("lij,lik->ljk", k, k) - jnp.eye(32)))) < 1e-5
    assert model.layers.bias[...].shape == (3, 32)


def test_spec_tree_forms_give_the_same_updates(rng):
    def run(form):
        model = Stack(nnx.Rngs(0))
        tree = mo.flax_dimension_numbers(model)
        spec = {"state": tree, "pure": nnx.to_pure_dict(tree), "callable": lambda p: tree}[form]
        tx = mo.muon(0.05, weight_dimension_numbers=spec)
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 32)), jnp.float32)
        g = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        opt.update(model, g)
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    ref = run("state")
    for form in ("pure", "callable"):
        jax.tree.map(np.testing.assert_array_equal, run(form), ref)


class Block(nnx.Module):
    def __init__(self, rngs, vocab=40, d=16):
        self.emb = nnx.Embed(vocab, d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=4, in_features=d, qkv_features=d, decode=False, rngs=rngs
        )
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.conv = nnx.Conv(d, d, kernel_size=(3,), rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tok):
        h = self.emb(tok)
        h = h + self.attn(h)
        h = h + jax.nn.gelu(self.conv(self.norm(h)))
        return self.head(h)


@pytest.mark.parametrize("kind", ["muon", "manifold_muon"])
def test_a_transformer_block_trains_with_heads_and_embeddings_on_adamw(kind):
    model = Block(nnx.Rngs(0))
    spec = mo.flax_dimension_numbers(model, heads="split")
    labels = mo.label_params(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)), weight_dimension_numbers=spec
    )
    assert labels["emb"]["embedding"] == "fallback" and labels["head"]["kernel"] == "fallback"
    assert labels["attn"]["query"]["kernel"] == "matrix" and labels["conv"]["kernel"] == "matrix"
    assert labels["attn"]["query"]["bias"] == "fallback"  # (heads, head_dim): a vector per head
    if kind == "muon":
        tx = mo.muon(0.02, weight_dimension_numbers=spec, adam_learning_rate=3e-3)
    else:
        st = mo.Stiefel()
        params = nnx.state(model, nnx.Param)
        nnx.update(model, mo.project_params(params, st, weight_dimension_numbers=spec))
        tx = mo.manifold_muon(0.02, st, weight_dimension_numbers=spec, adam_learning_rate=3e-3)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    tok = jax.random.randint(jax.random.key(0), (8, 12), 0, 40)

    def loss_fn(m):
        logits = m(tok[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()

    @nnx.jit
    def step(m, o):
        loss, g = nnx.value_and_grad(loss_fn)(m)
        o.update(m, g)
        return loss

    losses = [float(step(model, opt)) for _ in range(25)]
    assert losses[-1] < 0.8 * losses[0], losses
    if kind == "manifold_muon":
        k = model.conv.kernel[...].reshape(-1, 16)  # (window·in, out)
        assert float(jnp.max(jnp.abs(k.T @ k - jnp.eye(16)))) < 1e-5
        q = model.attn.query.kernel[...]  # (in, heads, head_dim): per head (in, head_dim)
        qq = jnp.einsum("ihj,ihk->hjk", q, q)
        assert float(jnp.max(jnp.abs(qq - jnp.eye(4)))) < 1e-5


def test_unknown_layers_and_bad_splits_name_the_path():
    class Custom(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((4, 4)))

    with pytest.raises(ValueError, match="'w'.*overrides"):
        mo.flax_dimension_numbers(Custom())
    einsum = nnx.Einsum("bi,io->bo", (4, 8), rngs=nnx.Rngs(0), bias_shape=None)
    assert nnx.to_pure_dict(mo.flax_dimension_numbers(einsum)) == {
        "kernel": mo.MatrixSpec((0,), (1,))
    }
    summed = nnx.Einsum("bi,ij->b", (4, 8), rngs=nnx.Rngs(0), bias_shape=None)
    with pytest.raises(ValueError, match="'kernel'.*einsum.*overrides"):
        mo.flax_dimension_numbers(summed)
    spec = mo.flax_dimension_numbers(Custom(), overrides={"w": mo.MatrixSpec(0, 1)})
    assert nnx.to_pure_dict(spec) == {"w": mo.MatrixSpec(0, 1)}
    tx = mo.orthogonalize(weight_dimension_numbers={"w": mo.MatrixSpec(0, 1, split=3)})
    with pytest.raises(ValueError, match="'w'.*split into 3"):
        tx.update({"w": jnp.ones((4, 4))}, tx.init(None))


def test_a_leaf_with_more_than_two_axes_needs_a_spec():
    params = {"stack": {"kernel": jnp.ones((3, 8, 8))}, "w": jnp.eye(8)}
    for make in (lambda: mo.muon(0.1), lambda: mo.manifold_muon(0.1, mo.Stiefel())):
        with pytest.raises(ValueError, match="'stack/kernel'.*ambiguous"):
            make().init(params)
    with pytest.raises(ValueError, match="'stack/kernel'.*ambiguous"):
        mo.project_params(params, mo.Stiefel())
    # Named by a spec (or sent to the fallback by a pattern), it is fine.
    spec = {"stack": mo.MatrixSpec(1, 2), "w": mo.MatrixSpec(0, 1)}
    mo.project_params(params, mo.Stiefel(), weight_dimension_numbers=spec)
    mo.muon(0.1, fallback_patterns=("stack",)).init(params)


def test_layers_in_lists_and_sequentials_are_found():
    class Model(nnx.Module):
        def __init__(self):
            self.blocks = nnx.List([nnx.Linear(4, 6, rngs=nnx.Rngs(i)) for i in range(2)])
            self.seq = nnx.Sequential(nnx.Linear(6, 4, rngs=nnx.Rngs(2)), nnx.relu)

    spec = nnx.to_pure_dict(mo.flax_dimension_numbers(Model()))
    linear = {"kernel": mo.MatrixSpec((0,), (1,)), "bias": None}
    assert spec == {"blocks": {0: linear, 1: linear}, "seq": {"layers": {0: linear}}}
