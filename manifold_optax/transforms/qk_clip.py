"""QK-clip (MuonClip): rescale the updated query and key projections of the attention heads whose
largest logit passed a threshold."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from manifold_optax.transforms._leaves import resolve_manifolds, view_specs

__all__ = ["qk_clip"]


def _key(path) -> tuple[str, ...]:
    """A key path as strings, without the ``value`` attribute of ``nnx.Variable`` nodes."""
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                out.append(k.name)
        elif isinstance(k, jax.tree_util.DictKey):
            out.extend(str(k.key).split("/"))  # {"blocks/0/attn": S} names a module too
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(str(k.idx))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            out.append(str(k.key))
        else:
            out.append(str(k))
    return tuple(out)


def _name(key: tuple[str, ...]) -> str:
    return "/".join(key) if key else "<root>"


def _projection(index: dict, prefix: tuple, name: str):
    """``(kernel index, bias index or None)`` of the projection ``prefix/name``, or ``None``."""
    base = prefix + (name,)
    if base in index:  # the projection is a bare parameter
        return index[base], None
    if base + ("kernel",) in index:
        return index[base + ("kernel",)], index.get(base + ("bias",))
    return None


def _module_of(key: tuple, index: dict, query: str, key_name: str, fused: str | None):
    """The attention module a ``max_logits`` entry belongs to: the entry's own path, that path
    without the trailing sequence indices (the tuple ``sow`` keeps), or that without the sown
    name; the first that has both projections (``k`` is ``None`` for a fused projection)."""
    stripped = key
    while stripped and stripped[-1].isdigit():
        stripped = stripped[:-1]
    for prefix in (key, stripped, stripped[:-1]):
        q = _projection(index, prefix, query)
        k = _projection(index, prefix, key_name)
        if q is not None and k is not None:
            return prefix, q, k
        f = _projection(index, prefix, fused) if fused is not None else None
        if f is not None:
            return prefix, f, None
    names = f"{query!r} and {key_name!r}" + (f" (or {fused!r})" if fused else "")
    raise ValueError(
        f"max_logits entry {_name(key)!r}: no {names} projections under it "
        f"(looked for {_name(stripped[:-1] + (query, 'kernel'))!r} and the like) in the "
        "parameters"
    )


def _head_view(x, heads: int, head_dim: int | None, batch: tuple, *, bias: bool, where: str):
    """The leaf as ``(*batch, [in,] heads, head_dim)`` and the map back: a kernel is
    ``(*batch, in, heads, head_dim)`` (``nnx.LinearGeneral``) or ``(*batch, in, heads·head_dim)``,
    a bias ``(*batch, heads, head_dim)`` or ``(*batch, heads·head_dim)``."""
    shape = jnp.shape(x)
    nb = len(batch)
    split = nb + (2 if bias else 3)
    flat = nb + (1 if bias else 2)
    ok = tuple(shape[:nb]) == tuple(batch)
    if ok and len(shape) == split and shape[-2] == heads:
        if head_dim is None or shape[-1] == head_dim:
            return x, lambda y: y
    elif ok and len(shape) == flat and shape[-1] % heads == 0:
        d = shape[-1] // heads
        if head_dim is None or d == head_dim:
            return x.reshape(shape[:-1] + (heads, d)), lambda y: y.reshape(shape)
    raise ValueError(
        f"parameter {where!r} has shape {tuple(shape)}: it is not a "
        f"{'bias' if bias else 'kernel'} of {heads} heads"
        f"{'' if head_dim is None else f' of dim {head_dim}'} with leading axes {tuple(batch)} "
        f"(expected {tuple(batch) + (() if bias else ('in',)) + (heads, 'head_dim')} or "
        f"{tuple(batch) + (() if bias else ('in',)) + ('heads*head_dim',)})"
    )


def _heads_of(x, batch: tuple, head_dim: int, *, where: str) -> int:
    """The number of heads of a key kernel whose head dim is ``head_dim``."""
    shape = jnp.shape(x)
    if len(shape) == len(batch) + 3:
        return shape[-2]
    if len(shape) == len(batch) + 2 and shape[-1] % head_dim == 0:
        return shape[-1] // head_dim
    raise ValueError(
        f"parameter {where!r} has shape {tuple(shape)}: not a key kernel of head dim {head_dim} "
        f"with leading axes {tuple(batch)}"
    )


def qk_clip(
    threshold: float = 100.0,
    *,
    query: str = "query",
    key: str = "key",
    fused: str | None = None,
    manifold=None,
    weight_dimension_numbers=None,
) -> optax.GradientTransformationExtraArgs:
    r"""QK-clip: cap each attention head's largest logit by rescaling its updated projections.

    With ``S_h`` the largest logit ``q·k/√d_h`` of head ``h`` on the batch (after masking) and
    ``τ`` the threshold,

    .. math::

      \gamma_h = \min(1, \tau / S_h), \qquad
      W_q^h \leftarrow \sqrt{\gamma_h}\, W_q^h, \quad W_k^h \leftarrow \sqrt{\gamma_h}\, W_k^h

    for multi-head attention, so that logits computed from the rescaled weights on the same
    inputs are at most ``τ``; when key heads are shared by several query heads (grouped-query,
    multi-query attention) ``W_q^h ← γ_h W_q^h`` and the shared key is untouched. The weights
    rescaled are the **updated** ones, ``W + u``: the update returned is ``(W + u)·scale − W``
    for the projections (kernel and bias) of the heads with ``S_h > τ``; the other heads, every
    other leaf and heads with a non-finite ``S_h`` keep ``u`` bitwise. It goes last in a chain,
    after the learning rate, and needs ``params`` and ``max_logits`` in ``update``.

    ``max_logits`` is a tree whose paths name attention modules: ``nnx.pop(model,
    nnx.Intermediate)`` after a forward pass with
    :func:`~manifold_optax.attention_with_max_logits` (``sow_weights=True``), or a dict
    ``{module path: S}`` from :func:`~manifold_optax.max_attention_logits`. An entry's module
    is its path, or that path without the ``sow`` tuple index and the sown name; the
    parameters ``module/query/kernel`` (or a bare ``module/query``), ``module/query/bias`` and
    the same for ``key`` are rescaled. ``S`` is ``(*stack, heads)``, the leading axes those of
    stacked layers (``nnx.scan``); the kernels are ``(*stack, in, heads, head_dim)`` (Flax's
    ``LinearGeneral``) or ``(*stack, in, heads·head_dim)``. A module whose queries, keys and
    values come from one fused projection named ``fused``, a kernel ``(*stack, in,
    3·heads·head_dim)`` whose columns are the queries, the keys and the values of every head in
    that order (and its bias), has the query and key columns of a clipped head rescaled, the
    value columns kept. Several entries for one module (a module called twice) take their
    maximum.

    Rescaling moves a weight off a manifold, so a rescaled leaf that ``manifold`` (the spec of
    :func:`~manifold_optax.manifold_muon`) puts on one is an error; a spectral sphere on
    ``W_q``, ``W_k`` bounds the logits a priori instead (see the guide).

    Args:
      threshold: ``τ > 0``, the largest logit allowed.
      query: the name of the query projection inside an attention module.
      key: the name of the key projection inside an attention module.
      fused: optional name of a fused query-key-value projection inside an attention module
        (``"qkv"``), used where a module has no separate ``query`` and ``key``.
      manifold: optional manifold spec of the parameters (as ``manifold_muon``'s); a leaf it
        would rescale that has a manifold raises ValueError naming it.
      weight_dimension_numbers: the weight dimension spec that goes with ``manifold``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with an empty state.

    Raises:
      ValueError: ``threshold`` not positive; in ``update``, no ``params`` or no ``max_logits``
        (or an empty one), an entry with no query and key projections under its path, shapes
        that do not match the entry's heads, or a rescaled leaf on a manifold.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import manifold_optax as mo
      >>> params = {"attn": {"query": {"kernel": jnp.ones((4, 2, 3))},
      ...                    "key": {"kernel": jnp.ones((4, 2, 3))}}}
      >>> tx = optax.chain(optax.sgd(0.0), mo.qk_clip(10.0))
      >>> state = tx.init(params)
      >>> max_logits = {"attn": jnp.array([40.0, 5.0])}  # head 0 over the threshold
      >>> updates, state = tx.update(params, state, params, max_logits=max_logits)
      >>> new = optax.apply_updates(params, updates)
      >>> new["attn"]["query"]["kernel"][0, :, 0]  # head 0 × √(10/40)
      Array([0.5, 1. ], dtype=float32)

    References:
      Kimi Team, `Kimi K2: Open Agentic Intelligence <https://arxiv.org/abs/2507.20534>`_, 2025
    """
    if not (isinstance(threshold, int | float) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a finite positive number, got {threshold!r}")
    tau = float(threshold)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, *, max_logits=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("qk_clip needs params: call update(updates, state, params, ...)")
        if max_logits is None:
            raise ValueError(
                "qk_clip needs max_logits: call update(updates, state, params, max_logits=...) "
                "with nnx.pop(model, nnx.Intermediate) or a {module path: S} tree"
            )
        entries = jax.tree_util.tree_flatten_with_path(max_logits)[0]
        if not entries:
            raise ValueError(
                "max_logits is empty: was the attention called with sow_weights=True and "
                "attention_fn=mo.attention_with_max_logits?"
            )
        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        keys = [_key(p) for p, _ in flat]
        index = {k: i for i, k in enumerate(keys)}
        u = [x for _, x in flat]
        w = jax.tree.leaves(params)
        if len(w) != len(u):
            raise ValueError("params and updates have different structures")
        manifolds = None
        if manifold is not None:
            dims = view_specs(weight_dimension_numbers, params)
            manifolds = resolve_manifolds(manifold, params, dims)

        modules: dict = {}
        for path, s in entries:
            k = _key(path)
            prefix, q_idx, k_idx = _module_of(k, index, query, key, fused)
            s = jnp.asarray(s)
            if s.ndim < 1:
                raise ValueError(f"max_logits entry {_name(k)!r} must be (*stack, heads), got ()")
            modules.setdefault(prefix, (q_idx, k_idx, []))[2].append((k, s))

        for prefix, (q_idx, k_idx, found) in modules.items():
            shapes = {s.shape for _, s in found}
            if len(shapes) > 1:
                raise ValueError(
                    f"max_logits entries for module {_name(prefix)!r} have different shapes: "
                    f"{sorted(shapes)}"
                )
            s = found[0][1] if len(found) == 1 else jnp.max(jnp.stack([v for _, v in found]), 0)
            batch, heads = s.shape[:-1], s.shape[-1]
            s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
            clip = jnp.isfinite(s) & (s > tau)
            gamma = jnp.where(clip, tau / jnp.where(clip, s, 1.0), 1.0)
            if k_idx is None:  # fused: the 3·heads column blocks are q heads, k heads, v heads
                root = jnp.sqrt(gamma)
                scale = jnp.concatenate([root, root, jnp.ones_like(root)], axis=-1)
                mask = jnp.concatenate([clip, clip, jnp.zeros_like(clip)], axis=-1)
                for i in q_idx:
                    if i is None:
                        continue
                    _check_off_manifold(manifolds, i, keys)
                    wv, _ = _head_view(
                        w[i], 3 * heads, None, batch, bias=i == q_idx[1], where=_name(keys[i])
                    )
                    u[i] = _rescaled(
                        u[i],
                        w[i],
                        scale,
                        mask,
                        3 * heads,
                        wv.shape[-1],
                        batch,
                        i == q_idx[1],
                        _name(keys[i]),
                    )
                continue
            qk, qb = q_idx
            kk, kb = k_idx
            qv, _ = _head_view(w[qk], heads, None, batch, bias=False, where=_name(keys[qk]))
            head_dim = qv.shape[-1]
            key_heads = _heads_of(w[kk], batch, head_dim, where=_name(keys[kk]))
            if key_heads == 0 or heads % key_heads:
                raise ValueError(
                    f"module {_name(prefix)!r}: {key_heads} key heads do not divide the {heads} "
                    "query heads of its max_logits entry"
                )
            shared = key_heads != heads
            targets = [(qk, False, gamma if shared else jnp.sqrt(gamma))]
            if qb is not None:
                targets.append((qb, True, targets[0][2]))
            if not shared:
                targets.append((kk, False, jnp.sqrt(gamma)))
                if kb is not None:
                    targets.append((kb, True, jnp.sqrt(gamma)))
            for i, is_bias, scale in targets:
                _check_off_manifold(manifolds, i, keys)
                where = _name(keys[i])
                u[i] = _rescaled(u[i], w[i], scale, clip, heads, head_dim, batch, is_bias, where)
        return jax.tree_util.tree_unflatten(treedef, u), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_off_manifold(manifolds, i: int, keys) -> None:
    if manifolds is not None and manifolds[i] is not None:
        raise ValueError(
            f"qk_clip would rescale {_name(keys[i])!r}, which is on the manifold "
            f"{manifolds[i]!r}: rescaling moves it off; leave it off the manifold "
            "or bound its logits with a spectral sphere instead of qk_clip"
        )


def _rescaled(u, w, scale, mask, heads, head_dim, batch, is_bias, where):
    """``(W + u)·scale − W`` on the heads where ``mask``, ``u`` bitwise elsewhere."""
    wv, _ = _head_view(w, heads, head_dim, batch, bias=is_bias, where=where)
    uv, unview = _head_view(u, heads, head_dim, batch, bias=is_bias, where=where)
    extra = (1,) * (uv.ndim - len(batch) - 2)
    scale = scale.reshape(batch + extra + (heads, 1))
    mask = mask.reshape(batch + extra + (heads, 1))
    dtype = jnp.promote_types(jnp.result_type(w, u), scale.dtype)
    wc = wv.astype(dtype)
    clipped = ((wc + uv.astype(dtype)) * scale.astype(dtype) - wc).astype(uv.dtype)
    return unview(jnp.where(mask, clipped, uv))
