"""Timing helpers shared by the benchmark scripts: interleaved repetitions, medians."""

from __future__ import annotations

import statistics
import time

import jax


def time_interleaved(
    fns: dict,
    args: dict,
    reps: int = 7,
    warmup: int = 1,
    min_sample_s: float = 0.02,
    *,
    samples: bool = False,
) -> dict:
    """Median wall time (seconds per call) of each jitted ``fns[k](*args[k])``; with
    ``samples=True`` the list of per-round samples instead (round ``i`` of every candidate
    ran back to back, so ratios taken round by round cancel the machine's slow drifts).

    Repetitions are interleaved so that slow drifts of the machine hit every candidate alike;
    each sample runs a candidate enough times back to back to last ``min_sample_s`` (so
    sub-millisecond calls are not dominated by timer and dispatch noise).
    """
    inner = {}
    for k, f in fns.items():
        for _ in range(warmup):
            jax.block_until_ready(f(*args[k]))
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args[k]))
        one = max(time.perf_counter() - t0, 1e-6)
        inner[k] = max(1, int(min_sample_s / one))
    runs = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            # One untimed call first: the previous candidate's threads (e.g. LAPACK's, after an
            # eigensolver) can keep the cores busy for a while and would be billed to this one
            # (measured: Stiefel 1.55× muon alone, 2.03× right after the exact-norm sphere).
            jax.block_until_ready(f(*args[k]))
            t0 = time.perf_counter()
            for _ in range(inner[k]):
                out = f(*args[k])
            jax.block_until_ready(out)
            runs[k].append((time.perf_counter() - t0) / inner[k])
    if samples:
        return runs
    return {k: statistics.median(v) for k, v in runs.items()}
