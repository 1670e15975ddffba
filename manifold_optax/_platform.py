"""The platform the library's backend-dependent choices are made for.

A few choices depend on where the step runs: on CPU, short fixed loops stay loops, LAPACK
calls go one matrix at a time, large same-shape matrices are not stacked, and ``aᵀb``
materializes the transpose; on GPU and TPU the loops are unrolled (a while loop there reads
its predicate back to the host every iteration) and same-shape matrices are batched.
:func:`lowering_for` makes them for another platform while a step is traced.
"""

from __future__ import annotations

import contextlib
import threading

import jax

__all__ = ["lowering_for", "platform", "on_cpu"]

PLATFORMS = ("cpu", "gpu", "tpu")
_local = threading.local()


def platform() -> str:
    """The platform choices are made for: the innermost :func:`lowering_for`'s, else JAX's
    default backend."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else jax.default_backend()


def on_cpu() -> bool:
    return platform() == "cpu"


@contextlib.contextmanager
def lowering_for(target: str):
    """Trace steps with the choices made for ``target`` (``"cpu"``, ``"gpu"`` or ``"tpu"``).

    Within the block, the library unrolls its short fixed-count loops, batches same-shape
    matrices and LAPACK calls, and keeps transposes inside products as it does on an
    accelerator (``"gpu"``, ``"tpu"``), or keeps the loops and goes one matrix at a time as on
    a CPU (``"cpu"``). It changes how a step is traced, not what it computes: use it to lower
    or count the program an accelerator would run from a CPU machine
    (``benchmarks/step_ops.py``), or to compare the two paths. Trace inside the block (a
    function ``jax.jit`` already traced keeps its program). On a CPU, run accelerator-path
    programs for checking only: the batched LAPACK calls it makes are the ones the CPU path
    avoids.

    Example:
      >>> import jax, jax.numpy as jnp, manifold_optax as mo
      >>> x = jnp.ones((2, 8, 4))
      >>> with mo.lowering_for("gpu"):
      ...     text = jax.jit(lambda a: mo.msign(a)).lower(x).as_text()
      >>> "stablehlo.dot_general" in text
      True
    """
    if target not in PLATFORMS:
        raise ValueError(f"lowering_for: target must be one of {PLATFORMS}, got {target!r}")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(target)
    try:
        yield
    finally:
        stack.pop()
