"""The matmul FLOP counter of the benchmarks, and msign's FLOPs against their documented formulas.

``benchmarks/_flops.py`` is what step_bench divides to state each step's FLOP floor; msign's
counts are MATH.md §2's formulas (an extra product in the iteration would change them).
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

import manifold_optax as mo

_spec = importlib.util.spec_from_file_location(
    "_flops", pathlib.Path(__file__).parents[1] / "benchmarks" / "_flops.py"
)
_flops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_flops)
matmul_flops = _flops.matmul_flops


def test_counts_products_scans_and_the_cheapest_branch():
    a, b = jnp.ones((3, 8, 16)), jnp.ones((3, 16, 4))
    assert matmul_flops(jnp.matmul, a, b).flops == 2 * 3 * 8 * 4 * 16

    def looped(x):  # 5 products of 8×8 by 8×8 in a scan
        return jax.lax.fori_loop(0, 5, lambda i, y: y @ x, x)

    assert matmul_flops(looped, jnp.ones((8, 8))).flops == 5 * 2 * 8**3

    def branchy(x, p):  # the fallback branch (two products) is not the counted path
        return jax.lax.cond(p, lambda x: x, lambda x: (x @ x) @ x, x)

    count = matmul_flops(branchy, jnp.ones((8, 8)), True)
    assert count == (0, 0)


@pytest.mark.parametrize("shape", [(64, 64), (64, 256), (256, 64), (2, 48, 96)])
def test_msign_flops_match_the_documented_formulas(shape):
    """Standard iteration: ``steps·(4m²n + 2m³)``; Gram Newton–Schulz with its one restart
    after step 2 (5 steps): ``8m²n + 28m³`` per matrix (MATH.md §2)."""
    x = jnp.ones(shape)
    *batch, rows, cols = shape
    m, n = min(rows, cols), max(rows, cols)
    k = 2 if batch else 1
    standard = matmul_flops(lambda x: mo.msign(x, steps=5, method="standard"), x)
    gram = matmul_flops(lambda x: mo.msign(x, steps=5, method="gram"), x)
    assert standard.flops == mo.newton_schulz_flops(shape, 5)
    assert gram.flops == k * (8 * m * m * n + 28 * m**3)
    assert standard.while_loops == gram.while_loops == 0


@pytest.mark.parametrize("shape", [(64, 64), (256, 64), (64, 256)])
def test_stiefel_step_adds_the_documented_products_to_muon(shape):
    """manifold_muon's Stiefel step on a point of the manifold: ``muon``'s msign plus, per
    square matrix, ``GWᵀ``, ``K·W``, ``VVᵀ`` and ``p(A)·V`` (8m³), per n×m one ``W·Y``,
    ``WᵀΦ``, ``W·c``, ``VᵀV`` and ``V·p(A)`` (10nm²); the polish's counted path is the cubic
    (its factor has no product), which a step at a small learning rate takes. A product
    outside the conditional (e.g. the quintic's A²) would add 2m³."""
    W = mo.project_params(jax.random.normal(jax.random.PRNGKey(0), shape), mo.Stiefel())
    G = jax.random.normal(jax.random.PRNGKey(1), shape)
    counts = {}
    for name, tx in {
        "muon": mo.muon(0.02),
        "stiefel": mo.manifold_muon(0.02, mo.Stiefel()),
    }.items():
        s = tx.init(W)
        counts[name] = matmul_flops(lambda g, s, p, tx=tx: tx.update(g, s, p), G, s, W).flops
    m, n = min(shape), max(shape)
    extra = 8 * m**3 if m == n else 10 * n * m * m
    assert counts["stiefel"] - counts["muon"] == extra
