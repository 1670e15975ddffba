"""What the transformations share: which leaf gets which spec, and leaves viewed as batches of
matrices and grouped by shape (the per-leaf manifold state is in ``_leaf_state``).

A *spec* is given per leaf as a single value (applied to every leaf), a tree prefix of the
parameters, or a callable ``params → such a tree``; :func:`leaf_specs` broadcasts it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from manifold_optax._matrix import as_matrix, fans, matrix_view
from manifold_optax._platform import on_cpu
from manifold_optax.labels import ambiguous_leaf_error, is_dim_nums, leaf_specs, path_to_str
from manifold_optax.linalg import msign
from manifold_optax.manifolds import SOLVERS, SolverConfig, is_manifold
from manifold_optax.manifolds._ops import working
from manifold_optax.sharding import owns, replicate

__all__ = [
    "DEFAULT_INIT_TOLERANCE",
    "leaf_specs",
    "paths",
    "resolve_manifolds",
    "by_shape",
    "ByShape",
    "group_default",
    "run_grouped",
    "matrix_items",
    "solver_config",
    "msign_fn",
    "msign_kwargs",
    "update_to",
    "leaf_view",
    "view_specs",
    "excluded",
    "update_leaves",
    "reshaped",
]

#: Relative distance to the manifold above which ``init`` refuses the parameters.
DEFAULT_INIT_TOLERANCE = 1e-4


def paths(tree) -> list:
    """The key path of every leaf of ``tree``, in ``jax.tree.leaves`` order."""
    return [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def excluded(weight_dimension_numbers, spec) -> bool:
    """Whether a leaf whose broadcast spec is ``spec`` is left out of a matrix rule: a spec
    tree (or callable) that gives it ``None``. A single ``None`` for every leaf is no spec
    (the last two axes), not an exclusion."""
    return (
        spec is None
        and weight_dimension_numbers is not None
        and not is_dim_nums(weight_dimension_numbers)
    )


def view_specs(weight_dimension_numbers, tree) -> list | None:
    """One weight dimension spec (or ``None``) per leaf, or ``None`` without a spec."""
    if weight_dimension_numbers is None:
        return None
    return leaf_specs(weight_dimension_numbers, tree, is_spec=is_dim_nums)


def leaf_view(x, dims, path=()):
    """``(X, unview)``: the leaf as matrices and the map back to its layout. Without a spec,
    ``[*batch, rows, cols]`` from the last two axes (0-D/1-D leaves as ``(1, d)`` rows); with
    one, ``[batch, fan_in, fan_out]`` as :func:`~manifold_optax._matrix.matrix_view` reads it."""
    if dims is None:
        return as_matrix(x), lambda y: y.reshape(jnp.shape(x))
    return matrix_view(x, dims, path)


def update_leaves(name, manifold, weight_dimension_numbers, updates, params):
    """What a manifold transformation's ``update`` starts from: ``(dims, manifolds,
    update leaves, treedef, parameter leaves)``; ValueError without ``params``."""
    if params is None:
        raise ValueError(f"{name} needs params: call update(updates, state, params)")
    dims = view_specs(weight_dimension_numbers, params)
    manifolds = resolve_manifolds(manifold, params, dims)
    u_leaves, treedef = jax.tree.flatten(updates)
    return dims, manifolds, u_leaves, treedef, jax.tree.leaves(params)


def resolve_manifolds(spec, tree, dims: list | None = None) -> list:
    """One ``Manifold | None`` per leaf of ``tree`` (``jax.tree.leaves`` order), validated.

    A single ``Manifold`` applies to the matrix leaves: those with a weight dimension spec
    when ``dims`` (one spec or ``None`` per leaf, :func:`view_specs`) is given, else those
    with two axes (a leaf with more is ambiguous: ValueError naming its path). A spec tree or callable may also give a manifold that allows
    vectors (``Sphere``) to a vector; a matrix manifold on a 0-D/1-D leaf, or an
    integer/complex leaf on any manifold, raises ValueError naming the leaf's path.
    """
    leaves_with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    if isinstance(spec, ByShape):
        out = spec.resolve(tree, dims)
    elif is_manifold(spec):
        if dims is None:
            for path, x in leaves_with_paths:
                if jnp.ndim(x) > 2:
                    raise ambiguous_leaf_error(path_to_str(path), jnp.shape(x))
            out = [spec if jnp.ndim(x) == 2 else None for _, x in leaves_with_paths]
        else:
            out = [spec if d is not None else None for d in dims]
    else:
        try:
            out = leaf_specs(spec, tree, is_spec=is_manifold)
        except ValueError as e:
            raise ValueError(f"manifold spec does not match the parameter tree: {e}") from e
    for (path, x), m in zip(leaves_with_paths, out, strict=True):
        if m is None:
            continue
        if not is_manifold(m):
            raise ValueError(
                f"manifold spec for {path_to_str(path)!r} must be a Manifold or None, got {m!r}"
            )
        m.check_leaf(x, path_to_str(path))
    return out


class ByShape:
    """A manifold spec built per matrix leaf from its fans (see :func:`by_shape`)."""

    def __init__(self, factory, min_ndim: int = 2):
        self.factory = factory
        self.min_ndim = min_ndim

    def resolve(self, tree, dims: list | None = None) -> list:
        """One ``Manifold | None`` per leaf: ``factory(fan_in, fan_out)`` of the leaf's matrix
        view (its spec in ``dims``; without one the last two axes), ``None`` where ``dims``
        gives no spec or the leaf has fewer than ``min_ndim`` axes."""
        out = []
        for i, x in enumerate(jax.tree.leaves(tree)):
            d = None if dims is None else dims[i]
            if jnp.ndim(x) < self.min_ndim or (dims is not None and d is None):
                out.append(None)
                continue
            fan_in, fan_out = fans(x, d)
            out.append(self.factory(fan_in, fan_out))
        return out

    def __call__(self, params):
        """The spec as a tree of ``params``' structure (fans from the last two axes)."""
        return jax.tree.unflatten(jax.tree.structure(params), self.resolve(params))


