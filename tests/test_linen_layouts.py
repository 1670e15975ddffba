"""Linen layer shapes: flax_dimension_numbers on a Linen module gives every parameter the matrix
it should be, stacked axes found wherever nn.scan / nn.vmap put them, with no FLOPs spent."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import manifold_optax as mo


def _msign64(a):
    u, _, vt = np.linalg.svd(a, full_matrices=False)
    return u @ vt


def _leaf(tree, path):
    for k in path:
        tree = tree[k]
    return tree


# Each case: a module, its example input, the kernel's path, options, and the intended matrices
# written independently of the library: ``to_views(kernel) → [matrices]``.
def _cases():
    x2 = jnp.zeros((2, 12))
    seq = jnp.zeros((2, 5, 16))

    class Scanned(nn.Module):
        axis: int

        @nn.compact
        def __call__(self, x):
            class Body(nn.Module):
                @nn.compact
                def __call__(self, h, _):
                    return nn.Dense(12, name="dense")(h), None

            s = nn.scan(
                Body,
                variable_axes={"params": self.axis},
                split_rngs={"params": True},
                length=3,
            )
            return s(name="layers")(x, None)[0]

    class Vmapped(nn.Module):
        @nn.compact
        def __call__(self, x):
            v = nn.vmap(
                nn.Dense,
                variable_axes={"params": 1},
                split_rngs={"params": True},
                in_axes=None,
                out_axes=0,
                axis_size=3,
            )
            return v(20, name="experts")(x)

    return {
        "dense": (nn.Dense(20), x2, ("kernel",), {}, lambda k: [k]),
        "fused_qkv": (
            nn.Dense(24),
            x2,
            ("kernel",),
            {"split_fused": 3},
            lambda k: [k[:, 8 * i : 8 * (i + 1)] for i in range(3)],
        ),
        "dense_general": (
            nn.DenseGeneral((2, 5), axis=(-2, -1)),
            jnp.zeros((2, 3, 4)),
            ("kernel",),
            {},
            lambda k: [k.reshape(12, 10)],
        ),
        "dense_general_batch": (
            nn.DenseGeneral(6, axis=-1, batch_dims=(0,)),
            jnp.zeros((3, 2, 8)),
            ("kernel",),
            {},
            lambda k: [k[i] for i in range(3)],
        ),
        "mha_query_joint": (
            nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16),
            seq,
            ("query", "kernel"),
            {},
            lambda k: [k.reshape(16, 16)],
        ),
        "mha_query_split": (
            nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16),
            seq,
            ("query", "kernel"),
            {"heads": "split"},
            lambda k: [k[:, i, :] for i in range(4)],
        ),
        "mha_out_joint": (
            nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16),
            seq,
            ("out", "kernel"),
            {},
            lambda k: [k.reshape(16, 16)],
        ),
        "mha_out_split": (
            nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16),
            seq,
            ("out", "kernel"),
            {"heads": "split"},
            lambda k: [k[i] for i in range(4)],
        ),
        "einsum_joint": (
            nn.Einsum((3, 8, 6), "bi,eio->beo", use_bias=False),  # one matrix i × (e·o)
            jnp.zeros((2, 8)),
            ("kernel",),
            {},
            lambda k: [np.transpose(k, (1, 0, 2)).reshape(8, 18)],
        ),
        "conv1d": (nn.Conv(6, (3,)), seq, ("kernel",), {}, lambda k: [k.reshape(-1, 6)]),
        "conv2d": (
            nn.Conv(16, (3, 3)),
            jnp.zeros((1, 6, 6, 8)),
            ("kernel",),
            {},
            lambda k: [k.reshape(72, 16)],
        ),
        "conv3d": (
            nn.Conv(4, (2, 2, 2)),
            jnp.zeros((1, 4, 4, 4, 3)),
            ("kernel",),
            {},
            lambda k: [k.reshape(24, 4)],
        ),
        "einsum": (
            nn.Einsum((3, 8, 6), "bei,eio->beo", use_bias=False),  # e: experts, a batch
            jnp.zeros((2, 3, 8)),
            ("kernel",),
            {},
            lambda k: [k[i] for i in range(3)],
        ),
        "scan_axis0": (
            Scanned(0),
            x2,
            ("layers", "dense", "kernel"),
            {},
            lambda k: [k[i] for i in range(3)],
        ),
        "scan_axis1_maxtext": (
            Scanned(1),
            x2,
            ("layers", "dense", "kernel"),
            {},
            lambda k: [k[:, i, :] for i in range(3)],
        ),
        "vmap_axis1": (
            Vmapped(),
            x2,
            ("experts", "kernel"),
            {},
            lambda k: [k[:, i, :] for i in range(3)],
        ),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_linen_layer_is_orthogonalized_as_its_intended_matrix(name):
    module, x, path, options, to_views = CASES[name]
    params = module.init(jax.random.key(0), x)["params"]
    specs = mo.flax_dimension_numbers(module, x, **options)
    assert jax.tree.structure(specs, is_leaf=lambda s: s is None or mo.labels.is_dim_nums(s)) == (
        jax.tree.structure(params)
    )
    rng = np.random.default_rng(0)
    with jax.enable_x64():
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
        tx = mo.orthogonalize(
            10, weight_dimension_numbers=specs, precision=jax.lax.Precision.HIGHEST
        )
        out, _ = tx.update(grads, tx.init(None))
    kernel_in, kernel_out = np.asarray(_leaf(grads, path)), np.asarray(_leaf(out, path))
    for g, o in zip(to_views(kernel_in), to_views(kernel_out), strict=True):
        np.testing.assert_allclose(o, _msign64(g), atol=1e-6)
    # The vectors (biases, scales) pass through unchanged.
    for p, leaf in jax.tree_util.tree_leaves_with_path(out):
        if leaf.ndim < 2:
            np.testing.assert_array_equal(
                np.asarray(leaf), np.asarray(_leaf(grads, [k.key for k in p]))
            )


def test_linen_reads_the_model_abstractly_and_sends_embeddings_to_the_fallback():
    class LM(nn.Module):
        @nn.compact
        def __call__(self, tokens, train: bool):
            h = nn.Embed(50, 16, name="embed")(tokens)
            h = nn.Dropout(0.1, deterministic=not train)(h)
            h = nn.Dense(16, name="multi_head")(h)
            return nn.Dense(50, name="lm_head")(h)

    tokens = jax.ShapeDtypeStruct((2, 7), jnp.int32)  # no data: the init is only traced
    specs = mo.flax_dimension_numbers(LM(), tokens, train=True)
    assert specs["embed"]["embedding"] is None
    assert specs["lm_head"]["kernel"] is None
    # Whole path components: "multi_head" is not a head.
    assert specs["multi_head"]["kernel"] == mo.MatrixSpec((0,), (1,))
    assert mo.flax_dimension_numbers(LM(), tokens, train=False, fallback_patterns=())["lm_head"][
        "kernel"
    ] == mo.MatrixSpec((0,), (1,))
    over = mo.flax_dimension_numbers(LM(), tokens, train=True, overrides={"multi_head": None})
    assert over["multi_head"]["kernel"] is None


def test_linen_stacked_axis_ambiguity_is_an_error_naming_the_path_and_scan_axis_resolves_it():
    class Body(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return nn.Dense(8, name="dense")(h), None

    class Square(nn.Module):  # 8 layers of 8×8: the stacked axis cannot be told by shape
        @nn.compact
        def __call__(self, x):
            s = nn.scan(Body, variable_axes={"params": 1}, split_rngs={"params": True}, length=8)
            return s(name="layers")(x, None)[0]

    x = jnp.zeros((2, 8))
    with pytest.raises(ValueError, match="'layers/dense/kernel'.*scan_axis"):
        mo.flax_dimension_numbers(Square(), x)
    specs = mo.flax_dimension_numbers(Square(), x, scan_axis={"layers": 1})
    assert specs["layers"]["dense"]["kernel"] == mo.MatrixSpec((0,), (2,))


def test_linen_needs_its_example_inputs_and_unknown_layers_name_the_path():
    with pytest.raises(ValueError, match="example inputs"):
        mo.flax_dimension_numbers(nn.Dense(4))

    class Custom(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.ones, (x.shape[-1], 4))
            return x @ w

    with pytest.raises(ValueError, match="'w'.*overrides"):
        mo.flax_dimension_numbers(Custom(), jnp.zeros((2, 3)))
    specs = mo.flax_dimension_numbers(
        Custom(), jnp.zeros((2, 3)), overrides={"w": mo.MatrixSpec(0, 1)}
    )
    assert specs == {"w": mo.MatrixSpec(0, 1)}


def test_the_docs_linen_example_trains():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "docs" / "examples" / "linen_muon.py"
    spec = importlib.util.spec_from_file_location("linen_muon", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    first, last = module.main(steps=5)
    assert np.isfinite(last) and last < first
