"""Two processes × 2 CPU devices on JAX's multi-controller runtime (``jax.distributed``, gloo
collectives, 127.0.0.1) against one process × 4 devices: ``muon`` and ``manifold_muon`` on
Stiefel (on every manifold in the slow suite) under ``"gather"`` and ``"owner"``, from global arrays built from process-local
data; the functions called outside ``jit`` on such arrays; an orbax checkpoint written by the
two processes, restored by one process on other meshes. The runs are
``tests/multiprocess_worker.py``, in subprocesses (the device count is fixed when jax
starts)."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parents[1]
WORKER = ROOT / "tests" / "multiprocess_worker.py"
# The default suite runs the pod on muon and Stiefel (the checkpointed run); the other
# manifolds take the same sharded paths, and the slow suite re-checks them all in the pod.
SUITES = {
    "muon+stiefel": ("muon", "stiefel"),
    "every_manifold": ("muon", "sphere", "spectral_sphere", "stiefel", "oblique"),
}
STRATEGIES = ("gather", "owner")
LEAVES = ("a", "b", "bias", "c", "d")
TIMEOUT_S = 420  # the three processes together, on a loaded 2-core machine

# Under pytest-xdist, the whole module runs on one worker: its session-scoped fixture starts
# the subprocesses once.
pytestmark = pytest.mark.xdist_group("multiprocess_subprocesses")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices, names):
    env = dict(os.environ, JAX_PLATFORMS="cpu", MULTIPROCESS_OPTIMIZERS=",".join(names))
    # The fusion emitters off: XLA:CPU compiles these programs in half the time.
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "")
        + " --xla_cpu_use_fusion_emitters=false"
        + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    return env


def _run_all(commands, logs):
    """Run the ``(command, env)`` pairs together; on a failure or past ``TIMEOUT_S`` every
    one still running is killed (SIGKILL: jax handles SIGTERM; past the timeout, after
    SIGUSR1 has them print their stacks) and the test fails with their output."""
    procs = []
    for i, (cmd, env) in enumerate(commands):
        with open(logs / f"{i}.log", "wb") as out:
            procs.append(
                subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            )
    deadline = time.monotonic() + TIMEOUT_S
    failed = None
    try:
        while failed is None and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                failed = "a process failed"
            elif time.monotonic() > deadline:
                failed = f"timed out after {TIMEOUT_S} s"
            else:
                time.sleep(0.2)
        if failed is None and any(p.returncode != 0 for p in procs):
            failed = "a process failed"
    finally:
        alive = [p for p in procs if p.poll() is None]
        if alive and failed and failed.startswith("timed out"):
            for p in alive:  # the workers' faulthandler writes every thread's stack
                os.kill(p.pid, signal.SIGUSR1)
            time.sleep(2)
        for p in alive:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
    if failed:
        tails = [
            f"--- {' '.join(c[2:4])} (exit {p.returncode}):\n"
            + (logs / f"{i}.log").read_text(errors="replace")[-6000:]
            for i, ((c, _), p) in enumerate(zip(commands, procs, strict=True))
        ]
        pytest.fail(f"{failed}\n" + "\n".join(tails), pytrace=False)


@pytest.fixture(
    scope="session",
    params=["muon+stiefel", pytest.param("every_manifold", marks=pytest.mark.slow)],
)
def runs(request, tmp_path_factory):
    """The pod's 2 processes and the reference, together (the reference restores the pod's
    checkpoint once it is written), on the optimizers of ``SUITES[request.param]``, returned
    under ``"names"``. Session-scoped: under ``--dist loadgroup`` the worker may run other
    modules' tests between this module's, and a module-scoped fixture would start the
    processes again."""
    names = SUITES[request.param]
    out = tmp_path_factory.mktemp("multiprocess")
    ckpt, logs = out / "ckpt", out / "logs"
    ckpt.mkdir()
    logs.mkdir()
    port = _free_port()
    pod = [
        (
            [sys.executable, str(WORKER), "pod", str(i), str(port), str(out), str(ckpt)],
            _env(2, names),
        )
        for i in range(2)
    ]
    reference = (
        [sys.executable, str(WORKER), "reference", str(out), str(ckpt)],
        _env(4, names),
    )
    t0 = time.monotonic()
    _run_all([*pod, reference], logs)
    print(f"pod and reference: {time.monotonic() - t0:.0f} s")
    return {"names": names} | {
        role: (dict(np.load(out / f"{role}.npz")), json.loads((out / f"{role}.json").read_text()))
        for role in ("pod", "reference")
    }


def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def _keys(prefix):
    return {f"{prefix}['{k}']" for k in LEAVES}


def test_two_processes_equal_one(runs):
    """3 steps (and the projected start) on 2 processes × 2 devices equal 1 process × 4
    devices. The processes' all-reduces (gloo) sum in another order than one process's, so the
    float32 results may differ by a few ulps: ≤ 1e-6 relative (Frobenius) per leaf."""
    (pod, _), (ref, _), names = runs["pod"], runs["reference"], runs["names"]
    want = set()
    for name in names:
        want |= _keys(f"{name}/projected")
        for strategy in STRATEGIES:
            for t in (1, 2, 3):
                want |= _keys(f"{name}/{strategy}/step{t}/params")
    assert want <= ref.keys(), sorted(want - ref.keys())
    assert want <= pod.keys(), sorted(want - pod.keys())
    rel = {k: _rel(pod[k], ref[k]) for k in sorted(want)}
    bad = sorted(((v, k) for k, v in rel.items() if not v <= 1e-6), reverse=True)
    assert not bad, f"{len(bad)} of {len(rel)} leaves differ; the worst: {bad[:8]}"
    # The steps move the parameters (a run that did nothing would also agree).
    for name in names:
        assert _rel(ref[f"{name}/gather/step3/params['a']"], ref[f"{name}/projected['a']"]) > 1e-3


def test_outside_jit_on_global_arrays(runs):
    """project_params, init, diagnostics, label_params and flax_dimension_numbers (Linen with
    a global example input, NNX with global parameters) run outside jit on arrays that span
    the processes, and give what one process gives."""
    (pod, pod_meta), (ref, ref_meta), names = runs["pod"], runs["reference"], runs["names"]
    assert pod_meta["errors"] == {}, "\n".join(f"{k}: {v}" for k, v in pod_meta["errors"].items())
    assert ref_meta["errors"] == {}, "\n".join(f"{k}: {v}" for k, v in ref_meta["errors"].items())
    for key in ("linen_dimension_numbers", "nnx_dimension_numbers", "labels"):
        assert pod_meta[key] == ref_meta[key], key
    nnx_dims, linen_dims = pod_meta["nnx_dimension_numbers"], pod_meta["linen_dimension_numbers"]
    assert nnx_dims["kernel"].startswith("MatrixSpec(") and nnx_dims["bias"] == "None", nnx_dims
    for layer in ("Dense_0", "Dense_1"):
        assert linen_dims[layer]["kernel"].startswith("MatrixSpec("), linen_dims
        assert linen_dims[layer]["bias"] == "None", linen_dims
    assert pod_meta["labels"] == dict.fromkeys("abcd", "matrix") | {"bias": "fallback"}
    assert pod_meta["state_finite"] == dict.fromkeys(
        (f"{n}/{s}" for n in names for s in STRATEGIES), True
    )
    for name in names[1:]:
        for leaf in "abcd":
            k = f"{name}/diagnostics['{leaf}']"
            # The distance is relative to the manifold's scale (~1e-7 on it).
            d, d_ref = float(pod[f"{k}['distance']"]), float(ref[f"{k}['distance']"])
            assert d <= 1e-4 and abs(d - d_ref) <= 1e-5, (k, d, d_ref)
            # The online dual ascent's multiplier, where diagnostics finds it in the state.
            m = f"{k}['multiplier_norm']"
            assert (m in pod) == (m in ref) and np.all(np.isfinite(pod.get(m, 0.0))), k


def test_checkpoint_restores_on_other_meshes(runs):
    """An orbax checkpoint (parameters and optimizer state of manifold_muon(Stiefel) with
    "owner", after step 2) written by the 2 processes, restored by 1 process; step 3 there is
    the pod's step 3 bit for bit on a 4-device mesh like the pod's. On a 2-device mesh that
    splits the matrices' columns, the owner strategy deals the stacks over 2 devices instead
    of 4 (other stack shapes per device, other fused products), and on 1 device XLA compiles
    another program (nothing to partition): their products round differently in the last
    bits, ≤ 1e-6 relative there."""
    (pod, pod_meta), (ref, ref_meta) = runs["pod"], runs["reference"]
    step3 = "stiefel/owner/step3/params"
    restored = {k for k in ref if k.startswith("restored/")}
    assert len(restored) == 3 * len(LEAVES), (pod_meta["errors"], ref_meta["errors"])
    for where in ("same_mesh", "other_mesh", "one_device"):
        for leaf in LEAVES:
            got, want = ref[f"restored/{where}/step3/params['{leaf}']"], pod[f"{step3}['{leaf}']"]
            if where != "same_mesh":
                assert _rel(got, want) <= 1e-6, (where, leaf, _rel(got, want))
            else:
                assert np.array_equal(got, want), (where, leaf, _rel(got, want))
