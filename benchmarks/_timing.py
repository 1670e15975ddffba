"""Timing helpers shared by the benchmark scripts: interleaved repetitions, medians."""

from __future__ import annotations

import statistics
import time

import jax


def time_interleaved(fns: dict, args: dict, reps: int = 7, warmup: int = 1) -> dict:
    """Median wall time (seconds) of each jitted ``fns[k](*args[k])``, repetitions interleaved
    so that slow drifts of the machine hit every candidate alike."""
    for k, f in fns.items():
        for _ in range(warmup):
            jax.block_until_ready(f(*args[k]))
    samples = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args[k]))
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}
