"""One process of a multi-process run, or the one-process reference, for
``tests/test_multiprocess.py`` (which starts it; the device count is fixed when jax starts).

``python tests/multiprocess_worker.py pod PROCESS_ID PORT OUT CKPT`` is one of 2 processes ×
2 CPU devices joined by ``jax.distributed`` (gloo collectives);
``python tests/multiprocess_worker.py reference OUT CKPT`` is 1 process × 4 devices. Both
run the optimizers named in the environment variable ``MULTIPROCESS_OPTIMIZERS``
(comma-separated keys of ``MANIFOLDS``; all of them when it is unset). ``stiefel`` is always
among them: its run is the one checkpointed.

Both build the same parameters and gradients (seeded numpy) as global arrays sharded
``P("fsdp", None)`` over a 4-device mesh, each process giving only its own rows; call the
functions a user calls outside ``jit`` (``project_params``, ``init``, ``diagnostics``,
``label_params``, ``flax_dimension_numbers``) on them; and take 3 jitted steps of ``muon``
and ``manifold_muon`` on each manifold named under the ``"gather"`` and ``"owner"``
strategies.
The results are gathered (``process_allgather``) into ``OUT/<role>.npz``; the layer specs,
the labels, and the error of any call that raised, into ``OUT/<role>.json``.

The pod also saves an orbax checkpoint of ``manifold_muon(Stiefel)`` with ``"owner"``
(parameters and optimizer state) after step 2 into ``CKPT``. The reference, which runs
alongside, then waits for it, restores it onto its own 4-device mesh, onto 1 device and onto
a 2-device mesh that splits the matrices' other axis, and takes step 3 on each.
"""

from __future__ import annotations

import faulthandler
import json
import os
import pathlib
import resource
import signal
import sys
import time
import traceback

import jax

T0 = time.time()
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test's timeout asks for stacks
ROLE = sys.argv[1]
if ROLE == "pod":
    PROCESS_ID, PORT = int(sys.argv[2]), int(sys.argv[3])
    OUT, CKPT = pathlib.Path(sys.argv[4]), pathlib.Path(sys.argv[5])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{PORT}",
        num_processes=2,
        process_id=PROCESS_ID,
        initialization_timeout=60,
        heartbeat_timeout_seconds=30,
        shutdown_timeout_seconds=30,
    )
    assert jax.process_count() == 2 and jax.local_device_count() == 2, jax.devices()
else:
    PROCESS_ID = 0
    OUT, CKPT = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
    assert jax.process_count() == 1 and jax.device_count() == 4, jax.devices()

import flax.linen as nn  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, SingleDeviceSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import manifold_optax as mo  # noqa: E402

SHAPES = {"a": (16, 32), "b": (32, 16), "c": (16, 16), "d": (16, 16), "bias": (16,)}
MANIFOLDS = {
    "muon": None,
    "sphere": mo.Sphere(),
    "spectral_sphere": mo.SpectralSphere(),
    "stiefel": mo.Stiefel(),
    "oblique": mo.Oblique(),
}
STRATEGIES = ("gather", "owner")
STEPS = 3
CKPT_WAIT_S = 400
SAVED = ("stiefel", "owner")  # the run checkpointed after step 2
NAMES = os.environ.get("MULTIPROCESS_OPTIMIZERS", ",".join(MANIFOLDS)).split(",")
assert set(NAMES) <= MANIFOLDS.keys() and SAVED[0] in NAMES, NAMES
MESH = jax.make_mesh((4,), ("fsdp",))


def log(what):
    print(
        f"{time.time() - T0:6.1f}s {ROLE}{PROCESS_ID if ROLE == 'pod' else ''} {what}", flush=True
    )


def specs(axes):
    """``P(*axes)`` for the matrices, ``P(axes[0])`` for the bias."""
    return {k: P(*axes[: len(s)]) for k, s in SHAPES.items()}


def host_params():
    """Matrices with singular values from 1 down to 1/2. The processes' all-reduces sum in
    another order than one process's (float32 results a few ulps apart); the polar factor of
    a well-conditioned matrix (Stiefel's projection) keeps those ulps, where a Gaussian's
    (condition ≈ 6 at 32×16) grows them to 1e-6."""
    rng = np.random.default_rng(0)
    out = {}
    for k, s in SHAPES.items():
        if len(s) == 1:
            out[k] = rng.standard_normal(s).astype(np.float32)
            continue
        r = min(s)
        u = np.linalg.qr(rng.standard_normal((s[0], r)))[0]
        v = np.linalg.qr(rng.standard_normal((s[1], r)))[0]
        out[k] = ((u * np.linspace(1.0, 0.5, r)) @ v.T).astype(np.float32)
    return out


