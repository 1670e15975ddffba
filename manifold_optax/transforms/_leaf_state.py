"""The per-leaf state of the manifold transformations: a multiplier and an auxiliary state per
manifold leaf, kept as trees with the parameters' structure."""

from __future__ import annotations

import functools
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from manifold_optax.labels import path_to_str
from manifold_optax.manifolds._ops import working
from manifold_optax.transforms._leaves import leaf_view, resolve_manifolds

__all__ = ["LeafState", "state_trees", "leaf_states", "initial_leaves", "unboxed"]


class LeafState(NamedTuple):
    """Per parameter leaf: the multiplier ``y`` (normalized-gradient units; the manifold's
    :meth:`~manifold_optax.Manifold.multiplier_shape`) and the manifold's auxiliary state
    ``aux`` (e.g. the spectral sphere's warm block); both ``None`` off the manifolds."""

    y: Any
    aux: Any


def _masked(x):
    return optax.MaskedNode() if x is None else x


def _unmasked(x):
    return None if isinstance(x, optax.MaskedNode) else x


def _is_variable(x) -> bool:
    nnx = sys.modules.get("flax.nnx")  # no Flax NNX imported: no Variables to find
    return nnx is not None and isinstance(x, nnx.Variable)


@functools.lru_cache(maxsize=256)
def unboxed(treedef):
    """``treedef`` with each Flax NNX ``Variable`` node (``nnx.Param(array)``, as
    ``nnx.Optimizer`` hands the parameters to ``init``) replaced by its value's structure;
    ``treedef`` itself when it has none. The state keeps its trees in this structure, so a leaf's multiplier or
    auxiliary state (a tuple of arrays) never sits inside a Variable, and the state has one
    structure whether the parameters come boxed (``init``) or as arrays (``update``)."""
    tree = jax.tree.unflatten(treedef, [0] * treedef.num_leaves)
    # Each Variable gives way to its value: a leaf, or a leafless node (optax.masked's
    # ``MaskedNode``), so the leaves stay those of ``treedef``.
    tree = jax.tree.map(
        lambda x: x.get_value() if _is_variable(x) else x, tree, is_leaf=_is_variable
    )
    return jax.tree.structure(tree)


def state_trees(states: list, treedef) -> tuple:
    """``(y, aux)``: the multipliers and the auxiliary states of one :class:`LeafState` per
    leaf as two trees with the parameters' structure ``treedef`` (:func:`unboxed`;
    ``optax.MaskedNode()`` where a leaf has none), as optax keeps a momentum:
    ``optax.tree_map_params`` maps them and :func:`~manifold_optax.state_shardings` reads
    each leaf's parameter from its position."""
    treedef = unboxed(treedef)
    ys = jax.tree.unflatten(treedef, [_masked(s.y) for s in states])
    return ys, jax.tree.unflatten(treedef, [_masked(s.aux) for s in states])


def leaf_states(y, aux, treedef) -> list:
    """The inverse of :func:`state_trees`: one :class:`LeafState` per leaf of ``treedef``."""
    treedef = unboxed(treedef)
    return [
        LeafState(_unmasked(a), _unmasked(b))
        for a, b in zip(treedef.flatten_up_to(y), treedef.flatten_up_to(aux), strict=True)
    ]


def _multiprocess(x) -> bool:
    """Whether ``x`` is a concrete array some of whose shards live in other processes."""
    return (
        isinstance(x, jax.Array)
        and not isinstance(x, jax.core.Tracer)
        and (not x.is_fully_addressable)
    )


def _distance(m, dims, x):
    x = jnp.asarray(x)
    mesh = getattr(x.sharding, "mesh", None)
    out = None
    if isinstance(mesh, jax.sharding.Mesh) and mesh.size > 1:
        out = jax.sharding.NamedSharding(mesh, P())
    f = lambda x: m.distance(leaf_view(x, dims)[0])  # noqa: E731
    return jax.jit(f, out_shardings=out)(x) if _multiprocess(x) else f(x)


def _check_on_manifold(params, manifolds, tol, dims):
    if tol is None:
        return
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for i, ((path, x), m) in enumerate(zip(flat, manifolds, strict=True)):
        if m is None or isinstance(x, jax.core.Tracer):
            continue
        d_i = None if dims is None else dims[i]
        # Compiled (every process of a multi-process mesh runs the same program), replicated
        # to every device before the host reads it.
        d = float(_distance(m, d_i, x))
        # Low-precision parameters cannot sit closer than their rounding (bf16: ~4e-3).
        tol_eff = max(tol, 4 * float(jnp.finfo(jnp.result_type(x)).eps))
        if not d <= tol_eff:
            raise ValueError(
                f"parameter {path_to_str(path)!r} is off its manifold {m} (relative distance "
                f"{d:.3g} > {tol_eff:g}); put it on the manifold first with "
                "manifold_optax.project_params(params, manifold_spec)"
            )


def initial_leaves(manifold, params, init_tolerance, power_iters, dims=None) -> list:
    """One :class:`LeafState` per leaf: ``(None, None)`` off the manifolds, else a zero
    multiplier and the auxiliary state refreshed at the parameter (its :func:`leaf_view`).
    Checks that concrete parameters lie on their manifolds (``init_tolerance``; ``None``
    skips the check)."""
    if not jax.tree.leaves(params):
        # No parameters, or optax.tree_map_params's placeholder: only the structure counts.
        return []
    manifolds = resolve_manifolds(manifold, params, dims)
    _check_on_manifold(params, manifolds, init_tolerance, dims)
    out = []
    for i, (x, m) in enumerate(zip(jax.tree.leaves(params), manifolds, strict=True)):
        if m is None:
            out.append(LeafState(None, None))  # empty subtrees: nothing to checkpoint
            continue
        d = None if dims is None else dims[i]

        def first(x, m=m, d=d):
            W = leaf_view(working(x), d)[0]
            y = jnp.zeros(m.multiplier_shape(W.shape), W.dtype)
            return LeafState(y, m.update_aux(W, m.init_aux(W), power_iters))

        # Arrays that span several processes: one compiled program (the warm block's
        # iterations, run op by op, would let the processes part ways).
        out.append(jax.jit(first)(x) if _multiprocess(x) else first(x))
    return out
