"""Updates and optimizer state placed like the parameters, on every kind of mesh.

The public optimizers' and building blocks' ``init`` and ``update`` run through
:func:`placed` (the outermost one places; those inside it pass through):

* **Explicit axes** (``jax.make_mesh``'s default: an array's type names its sharding). The
  step runs with the mesh's axes made Auto (``jax.sharding.auto_axes``), so the products over
  sharded contracting dimensions follow the ``MsignSharding`` strategy (or GSPMD, without
  one), and its outputs come back typed: each update with its parameter's sharding, each
  state leaf with :func:`state_specs`'s.
* **Auto axes** (a tracer carries no sharding). Updates and parameter-shaped state are tied
  to their parameters (``shard_alike``, or a concrete parameter's own sharding); the other
  state is constrained by the same rule when a mesh is known (the strategy's, the one
  ``jax.set_mesh`` made current, or concrete parameters'). With none,
  :func:`~manifold_optax.state_shardings` gives ``jit`` the state's shardings.

The rule (:func:`state_specs`): the state's trees with the parameters' structure (a momentum,
the manifold multipliers) are found from the structure ``init`` gives (as
``optax.tree_map_params`` finds them), so each of their leaves has a parameter; one of that
parameter's shape gets its sharding; any other leaf of ``min_size`` or more elements (a
Stiefel multiplier, a spectral sphere's block) is split along its largest axis that the mesh
divides; the rest is replicated.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading

import jax
import jax.numpy as jnp
import optax
from jax.experimental.shard_alike import shard_alike
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["placed", "like_params", "state_specs", "split_spec", "explicit_mesh", "auto_mesh"]

MIN_SIZE = 4096


def _mesh_of(x):
    sh = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sh, "mesh", None)
    return mesh if mesh is not None and not mesh.empty else None


def explicit_mesh(tree):
    """The mesh of the first leaf whose type names Explicit mesh axes (a concrete ``Mesh``
    for arrays, an ``AbstractMesh`` for tracers), or ``None``."""
    for x in jax.tree.leaves(tree):
        if not hasattr(x, "shape"):
            continue
        mesh = _mesh_of(x)
        if mesh is not None and mesh.explicit_axes:
            if not isinstance(x, jax.core.Tracer) and isinstance(x.sharding, NamedSharding):
                return x.sharding.mesh
            return mesh
    return None


def auto_mesh(mesh):
    """``mesh`` with the axis types of the current context mesh when that mesh has the same
    axes (an Explicit mesh used inside an Auto region), else ``mesh``."""
    ctx = jax.sharding.get_abstract_mesh()
    if (
        ctx.empty
        or tuple(ctx.axis_names) != tuple(mesh.axis_names)
        or tuple(ctx.axis_types) == tuple(mesh.axis_types)
    ):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=tuple(ctx.axis_types))


def split_spec(shape, axis_sizes: dict, axes=None, min_size: int = MIN_SIZE) -> P:
    """``P`` splitting ``shape`` along its largest axis that the product of ``axes`` (all of
    ``axis_sizes``' by default) divides, when it has ``min_size`` elements or more; else
    ``P()``."""
    axes = tuple(axes) if axes is not None else tuple(axis_sizes)
    n = math.prod(axis_sizes[a] for a in axes)
    if n > 1 and math.prod(shape) >= min_size:
        for ax in sorted(range(len(shape)), key=lambda i: -shape[i]):
            if shape[ax] % n == 0:
                spec = [None] * len(shape)
                spec[ax] = axes if len(axes) > 1 else axes[0]
                return P(*spec)
    return P()


@jax.tree_util.register_pytree_node_class
class _Params:
    """A pytree with no leaves that stands for the parameters in ``init`` (as in
    ``optax.tree_map_params``): the state ``init`` builds from it holds it exactly where it
    keeps trees with the parameters' structure."""

    def tree_flatten(self):
        return (), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls()


def _is_params(x) -> bool:
    return isinstance(x, _Params)


def _flatten_up_to(treedefs, tree) -> list:
    """``tree``'s subtrees at the leaves of the first of ``treedefs`` it has as a prefix."""
    for treedef in treedefs[:-1]:
        try:
            return treedef.flatten_up_to(tree)
        except (ValueError, TypeError):
            continue
    return treedefs[-1].flatten_up_to(tree)


def param_of(init, state, params) -> list:
    """For each leaf of ``state`` (made by ``init``), the index of the parameter leaf whose
    position it holds in one of the state's trees with the parameters' structure (a
    momentum, a multiplier tree), or ``None`` (a step count): read from the structure that
    ``init`` gives (as ``optax.tree_map_params`` reads it), never from shapes."""
    if init is None:  # ``state`` is a tree like the parameters (the updates)
        return list(range(len(jax.tree.leaves(state))))
    from manifold_optax.transforms._leaf_state import unboxed  # noqa: PLC0415

    # Two kinds of parameter-shaped trees: optax's (a momentum keeps the parameters' NNX
    # Variables) and the manifold transformations' (the Variables' values only).
    p_def = jax.tree.structure(params)
    p_defs = (p_def, unboxed(p_def))
    marks, m_def = jax.tree.flatten(init(_Params()), is_leaf=_is_params)
    try:
        subtrees = m_def.flatten_up_to(state)
    except (ValueError, TypeError) as e:
        raise ValueError(f"the optimizer state does not have the structure init gives: {e}") from e
    out = []
    for mark, sub in zip(marks, subtrees, strict=True):
        if _is_params(mark):
            for i, leaf_sub in enumerate(_flatten_up_to(p_defs, sub)):
                out += [i] * len(jax.tree.leaves(leaf_sub))
        else:
            out += [None] * len(jax.tree.leaves(sub))
    return out


def state_specs(init, state, params, param_specs, axis_sizes, axes=None, min_size=MIN_SIZE):
    """The rule above, as a tree of ``PartitionSpec`` shaped like ``state`` (its leaves may be
    arrays or ``jax.ShapeDtypeStruct``; ``init`` made it); ``param_specs`` lists the
    parameters' specs in leaf order."""
    flat, treedef = jax.tree.flatten(state)
    shapes = [tuple(jnp.shape(x)) for x in jax.tree.leaves(params)]
    out = []
    for x, i in zip(flat, param_of(init, state, params), strict=True):
        if i is not None and tuple(x.shape) == shapes[i]:
            out.append(param_specs[i])
        else:
            out.append(split_spec(tuple(x.shape), axis_sizes, axes, min_size))
    return jax.tree.unflatten(treedef, out)


def _spec(x):
    return jax.typeof(x).sharding.spec


@contextlib.contextmanager
def _on(mesh):
    """Make ``mesh`` (the arrays' own) current, unless a mesh already is."""
    if not jax.sharding.get_abstract_mesh().empty:
        yield
    elif isinstance(mesh, Mesh):
        with jax.sharding.set_mesh(mesh):
            yield
    else:
        with jax.sharding.use_abstract_mesh(mesh):
            yield


def _known_mesh(strategy, params=None):
    """The mesh to place state on: the strategy's, the current one, or that of concrete
    (eagerly passed) parameters."""
    if strategy is not None:
        return auto_mesh(strategy.mesh)
    ctx = jax.sharding.get_abstract_mesh()
    if not ctx.empty and not ctx.explicit_axes:
        return ctx
    for x in jax.tree.leaves(params):
        sh = getattr(x, "sharding", None)
        if not isinstance(x, jax.core.Tracer) and isinstance(sh, NamedSharding):
            return sh.mesh
    return None


def _tie(init, tree, params, strategy, axes):
    """Auto axes: ``tree``'s leaves tied to their parameters' shardings (``shard_alike``) and
    the others constrained by the rule when a mesh is known (so that ``update`` returns the
    state with the shardings ``init`` gave it)."""
    if params is None or jax.device_count() == 1:
        return tree
    p_flat = jax.tree.leaves(params)
    mesh = _known_mesh(strategy, params)
    flat, treedef = jax.tree.flatten(tree)
    out = []
    for x, i in zip(flat, param_of(init, tree, params), strict=True):
        if i is not None and hasattr(x, "shape") and x.shape == p_flat[i].shape:
            p = p_flat[i]
            if not isinstance(p, jax.core.Tracer) and isinstance(p.sharding, NamedSharding):
                # A concrete parameter (eager init) names its sharding: no guess to make.
                x = jax.lax.with_sharding_constraint(x, p.sharding)
            else:
                x = shard_alike(x, p)[0]
        elif mesh is not None and hasattr(x, "shape"):
            spec = split_spec(tuple(x.shape), dict(mesh.shape), axes)
            x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def like_params(f, params):
    """``f(params)`` (a tree shaped like ``params``), computed on Auto axes and typed like
    ``params`` when their types name Explicit mesh axes."""
    mesh = explicit_mesh(params)
    if mesh is None:
        return f(params)
    specs = jax.tree.map(_spec, params)
    with _on(mesh):
        return jax.sharding.auto_axes(f, out_sharding=specs)(params)


_local = threading.local()


def _nested() -> bool:
    return getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def _placing():
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def _accepting_extra_args(tx):
    """``tx`` whose ``update`` takes (and ignores, if its own function has no ``**kwargs``)
    the extra keyword arguments that ``optax.chain`` passes to every member, e.g. the
    ``max_logits=`` of a :func:`~manifold_optax.qk_clip` later in the chain."""
    try:
        takes = any(
            p.kind is inspect.Parameter.VAR_KEYWORD
            for p in inspect.signature(tx.update).parameters.values()
        )
    except (TypeError, ValueError):
        takes = True
    if takes:
        return tx

    def update_fn(updates, state, params=None, **extra):
        del extra
        return tx.update(updates, state, params)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def placed(tx, strategy=None) -> optax.GradientTransformationExtraArgs:
    """``tx`` whose updates and state are placed like the parameters (module docstring), on
    meshes with Explicit or Auto axes; ``strategy`` is the optimizer's ``MsignSharding``.
    Inside another placed transformation (a building block of ``manifold_muon``) it is
    ``tx`` itself: the outermost one places."""
    tx = _accepting_extra_args(optax.with_extra_args_support(tx))
    axes = None if strategy is None else strategy.owner_axes

    def init_fn(params):
        if strategy is not None:
            strategy.check_params(params)
        if _nested():
            return tx.init(params)
        with _placing():
            return _init(params)

    def update_fn(updates, state, params=None, **extra):
        if strategy is not None and not _nested():
            strategy.check_params(params)
        if _nested():
            return tx.update(updates, state, params, **extra)
        with _placing():
            return _update(updates, state, params, **extra)

    def _init(params):
        mesh = explicit_mesh(params)
        if mesh is None:
            return _tie(tx.init, tx.init(params), params, strategy, axes)
        bare = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        shapes = jax.eval_shape(tx.init, bare)
        pspecs = [_spec(x) for x in jax.tree.leaves(params)]
        specs = state_specs(tx.init, shapes, params, pspecs, dict(mesh.shape), axes)
        with _on(mesh):
            return jax.sharding.auto_axes(tx.init, out_sharding=specs)(params)

    def _update(updates, state, params=None, **extra):
        mesh = explicit_mesh((updates, params))
        if mesh is None:
            new, state = tx.update(updates, state, params, **extra)
            new = _tie(None, new, params, strategy, axes)
            return new, _tie(tx.init, state, params, strategy, axes)
        like = params if params is not None else updates
        pspecs = [_spec(x) for x in jax.tree.leaves(like)]
        out = (
            jax.tree.unflatten(jax.tree.structure(updates), pspecs),
            state_specs(tx.init, state, like, pspecs, dict(mesh.shape), axes),
        )
        step = lambda u, s, p: tx.update(u, s, p, **extra)  # noqa: E731
        with _on(mesh):
            return jax.sharding.auto_axes(step, out_sharding=out)(updates, state, params)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
