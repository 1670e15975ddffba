"""The matrix each parameter of a Flax Linen module is: ``module.init`` traced abstractly, every
layer seen through ``nn.intercept_methods``, stacked axes found by shape.

Used through :func:`manifold_optax.flax_dimension_numbers` (``flax_dimension_numbers(module,
*example_inputs)``); the rules per kind of layer are those of the NNX reader
(:mod:`manifold_optax._layer_rules`).
"""

from __future__ import annotations

import itertools

import jax

from manifold_optax._layer_rules import Layer, kernel_axes, pick, stored_spec, unknown_layer
from manifold_optax.labels import path_to_str

__all__ = ["linen_dimension_numbers", "stacked_axes"]


def _linen_layer(module, parent, child: str, call_args):
    import flax.linen as nn

    if isinstance(module, nn.Embed):
        return Layer("embed")
    if isinstance(module, nn.Conv | nn.ConvTranspose | nn.ConvLocal):
        return Layer("conv", window=len(module.kernel_size))
    if isinstance(module, nn.DenseGeneral):
        role = None
        if isinstance(parent, nn.MultiHeadDotProductAttention):
            role = "out" if child == "out" else "qkv"
        count = lambda v: 1 if isinstance(v, int) else len(tuple(v))
        return Layer(
            "general",
            n_batch=count(module.batch_dims),
            n_in=count(module.axis),
            n_out=count(module.features),
            attention=role,
        )
    if isinstance(module, nn.Dense):
        return Layer("linear")
    if isinstance(module, nn.Einsum):
        equation = call_args.get("einsum_str") or module.einsum_str
        return Layer("einsum", equation=equation)
    return None


def stacked_axes(stored, own, where: str, hint=None) -> tuple[int, ...]:
    """The axes of the stored shape ``stored`` that hold the layer's own axes (``own``, the
    shape the layer created), in order; the others are stacked by ``nn.scan``/``nn.vmap``.

    Raises ValueError naming ``where`` when no placement of the stacked axes fits, or when
    several do and ``hint`` (the stacked axis) does not pick one.
    """
    stored, own = tuple(stored), tuple(own)
    k = len(stored) - len(own)
    if k < 0:
        raise ValueError(f"parameter {where!r}: stored shape {stored} has fewer axes than {own}")
    fits = []
    for extra in itertools.combinations(range(len(stored)), k):
        kept = tuple(a for a in range(len(stored)) if a not in extra)
        if tuple(stored[a] for a in kept) == own:
            fits.append((extra, kept))
    if hint is not None:
        hint = (hint,) if isinstance(hint, int) else tuple(hint)
        hint = tuple(sorted(h % len(stored) for h in hint))
        fits = [f for f in fits if f[0] == hint]
    if len(fits) != 1:
        how = "no placement" if not fits else f"several placements {[f[0] for f in fits]}"
        raise ValueError(
            f"parameter {where!r}: stored as {stored}, created by its layer as {own}: "
            f"{how} of the stacked axes fits; give flax_dimension_numbers(..., "
            f"scan_axis={{{where!r}: axis}})"
        )
    return fits[0][1]


def linen_dimension_numbers(
    module,
    example_inputs,
    *,
    heads,
    split_fused,
    fallback_patterns,
    overrides,
    scan_axis=None,
    rngs=None,
    init_kwargs=None,
):
    """The spec tree of ``module.init(rngs, *example_inputs, **init_kwargs)["params"]`` (see
    :func:`manifold_optax.flax_dimension_numbers`)."""
    import flax.linen as nn

    from manifold_optax.flax_specs import rule_for

    if not example_inputs:
        raise ValueError(
            f"a Linen module ({type(module).__name__}) is read by tracing its init: give its "
            "example inputs, flax_dimension_numbers(module, x, ...)"
        )
    seen: dict = {}  # module path -> (module, {param name: shape as created}, call kwargs)

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        m = context.module
        if context.method_name == "__call__" and m.scope is not None:
            params = m.variables.get("params", {})
            own = {k: v.shape for k, v in params.items() if hasattr(v, "shape")}
            call = dict(kwargs)
            if isinstance(m, nn.Einsum) and len(args) > 1:
                call["einsum_str"] = args[1]
            seen.setdefault(tuple(m.path), (m, own, call))
        return out

    if rngs is None:
        key = jax.random.key(0)
        rngs = {"params": key, "dropout": key}
    kwargs = dict(init_kwargs or {})
    with nn.intercept_methods(interceptor):
        variables = jax.eval_shape(lambda: module.init(rngs, *example_inputs, **kwargs))
    if "params" not in variables:
        raise ValueError(f"{type(module).__name__}.init created no 'params' collection")

    def spec(path, x):
        where = path_to_str(path)
        keys = tuple(where.split("/"))
        name = keys[-1]
        done, s = rule_for(where, name, len(x.shape), overrides, fallback_patterns)
        if done:
            return s
        owner, own, call = seen.get(keys[:-1], (None, {}, {}))
        parent = seen.get(keys[:-2], (None,))[0]
        layer = None
        if name == "kernel" and owner is not None:
            layer = _linen_layer(owner, parent, keys[-2] if len(keys) > 1 else "", call)
        if layer is None:
            kind = type(owner).__name__ if owner is not None else "an unknown owner"
            raise unknown_layer(where, kind)
        if layer.kind == "embed":
            return None
        axes = stacked_axes(x.shape, own.get(name, x.shape), where, pick(scan_axis, where, None))
        red, out = kernel_axes(layer, heads, where)
        split = pick(split_fused, where, 1) if layer.kind == "linear" else 1
        return stored_spec(red, out, axes, split)

    return jax.tree_util.tree_map_with_path(spec, variables["params"])
