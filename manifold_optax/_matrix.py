"""Views of parameter leaves as batches of matrices, and grouped (batched) msign.

A leaf is viewed as ``[batch, fan_in, fan_out]``: the axes named by a ``MuonDimensionNumbers``
or :class:`~manifold_optax.MatrixSpec` (reduction = fan-in, output = fan-out) become the matrix,
the rest a batch, and a ``MatrixSpec``'s ``split = k`` cuts the columns into ``k`` matrices
(more batch). Without a spec the last two axes are the matrix (Flax's ``(in, out)`` kernels;
layers stacked by ``nnx.scan`` lead). Leaves of the same matrix shape and dtype are stacked and orthogonalized by one batched
msign call, which keeps the hardware busy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from manifold_optax._platform import on_cpu
from manifold_optax.labels import MuonDimensionNumbers, path_to_str
from manifold_optax.linalg import msign


def _axes(x, dim_nums):
    if dim_nums is None:
        return (x.ndim - 2,), (x.ndim - 1,)
    red = dim_nums.reduction_axis
    out = dim_nums.output_axis
    red = (red,) if isinstance(red, int) else tuple(red)
    out = (out,) if isinstance(out, int) else tuple(out)
    return tuple(a % x.ndim for a in red), tuple(a % x.ndim for a in out)


def matrix_view(
    x: jax.Array, dim_nums: MuonDimensionNumbers | None, path=()
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """Return ``(x3, inverse)`` with ``x3`` of shape ``[batch, fan_in, fan_out]``.

    Raises ValueError naming ``path`` if the leaf has fewer than two axes or the spec is bad.
    """
    if x.ndim < 2:
        raise ValueError(
            f"parameter {path_to_str(path)!r} has shape {x.shape}: a matrix rule needs at "
            "least 2 axes; send it to the fallback optimizer (labels/weight_dimension_numbers)"
        )
    try:
        red, out = _axes(x, dim_nums)
    except (TypeError, AttributeError) as e:
        raise ValueError(f"bad weight dimension spec for {path_to_str(path)!r}: {dim_nums}") from e
    if set(red) & set(out) or not red or not out:
        raise ValueError(
            f"parameter {path_to_str(path)!r} (shape {x.shape}): reduction axes {red} and "
            f"output axes {out} must be non-empty and disjoint"
        )
    batch = tuple(a for a in range(x.ndim) if a not in red and a not in out)
    perm = batch + red + out
    inv = tuple(sorted(range(x.ndim), key=lambda i: perm[i]))
    shp = lambda axes: tuple(x.shape[a] for a in axes)
    flat = (math.prod(shp(batch)), math.prod(shp(red)), math.prod(shp(out)))
    unflat = shp(batch) + shp(red) + shp(out)
    x3 = jnp.transpose(x, perm).reshape(flat)
    k = _split(dim_nums)
    if k == 1:
        return x3, lambda y: jnp.transpose(y.reshape(unflat), inv)
    b, fin, fout = flat
    if fout % k:
        raise ValueError(
            f"parameter {path_to_str(path)!r} (shape {x.shape}): {fout} output features do "
            f"not split into {k} equal parts"
        )
    parts = jnp.swapaxes(x3.reshape(b, fin, k, fout // k), 1, 2).reshape(b * k, fin, fout // k)

    def inverse(y):
        y = jnp.swapaxes(y.reshape(b, k, fin, fout // k), 1, 2).reshape(flat)
        return jnp.transpose(y.reshape(unflat), inv)

    return parts, inverse


def _split(dim_nums) -> int:
    k = getattr(dim_nums, "split", 1)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"split must be a positive integer, got {k!r}")
    return k


def fans(x: jax.Array, dim_nums: MuonDimensionNumbers | None) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a leaf's matrix view; 0-D/1-D leaves are ``(1, size)``."""
    if x.ndim < 2:
        return 1, max(1, x.size)
    red, out = _axes(x, dim_nums)
    fan_out = math.prod(x.shape[a] for a in out) // _split(dim_nums)
    return math.prod(x.shape[a] for a in red), fan_out


