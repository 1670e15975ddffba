"""dualize is the argmax of ⟨g, t⟩ over the unit ball of each norm, and dual_norm is that max."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import manifold_optax as mo

NORMS = mo.NORMS


def _unit(norm, t):
    return t / float(mo.primal_norm(norm, t))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", [(12, 7), (5, 16), (9, 9)])
def test_dualize_is_unit_argmax_and_dual_norm_is_the_max(norm, shape, rng):
    g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    t = mo.dualize_array(norm, g, steps=10)  # accurate msign for the spectral family
    value = float(jnp.vdot(g, t))
    # Unit norm and the value equals the dual norm (closed form).
    np.testing.assert_allclose(float(mo.primal_norm(norm, t)), 1.0, rtol=1e-4)
    np.testing.assert_allclose(value, float(mo.dual_norm(norm, g)), rtol=1e-4)
    # No random unit-norm competitor does better, nor do perturbations of the optimum.
    for _ in range(200):
        c = _unit(norm, jnp.asarray(rng.standard_normal(shape), jnp.float32))
        assert float(jnp.vdot(g, c)) <= value * (1 + 1e-5)
    for eps in (1e-1, 1e-2):
        c = _unit(norm, t + eps * jnp.asarray(rng.standard_normal(shape), jnp.float32))
        assert float(jnp.vdot(g, c)) <= value * (1 + 1e-5)


def test_closed_forms(rng):
    g = jnp.asarray(rng.standard_normal((6, 10)), jnp.float32)
    np.testing.assert_allclose(mo.dualize_array("sign", g), np.sign(g))
    np.testing.assert_allclose(mo.dualize_array("frobenius", g), g / np.linalg.norm(g), rtol=1e-6)
    np.testing.assert_allclose(
        mo.dualize_array("rms", g, steps=10),
        np.sqrt(10 / 6) * np.asarray(mo.msign_svd(g)),
        atol=1e-4,
    )
    rows = np.asarray(mo.dualize_array("row", g))
    np.testing.assert_allclose(np.sqrt((rows**2).mean(axis=1)), 1.0, rtol=1e-5)
    cols = np.asarray(mo.dualize_array("column", g))
    # The operator norm RMS→ℓ∞: every column of norm 1/√d_in.
    np.testing.assert_allclose(np.sqrt(6) * np.linalg.norm(cols, axis=0), 1.0, rtol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_zero_gradient_dualizes_to_zero(norm):
    out = mo.dualize_array(norm, jnp.zeros((4, 3)))
    assert np.all(np.asarray(out) == 0)


def test_unknown_norm_names_accepted_ones():
    with pytest.raises(ValueError, match="accepted names"):
        mo.dualize("nuclear")
    with pytest.raises(ValueError, match="accepted names"):
        mo.dual_norm("l1", jnp.ones((2, 2)))
    with pytest.raises(ValueError, match=r"'b'.*accepted"):
        mo.dualize({"a": "spectral", "b": "lp"}).update(
            {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}, optax_empty()
        )


def optax_empty():
    import optax

    return optax.EmptyState()


def test_dualize_tree_of_norms_and_vectors(rng):
    tree = {"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32), "b": jnp.ones(4) * 3}
    tx = mo.dualize({"w": "spectral", "b": "rms"}, ns_steps=10)
    out, _ = tx.update(tree, tx.init(tree))
    np.testing.assert_allclose(out["w"], mo.msign_svd(tree["w"]), atol=1e-4)
    # A bias as a (1, d) matrix under RMS→RMS: unit RMS.
    np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(out["b"]) ** 2)), 1.0, rtol=1e-5)
    jax.jit(tx.update)(tree, tx.init(tree))
