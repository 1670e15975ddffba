"""Shared test helpers: matrices with a chosen spectrum, float64 references."""

import os

# The suite checks what the programs compute, not their speed, and it is bound by compilation.
# So the tests (and the subprocesses and notebook kernels they start, which inherit the
# environment) compile with most of XLA's optimizations off, LLVM at level 0 and XLA:CPU's
# fusion emitters off (the loop emitters compile in about half the CPU time); a test of the
# optimized program itself turns them back on (see test_stiefel's HLO check). Set
# MANIFOLD_OPTAX_TEST_FULL_OPT=1 to run everything on the fully optimized code.
# This must run before jax is imported.
if not os.environ.get("MANIFOLD_OPTAX_TEST_FULL_OPT"):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    ).strip()
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"

# JAX's persistent compilation cache is off unless JAX_COMPILATION_CACHE_DIR names a folder.
# Under pytest-xdist (the README's `-n auto`) each worker then gets a folder of its own, so no
# two processes of one run share a cache.
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        os.environ["JAX_COMPILATION_CACHE_DIR"], os.environ["PYTEST_XDIST_WORKER"]
    )

import numpy as np
import pytest
from hypothesis import settings

# CI draws the same examples on every run (a red CI must mean a change, not a new draw);
# elsewhere each run draws new ones, and a failure found there is pinned with @example.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def matrix_with_spectrum(rng, rows, cols, sigma, *, batch=()):
    """A ``[*batch, rows, cols]`` float64 matrix ``U diag(sigma) Vᵀ`` with Haar-random U, V."""
    r = len(sigma)
    out = np.empty(batch + (rows, cols))
    for idx in np.ndindex(*batch):
        u, _ = np.linalg.qr(rng.standard_normal((rows, r)))
        v, _ = np.linalg.qr(rng.standard_normal((cols, r)))
        out[idx] = (u * np.asarray(sigma)) @ v.T
    return out


def log_uniform_spectrum(rng, rank, lo):
    """``rank`` singular values log-uniform on ``[lo, 1]``, with both ends present."""
    s = np.exp(rng.uniform(np.log(lo), 0.0, rank))
    s[0], s[-1] = 1.0, lo
    return np.sort(s)[::-1]


@pytest.fixture
def rng():
    return np.random.default_rng(0)