def by_shape(factory, *, min_ndim: int = 2) -> ByShape:
    """A manifold spec that builds each matrix leaf's manifold from its fans.

    ``factory(fan_in, fan_out)`` returns a ``Manifold`` or ``None``. The fans are those of the
    leaf's matrix view: with ``weight_dimension_numbers`` given to the optimizer, the rows and
    columns its spec names (a conv kernel ``(3, 3, 8, 16)`` is ``72 × 16``, an attention output
    kernel ``(heads, head_dim, d)`` is ``heads·head_dim × d``, a ``MatrixSpec`` split counted);
    without one, the last two axes (Flax's ``(in, out)``). The usual shape-aware choices keep
    activations O(1) whatever the width:

    * ``SpectralSphere(√(fan_out/fan_in))`` — unit RMS→RMS operator norm;
    * ``Sphere(√fan_out)`` — entries of RMS ``1/√fan_in``, like LeCun-normal initialization;
    * ``Stiefel()`` is already norm-preserving for square, wide and tall layers.

    Args:
      factory: ``(fan_in, fan_out) → Manifold | None``.
      min_ndim: leaves with fewer axes get no manifold.

    Returns:
      A manifold spec for :func:`~manifold_optax.manifold_muon`, the manifold transformations
      and :func:`~manifold_optax.project_params`.

    Example:
      >>> import manifold_optax as mo
      >>> spec = mo.by_shape(lambda fan_in, fan_out: mo.Sphere((fan_out) ** 0.5))
    """
    return ByShape(factory, min_ndim)


def group_default(group: bool | None, sharding=None) -> bool:
    """``None``: stack same-shape leaves on GPU/TPU (fewer, larger kernels), not on CPU, where
    the copies into and out of the stacks cost more than they save; always under the owner
    strategy, which deals each stack's matrices to the devices."""
    if group is None:
        return owns(sharding) or not on_cpu()
    return bool(group)


def _flat_batch(x, nb: int):
    """``x`` (an array, None or a pytree) with its ``nb`` leading batch axes flattened."""
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[nb:]), x)


def _batch_size(args) -> int:
    return args[0].shape[0]


def run_grouped(fn, items: list, group: bool = True, batched: bool = False) -> list:
    """Run ``fn(key, *args)`` once per group of items with equal ``key``.

    ``items`` holds ``(key, args)`` with every array of ``args`` (arrays, None or pytrees)
    leading with the item's batch axis, the first an array; a group's arrays are concatenated
    along it, ``fn`` runs on the stack (one batched msign / block iteration / polish for
    same-shape layers), and its outputs (a tuple of such pytrees) are split back. A lone
    matrix runs unbatched unless ``batched`` (``fn`` then always gets a stack: the owner
    strategy splits it).
    """
    groups: dict = {}
    for i, (key, _) in enumerate(items):
        groups.setdefault(key if group else i, []).append(i)
    out: list = [None] * len(items)
    for idx in groups.values():
        key = items[idx[0]][0]
        if len(idx) == 1:
            args = items[idx[0]][1]
            if _batch_size(args) != 1 or batched:
                out[idx[0]] = fn(key, *args)
                continue
            # A lone matrix runs unbatched (XLA:CPU runs batch-1 dots slower than plain ones).
            res = fn(key, *jax.tree.map(lambda a: a[0], args))
            out[idx[0]] = jax.tree.map(lambda r: r[None], res)
            continue
        cols = zip(*(items[i][1] for i in idx), strict=True)
        stacked = [jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *xs) for xs in cols]
        res = fn(key, *stacked)
        start = 0
        for i in idx:
            b = _batch_size(items[i][1])
            out[i] = jax.tree.map(lambda r, s=start, b=b: r[s : s + b], res)
            start += b
    return out


def _shape_key(tree):
    return jax.tree.structure(tree), tuple(a.shape[1:] for a in jax.tree.leaves(tree))


