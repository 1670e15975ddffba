"""The sphere: vectors on the hypersphere, and the template itself — a manifold written with its
geometry alone (constraint through ``theta``, retraction, distance) trains through every
generic hook and computes what the built-in sphere's fused step computes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from manifold_harness import point

import manifold_optax as mo


@dataclasses.dataclass(frozen=True)
class GeometryOnlySphere(mo.Manifold):
    """``‖W‖_F = r`` from the template's abstract geometry only: no hook overridden."""

    radius: float = 1.0

    def theta(self, W, aux=None):
        return W / jnp.linalg.norm(W, axis=(-2, -1), keepdims=True)

    def retract(self, W, aux=None):
        return self.radius * W / jnp.linalg.norm(W, axis=(-2, -1), keepdims=True)

    def distance(self, W):
        return jnp.max(jnp.abs(jnp.linalg.norm(W, axis=(-2, -1)) - self.radius)) / self.radius


def test_a_manifold_from_its_geometry_alone_trains_like_the_builtin_sphere(rng):
    params = {
        "a": point(mo.Sphere(3.0), (32, 16), rng),
        "b": point(mo.Sphere(3.0), (2, 16, 24), rng),
    }
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
        for _ in range(5)
    ]
    out = {}
    for name, m in (("builtin", mo.Sphere(3.0)), ("template", GeometryOnlySphere(3.0))):
        tx = mo.manifold_muon(0.1, m, weight_dimension_numbers=mo.MatrixSpec(-2, -1))
        p, s = params, tx.init(params)
        step = jax.jit(tx.update)
        for g in grads:
            u, s = step(g, s, p)
            p = optax.apply_updates(p, u)
        out[name] = p
        for leaf in jax.tree.leaves(p):
            assert float(m.distance(leaf)) < 2e-6
    # Five steps of float32 round-off apart (the fused step sums its norms differently).
    for k in params:
        np.testing.assert_allclose(out["template"][k], out["builtin"][k], atol=2e-5, err_msg=k)


def test_vectors_live_on_the_hypersphere(rng):
    # A tree-prefix spec may put a vector on the sphere (Su's hypersphere: a (1, d) row).
    spec = {"w": None, "v": mo.Sphere(2.0)}
    params = mo.project_params(
        {"w": jnp.ones((4, 4)), "v": jnp.asarray(rng.standard_normal(12), jnp.float32)}, spec
    )
    np.testing.assert_allclose(jnp.linalg.norm(params["v"]), 2.0, rtol=1e-6)
    tx = mo.manifold_muon(0.1, spec)
    s = tx.init(params)
    for _ in range(3):
        g = {"w": jnp.ones((4, 4)), "v": jnp.asarray(rng.standard_normal(12), jnp.float32)}
        u, s = jax.jit(tx.update)(g, s, params)
        new = optax.apply_updates(params, u)
        assert float(jnp.max(jnp.abs(new["v"] - params["v"]))) > 1e-3  # it moves
        params = new
    np.testing.assert_allclose(jnp.linalg.norm(params["v"]), 2.0, rtol=2e-6)