def host_grads(t):
    rng = np.random.default_rng(100 + t)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def from_process_local(x, sharding):
    """The global array ``x``, each process handing over only the rows its devices hold
    (``make_array_from_process_local_data``)."""
    rows = [i[0] for i in sharding.addressable_devices_indices_map(x.shape).values()]
    lo = min(r.start or 0 for r in rows)
    hi = max(x.shape[0] if r.stop is None else r.stop for r in rows)
    return jax.make_array_from_process_local_data(sharding, x[lo:hi], x.shape)


def from_callback(x, sharding):
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def place(tree, mesh, pspecs, make):
    return {k: make(v, NamedSharding(mesh, pspecs[k])) for k, v in tree.items()}


def gather(tree):
    """Every leaf's global value, on the host of every process."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def record(rows, prefix, tree):
    for path, v in jax.tree_util.tree_flatten_with_path(gather(tree))[0]:
        rows[prefix + jax.tree_util.keystr(path)] = v


def attempt(meta, label, f):
    """``f()``, or its error kept in ``meta["errors"][label]`` and ``None`` (for an error every
    process raises alike, while tracing: the run goes on to the other checks)."""
    try:
        return f()
    except Exception as e:
        meta["errors"][label] = "".join(traceback.format_exception_only(e))[-3000:]
        log(f"{label}: {type(e).__name__}")
        return None


def make_tx(name, mesh=None, strategy=None):
    sharding = None if mesh is None else mo.MsignSharding(mesh, strategy)
    if name == "muon":
        return mo.muon(0.02, sharding=sharding)
    return mo.manifold_muon(0.05, MANIFOLDS[name], sharding=sharding)


def step_fn(tx):
    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def train(rows, meta):
    """3 steps of every optimizer and strategy from the same start; the pod's Stiefel
    "owner" run saves a checkpoint after step 2. Returns that run's step function, its
    parameters and state after step 2 (a restore target) and the third gradient."""
    pspecs = specs(("fsdp", None))
    params0 = place(host_params(), MESH, pspecs, from_process_local)
    grads = [place(host_grads(t), MESH, pspecs, from_callback) for t in range(STEPS)]
    saved = None
    for name in NAMES:
        m = MANIFOLDS[name]
        # Outside jit, on arrays that span the processes.
        params = (
            params0
            if m is None
            else attempt(meta, f"{name}/project_params", lambda m=m: mo.project_params(params0, m))
        )
        if params is None:
            continue
        record(rows, f"{name}/projected", params)
        log(f"{name} projected")
        for strategy in STRATEGIES:
            key = f"{name}/{strategy}"
            tx = make_tx(name, MESH, strategy)
            state = attempt(meta, f"{key}/init", lambda tx=tx, params=params: tx.init(params))
            if state is None:
                continue
            log(f"{key} init")
            step = step_fn(tx)
            p, s = params, state
            for t in range(STEPS):
                p, s = step(p, s, grads[t])
                record(rows, f"{key}/step{t + 1}/params", p)
                if (name, strategy) == SAVED and t == 1:
                    if ROLE == "pod":
                        save(p, s)
                    saved = step, p, s, grads[2]
            # The state gathers (every leaf a global array) and is finite.
            meta["state_finite"][key] = bool(
                all(np.all(np.isfinite(x)) for x in jax.tree.leaves(gather(s)))
            )
            log(f"{key} 3 steps")
            if m is not None and strategy == "owner":
                # Outside jit: each leaf's distance, and its multiplier inside the state.
                attempt(
                    meta,
                    f"{name}/diagnostics",
                    lambda p=p, m=m, s=s, name=name: record(
                        rows, f"{name}/diagnostics", mo.diagnostics(p, m, s)
                    ),
                )
    if ROLE == "pod" and saved is None and PROCESS_ID == 0:
        (CKPT / "not_saved").touch()  # the reference need not wait
    return saved


def save(params, state):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(CKPT / "step2", {"params": params, "opt_state": state})
        ckptr.wait_until_finished()
    multihost_utils.sync_global_devices("checkpoint saved")
    if PROCESS_ID == 0:
        (CKPT / "saved").touch()


def restore(params, state):
    """The checkpoint, placed like ``params`` and ``state`` (whose values are not used)."""
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        {"params": params, "opt_state": state},
    )
    with ocp.StandardCheckpointer() as ckptr:
        out = ckptr.restore(CKPT / "step2", target)
    return out["params"], out["opt_state"]


def restore_elsewhere(rows, saved):
    """Once the pod has saved it: step 3 from the pod's checkpoint on the 4-device mesh (with
    the compiled step of ``saved``), on 1 device (no strategy) and on a 2-device mesh whose
    axis splits the matrices' columns (``"owner"`` over it)."""
    deadline = time.monotonic() + CKPT_WAIT_S
    while not (CKPT / "saved").exists():
        if (CKPT / "not_saved").exists() or saved is None:
            return  # the run failed before step 2 (its error is in the JSON)
        assert time.monotonic() < deadline, f"no checkpoint in {CKPT} after {CKPT_WAIT_S} s"
        time.sleep(0.5)
    step, p, s, g = saved
    p3, _ = step(*restore(p, s), g)
    record(rows, "restored/same_mesh/step3/params", p3)
    name = SAVED[0]
    one = SingleDeviceSharding(jax.devices()[0])
    mesh2 = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2])
    pspecs2 = specs((None, "model"))
    for where, tx, put in (
        ("one_device", make_tx(name), lambda t: jax.tree.map(lambda v: jax.device_put(v, one), t)),
        (
            "other_mesh",
            make_tx(name, mesh2, SAVED[1]),
            lambda t: place(t, mesh2, pspecs2, from_callback),
        ),
    ):
        # The restore target: the state's structure and the placement init gives it, from
        # parameters placed as wanted (their values are not used).
        params = mo.project_params(put(host_params()), MANIFOLDS[name])
        state = tx.init(params)
        p, s = restore(params, state)
        restored, wanted = jax.tree.leaves((p, s)), jax.tree.leaves((params, state))
        assert all(
            a.sharding.is_equivalent_to(b.sharding, a.ndim)
            for a, b in zip(restored, wanted, strict=True)
        ), where
        p3, _ = step_fn(tx)(p, s, put(host_grads(2)))
        record(rows, f"restored/{where}/step3/params", p3)
        log(f"restored on {where}")


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16)(nn.relu(nn.Dense(32)(x)))