def matrix_items(g_leaves, w_leaves, manifolds, states, reads_multiplier: bool = False, dims=None):
    """``(items, where, unviews)`` for :func:`run_grouped`: per manifold leaf ``i`` (listed in
    ``where``), ``(key, (G, W, y, aux))`` in the working precision (float32, float64 for float64
    parameters) with one flat batch axis (the leaf's
    :func:`leaf_view` under ``dims``); the key groups leaves with the same manifold, matrix
    shape and state shapes. With ``reads_multiplier``, a leaf whose manifold does not read its
    multiplier passes ``y = None``. ``unviews[i]`` maps a matrix result back to leaf ``i``."""
    items, where, unviews = [], [], {}
    for i, (g, w, m, ls) in enumerate(zip(g_leaves, w_leaves, manifolds, states, strict=True)):
        if m is None:
            continue
        d = None if dims is None else dims[i]
        W, unviews[i] = leaf_view(working(w), d)
        if d is None:
            G = as_matrix(g.astype(working(w).dtype)).reshape(W.shape)
        else:
            G = leaf_view(g.astype(working(w).dtype).reshape(w.shape), d)[0]
        y = None if reads_multiplier and not m.reads_multiplier(W.shape) else ls.y
        args = tuple(_flat_batch(x, W.ndim - 2) for x in (G, W, y, ls.aux))
        items.append(((m, args[1].shape[1:], args[1].dtype, _shape_key(args[3])), args))
        where.append(i)
    return items, where, unviews


def reshaped(new, like):
    """``new`` (an array, None or a pytree) reshaped leaf by leaf to ``like``'s shapes, the
    leaves matched in order (``like`` may be the same fields as a mapping: the named tuple
    ``nnx.Optimizer`` hands back as an ``nnx.State``)."""
    leaves, treedef = jax.tree.flatten(new)
    shapes = [jnp.shape(b) for b in jax.tree.leaves(like)]
    return jax.tree.unflatten(treedef, [a.reshape(s) for a, s in zip(leaves, shapes, strict=True)])


#: Defaults of the structural integer arguments (loop lengths, filter degrees).
STATIC_INT_DEFAULTS = {
    "inner_steps": SolverConfig.inner_steps,
    "power_iters": SolverConfig.power_iters,
}


def static_int(value, name: str) -> int:
    """A structural integer argument (a loop length, a filter degree) read statically:
    ``None`` gives its default (:data:`STATIC_INT_DEFAULTS`), a concrete value its ``int``;
    a traced value (``optax.inject_hyperparams`` injects every numeric argument it is given)
    is a ValueError saying to pass it in ``static_args``."""
    if value is None:
        return STATIC_INT_DEFAULTS[name]
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{name} sets the size of the computation and cannot be a traced hyperparameter; "
            f"with optax.inject_hyperparams pass static_args=({name!r},)"
        )
    return int(value)


def solver_config(
    solver, exact_config, inner_steps, dual_learning_rate, power_iters=None
) -> SolverConfig:
    """The validated solver options shared by ``dual_ascent`` and ``manifold_step``:
    ``exact_config`` (default ``SolverConfig()``) with the keywords given explicitly (not
    ``None``) in place of its fields; a keyword left at ``None`` keeps the config's value."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; accepted: {SOLVERS}")
    if exact_config is not None and not isinstance(exact_config, SolverConfig):
        raise ValueError(f"exact_config must be a SolverConfig, got {exact_config!r}")
    given = {
        "inner_steps": None if inner_steps is None else static_int(inner_steps, "inner_steps"),
        "power_iters": None if power_iters is None else static_int(power_iters, "power_iters"),
        "dual_learning_rate": dual_learning_rate,
    }
    return dataclasses.replace(
        exact_config or SolverConfig(), **{k: v for k, v in given.items() if v is not None}
    )


def msign_kwargs(ns_steps, ns_coeffs, normalization, precision, eps, compute_dtype, method="auto"):
    """:func:`~manifold_optax.msign`'s keyword arguments, by name."""
    return dict(
        steps=ns_steps,
        coeffs=ns_coeffs,
        normalization=normalization,
        precision=precision,
        eps=eps,
        compute_dtype=compute_dtype,
        method=method,
    )


def msign_fn(ms_kwargs, sharding=None):
    """The dual step's msign; with ``sharding``, its input is gathered once and the whole
    matrix is computed on every device."""

    def fn(Z):
        return replicate(msign(replicate(Z, sharding), **ms_kwargs), sharding)

    return fn


def update_to(new, w, dtype, unview=None):
    """The update that moves parameter ``w`` to the point ``new`` (its matrix view, mapped
    back by ``unview``; else any shape of ``w``'s size), in the wider of the update's
    ``dtype`` and the parameter's: a bfloat16 gradient of a float32 parameter must not round
    the retracted point to bfloat16 (it would leave the manifold by ``2⁻⁹·η`` a step)."""
    new = new.reshape(w.shape) if unview is None else unview(new)
    out = jnp.promote_types(jnp.result_type(w), dtype)
    return (new.astype(out) - w.astype(out)).astype(out)