def as_matrix(x: jax.Array) -> jax.Array:
    """0-D/1-D arrays as ``(1, d)`` matrices (a bias is the weight of a constant input);
    arrays with two or more axes unchanged."""
    return x if x.ndim >= 2 else x.reshape(1, -1)


def vector_view(x: jax.Array) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """A 0-D or 1-D leaf as a ``[1, 1, d]`` matrix (a bias: weights from a constant input)."""
    shape = x.shape
    return x.reshape(1, 1, -1), lambda y: y.reshape(shape)


def _groups(mats) -> list[list[int]]:
    """Indices of ``[b, r, c]`` arrays that share ``(r, c, dtype)``, in first-seen order."""
    groups: dict = {}
    for i, m in enumerate(mats):
        groups.setdefault((m.shape[1:], m.dtype), []).append(i)
    return list(groups.values())


# On CPU, matrices with a short side of at least this many run one at a time as 2-D products
# (see grouped_msign); smaller ones are stacked, where per-op overhead dominates.
CPU_PER_MATRIX_MIN_SIDE = 128


def _stack_on_this_backend(shape) -> bool:
    return not on_cpu() or min(shape[-2:]) < CPU_PER_MATRIX_MIN_SIDE


def grouped_msign(
    mats: Sequence[jax.Array], group: bool | None = None, sharding=None, **msign_kwargs
) -> list:
    """msign of each ``[b, r, c]`` array; same ``(r, c, dtype)`` arrays share one batched call.

    ``group``: ``True`` stacks every same-shape group into one batched msign; ``False`` runs
    each array as it comes (its own batch); ``None`` (the default) stacks on GPU/TPU, and on
    CPU only matrices with a short side below ``CPU_PER_MATRIX_MIN_SIDE`` (128): larger ones
    run one matrix at a time as 2-D products, whose working set stays in cache, with no
    copies into and out of a stack (``benchmarks/msign_bench.py`` compares the two).
    ``sharding`` turns the CPU rule off (stacks stay whole).

    ``sharding`` (a :class:`~manifold_optax.sharding.MsignSharding`) places the computation:
    ``"gather"`` replicates each input (one all-gather) and computes whole matrices everywhere;
    ``"owner"`` deals each stacked group's matrices to the devices
    (:meth:`~manifold_optax.sharding.MsignSharding.run_owned`: padded to a multiple of the
    device count, never replicated).
    """
    strategy = "none" if sharding is None else sharding.strategy
    rep = (lambda x: x) if strategy == "none" else sharding.replicated

    def run(stacked):
        if strategy == "owner":  # whole matrices dealt to the devices (the stack padded)
            return sharding.run_owned(lambda s: msign(s, **msign_kwargs), stacked)
        return rep(msign(rep(stacked), **msign_kwargs))

    def one_at_a_time(x):
        if x.shape[0] > 32:  # a loop, not an unrolled program, for long stacks
            return jax.lax.map(lambda m: msign(m, **msign_kwargs), x)
        return jnp.stack([msign(x[i], **msign_kwargs) for i in range(x.shape[0])])

    out: list = [None] * len(mats)
    if group is None and strategy == "none":
        # The rule depends on the shape only, so a same-shape group is stacked or not as one.
        groups = []
        for idx in _groups(mats):
            if _stack_on_this_backend(mats[idx[0]].shape):
                groups.append(idx)
            else:
                for i in idx:
                    out[i] = one_at_a_time(mats[i])
    else:
        stacking = group is not False or strategy == "owner"
        groups = _groups(mats) if stacking else [[i] for i in range(len(mats))]
    for idx in groups:
        if len(idx) == 1:
            out[idx[0]] = run(mats[idx[0]])
            continue
        res = run(jnp.concatenate([mats[i] for i in idx], axis=0))
        start = 0
        for i in idx:
            out[i] = res[start : start + mats[i].shape[0]]
            start += mats[i].shape[0]
    return out
