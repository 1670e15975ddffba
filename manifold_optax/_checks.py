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


def _param_path(path, param_paths):
    """The parameter path that ends ``path`` (the longest), for messages; else ``path``."""
    for k in range(len(path), 0, -1):
        if tuple(path[-k:]) in param_paths:
            return path[-k:]
    return path


def _names(path) -> tuple:
    """A key path as its names: an attribute, a dict key and a sequence index alike (a named
    tuple that ``nnx.Optimizer`` hands back as a mapping keeps its path)."""
    out = []
    for k in path:
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def _check_state(name, init, updates, state):
    """The state must have the structure and the leaf shapes that ``init`` gives parameters
    shaped like the gradients (read by ``jax.eval_shape``: nothing runs)."""
    like = jax.tree.map(lambda u: jax.ShapeDtypeStruct(jnp.shape(u), jnp.result_type(u)), updates)
    want = jax.tree_util.tree_flatten_with_path(jax.eval_shape(init, like))[0]
    got = jax.tree_util.tree_flatten_with_path(state)[0]
    param_paths = {tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(updates)[0]}
    if [_names(p) for p, _ in want] != [_names(p) for p, _ in got]:
        raise ValueError(
            f"{name}: the optimizer state does not have the structure that init gives these "
            f"parameters ({len(got)} leaves, {len(want)} expected); was it made by this "
            "optimizer's init for this parameter tree?"
        )
    for (path, x), (_, w) in zip(got, want, strict=True):
        if jnp.shape(x) != w.shape:
            raise ValueError(
                f"{name}: the optimizer state's leaf {jax.tree_util.keystr(path)} for parameter "
                f"{path_to_str(_param_path(path, param_paths))!r} has shape {jnp.shape(x)}, "
                f"expected {w.shape} for the gradients' shapes"
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
    given), leaf by leaf, in shape and floating dtype, and the optimizer state in
    structure and shapes (those ``init`` gives such parameters): a ValueError naming the path instead of an error deep inside
    the step. Its updates and state are placed like the parameters
    (:func:`~manifold_optax._placement.placed`, with the ``sharding`` strategy)."""
    tx = optax.with_extra_args_support(tx)

    def update_fn(updates, state, params=None, **extra):
        if params is not None:
            _compare(name, "gradient", updates, "parameter", params)
        _check_state(name, tx.init, updates, state)
        return tx.update(updates, state, params, **extra)

    return placed(optax.GradientTransformationExtraArgs(tx.init, update_fn), sharding)