def layer_specs(meta):
    """``flax_dimension_numbers`` of a Linen model whose example input is a global array and
    of an NNX model whose parameters are global arrays; ``label_params`` of global arrays."""
    x = from_callback(np.ones((8, 16), np.float32), NamedSharding(MESH, P("fsdp", None)))
    linen = mo.flax_dimension_numbers(LinenMLP(), x)
    model = nnx.Linear(16, 32, rngs=nnx.Rngs(0))
    nnx.update(
        model,
        jax.tree.map(
            lambda v: from_callback(np.asarray(v), NamedSharding(MESH, P("fsdp"))),
            nnx.state(model, nnx.Param),
        ),
    )
    assert model.kernel[...].is_fully_addressable == (jax.process_count() == 1)
    nnx_specs = nnx.to_pure_dict(mo.flax_dimension_numbers(model))
    params = place(host_params(), MESH, specs(("fsdp", None)), from_process_local)
    is_spec = lambda v: v is None or isinstance(v, mo.MatrixSpec)
    meta["linen_dimension_numbers"] = jax.tree.map(repr, linen, is_leaf=is_spec)
    meta["nnx_dimension_numbers"] = jax.tree.map(repr, nnx_specs, is_leaf=is_spec)
    meta["labels"] = mo.label_params(params)


def main():
    rows, meta = {}, {"errors": {}, "state_finite": {}}
    attempt(meta, "layer_specs", lambda: layer_specs(meta))
    saved = train(rows, meta)
    if ROLE == "reference":
        restore_elsewhere(rows, saved)
    if PROCESS_ID == 0:
        np.savez(OUT / f"{ROLE}.npz", **rows)
        (OUT / f"{ROLE}.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    log(f"done ({resource.getrusage(resource.RUSAGE_SELF).ru_utime:.0f} s CPU)")


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        # Exit now: jax.distributed's shutdown would wait for the other process.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if ROLE == "pod":
        jax.distributed.shutdown()
