"""Input checks of the public optimizers: a gradient, parameter or state tree that does not
match, leaf by leaf, is a ValueError naming the parameter's path (before any arithmetic
meets it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from manifold_optax._placement import placed
from manifold_optax.labels import path_to_str

__all__ = ["checked"]


def _check_state(name, updates, state):
    """Every state leaf whose path ends with a gradient's path (a momentum or moment buffer,
    kept per parameter) must have that gradient's shape."""
    shapes = {
        tuple(path): jnp.shape(x) for path, x in jax.tree_util.tree_flatten_with_path(updates)[0]
    }
    lengths = sorted({len(p) for p in shapes})
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        for k in lengths:
            want = shapes.get(tuple(path[-k:])) if 0 < k <= len(path) else None
            if want is not None and jnp.shape(x) != want:
                raise ValueError(
                    f"{name}: the gradient of parameter {path_to_str(path[-k:])!r} has shape "
                    f"{want}, the optimizer state's buffer for it {jnp.shape(x)}"
                )


def _compare(name, what, tree, ref_what, ref):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    ref_leaves = jax.tree.leaves(ref)
    if len(flat) != len(ref_leaves):
        raise ValueError(
            f"{name}: the {what} tree has {len(flat)} leaves and the {ref_what} tree "
            f"{len(ref_leaves)}; they must have the same structure"
        )
    for (path, x), r in zip(flat, ref_leaves, strict=True):
        if jnp.shape(x) != jnp.shape(r):
            raise ValueError(
                f"{name}: the {what} of parameter {path_to_str(path)!r} has shape "
                f"{jnp.shape(x)}, the {ref_what} {jnp.shape(r)}"
            )
        dt = jnp.result_type(x)
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(
                f"{name}: the {what} of parameter {path_to_str(path)!r} has dtype {dt}; "
                "it must be a real floating dtype"
            )


def checked(tx, name: str, sharding=None) -> optax.GradientTransformationExtraArgs:
    """``tx`` whose ``update`` first checks that the gradients match the parameters (when
    given), leaf by leaf, in shape and floating dtype, and the optimizer state's buffers
    kept per parameter (momentum, moments) in shape: a ValueError naming the path instead of an error deep inside
    the step. Its updates and state are placed like the parameters
    (:func:`~manifold_optax._placement.placed`, with the ``sharding`` strategy)."""
    tx = optax.with_extra_args_support(tx)

    def update_fn(updates, state, params=None, **extra):
        if params is not None:
            _compare(name, "gradient", updates, "parameter", params)
        _check_state(name, updates, state)
        return tx.update(updates, state, params, **extra)

    return placed(optax.GradientTransformationExtraArgs(tx.init, update_fn), sharding)
