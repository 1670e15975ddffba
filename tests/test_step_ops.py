"""The accelerator path (``mo.lowering_for``) computes what the CPU path computes, and
``benchmarks/step_ops.py`` counts the kernels of a lowered program as it says."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import manifold_optax as mo
from manifold_optax import _platform
from manifold_optax.manifolds._ops import distances_from_identity, sums

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
import step_ops  # noqa: E402


def test_lowering_for_nests_restores_and_rejects_bad_names():
    base = _platform.platform()
    with mo.lowering_for("gpu"):
        assert _platform.platform() == "gpu" and not _platform.on_cpu()
        with mo.lowering_for("cpu"):
            assert _platform.on_cpu()
        assert _platform.platform() == "gpu"
    assert _platform.platform() == base
    with pytest.raises(ValueError, match="lowering_for: target must be one of"):
        with mo.lowering_for("cuda"):
            pass


@pytest.mark.parametrize("path", ["cpu", "gpu"])
def test_fused_reductions_equal_separate_ones(path, rng):
    a = jnp.asarray(rng.standard_normal((3, 8, 5)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((3, 8, 5)), jnp.float32)
    with mo.lowering_for(path):
        s1, s2 = jax.jit(lambda a, b: sums(a * a, a * b))(a, b)
        A = jnp.eye(5) + 1e-3 * (a[:, :5, :] + jnp.swapaxes(a[:, :5, :], -1, -2))
        f, rows = jax.jit(distances_from_identity)(A)
    a64, b64, A64 = (np.asarray(x, np.float64) for x in (a, b, A))
    np.testing.assert_allclose(s1, (a64 * a64).sum((-2, -1)), rtol=1e-5)
    np.testing.assert_allclose(s2, (a64 * b64).sum((-2, -1)), rtol=1e-5, atol=1e-5)
    D = A64 - np.eye(5)
    np.testing.assert_allclose(f, np.sqrt((D * D).sum((-2, -1))), rtol=1e-5)
    np.testing.assert_allclose(rows, np.abs(D).sum(-1).max(-1), rtol=1e-5)


@pytest.mark.parametrize(
    "manifold",
    [mo.Sphere(2.0), mo.Stiefel(), mo.SpectralSphere(1.5)],
    ids=["sphere", "stiefel", "spectral_sphere"],
)
def test_accelerator_path_takes_the_cpu_paths_steps(manifold, rng):
    """Three steps on two same-shape matrices and a third: the accelerator path (batched,
    unrolled, fused reductions) agrees with the CPU path to float32 round-off (the products
    are the same up to their order: a few ε times the number of products)."""
    shapes = {"a": (48, 32), "b": (48, 32), "c": (32, 64)}
    params = mo.project_params(
        {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()},
        manifold,
    )
    grads = [
        {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
        for _ in range(3)
    ]
    out = {}
    for path in ("cpu", "gpu"):
        tx = mo.manifold_muon(0.05, manifold)
        p, s = params, tx.init(params)
        with mo.lowering_for(path):
            step = jax.jit(lambda p, s, g, tx=tx: tx.update(g, s, p))
            for g in grads:
                u, s = step(p, s, g)
                p = optax.apply_updates(p, u)
        out[path] = p
    for k in shapes:
        a, b = np.asarray(out["cpu"][k]), np.asarray(out["gpu"][k])
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a), k
        assert float(manifold.distance(out["gpu"][k])) <= 1e-5, k


def _count(f, *args):
    return step_ops.count_ops(jax.jit(f).trace(*args).lower())


def test_counter_multiplies_loop_bodies_and_takes_the_cheapest_branch():
    x = jnp.ones((4, 4))
    c = _count(lambda x: jax.lax.fori_loop(0, 7, lambda i, a: a @ a, x), x)
    assert c["dot_general"] == 7 and c["while_trips"] == 7 and c["dynamic_while"] == 0
    c = _count(lambda x: jax.lax.fori_loop(2, 7, lambda i, a: jnp.sum(a) * (a @ a), x), x)
    assert c["dot_general"] == 5 and c["reduce"] == 5
    c = _count(
        lambda x: jax.lax.cond(x[0, 0] > 0, lambda a: a @ a @ a, lambda a: jnp.sum(a) + a, x), x
    )
    assert c["dot_general"] == 0 and c["reduce"] == 1
    c = _count(lambda x: jax.lax.while_loop(lambda a: jnp.sum(a) < 10, lambda a: a @ a, x), x)
    assert c["dynamic_while"] == 1 and c["dot_general"] == 1
    c = _count(lambda x: jnp.linalg.cholesky(x @ x.T + jnp.eye(4)) + jnp.exp(x), x)
    assert c["dot_general"] == 1 and c["custom_call"] + c["linalg"] == 1


def test_step_count_is_deterministic():
    tree = {"w": jnp.ones((32, 16)), "v": jnp.ones((32, 16)), "b": jnp.ones(16)}
    tx = mo.manifold_muon(0.02, mo.Stiefel())
    params = mo.project_params(tree, mo.Stiefel())
    counts = []
    for _ in range(2):
        with mo.lowering_for("gpu"):
            counts.append(step_ops.count_ops(step_ops.lower_step(tx, params, params, None)))
    assert counts[0] == counts[1] and counts[0]["dot_general"] > 0


def test_manifold_steps_meet_their_kernel_count_goals():
    """The accelerator-path step of each manifold on the benchmark's tree (at d = 32: the
    counts do not depend on d) within its goal as a multiple of ``mo.muon``'s: sphere 1.1,
    Stiefel and spectral sphere 1.5, oblique 1.3."""
    goals = {"sphere": 1.1, "stiefel": 1.5, "spectral_sphere": 1.5, "oblique": 1.3}
    names = [step_ops.BASE] + [f"manifold_muon {name}" for name in goals]
    rows = {r["optimizer"]: r for r in step_ops.run(32, names)[0]}
    for name, goal in goals.items():
        ratio = rows[f"manifold_muon {name}"]["ratio_to_muon"]
        assert ratio <= goal, (name, ratio, rows[f"manifold_muon {name}"]["by_kind"])


def test_spectral_blocks_of_every_shape_sharing_a_gram_are_refined_as_one_batch(rng):
    """Three shapes whose short sides are equal (d×d, d×4d, 4d×d) share one
    Rayleigh–Ritz: two batched eigensolves per step in all, not two per shape; and the
    batch computes what refining each leaf alone computes (the same products per matrix)."""
    d = 16
    shapes = {"q": (d, d), "k": (d, d), "up": (d, 4 * d), "down": (4 * d, d)}
    sphere = mo.SpectralSphere(1.0, block=8)
    params = mo.project_params(
        {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}, sphere
    )
    grads = [
        {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
        for _ in range(2)
    ]
    out, eigh = {}, {}
    for group in (True, False):
        tx = mo.manifold_muon(0.05, sphere, group=group)
        p, s = params, tx.init(params)
        with mo.lowering_for("gpu"):
            lowered = step_ops.lower_step(tx, p, grads[0], None)
            eigh[group] = step_ops.count_ops(lowered)["custom_call"]
            step = jax.jit(lambda p, s, g, tx=tx: tx.update(g, s, p))
            for g in grads:
                u, s = step(p, s, g)
                p = optax.apply_updates(p, u)
        out[group] = (p, s)
    assert eigh == {True: 2, False: 2 * len(shapes)}, eigh
    for k in shapes:
        a, b = (np.asarray(out[g][0][k], np.float64) for g in (True, False))
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a), k
        assert abs(float(jnp.linalg.norm(out[True][0][k], 2)) - 1.0) <= 1e-5, k
