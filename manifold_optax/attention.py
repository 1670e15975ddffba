"""The largest attention logit of each head, for QK-clip: a function for hand-written attention
and an ``attention_fn`` for ``flax.nnx.MultiHeadAttention`` that sows it."""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["max_attention_logits", "attention_with_max_logits", "MAX_LOGITS"]

#: The name under which :func:`attention_with_max_logits` sows the max logits.
MAX_LOGITS = "max_logits"


def max_attention_logits(q, k, mask=None, *, is_causal: bool = False):
    r"""The largest attention logit of each query head.

    .. math::

      S_h = \max_{b,\,i,\,j\,:\ \mathrm{mask}_{b,h,i,j}} \frac{q_{b,i,h} \cdot k_{b,j,g(h)}}{\sqrt{d}}

    over every batch element ``b``, query position ``i`` and key position ``j`` that the mask
    keeps, where ``g(h)`` is the key head of query head ``h``: ``h`` itself for multi-head
    attention, ``h // (H_q / H_k)`` when ``H_k`` key heads are shared by groups of query heads
    (grouped-query and multi-query attention, Flax's order). An additive attention bias is not
    part of the logit: it does not scale with ``W_q``, ``W_k``. Under ``jit`` with a sharded batch
    the maximum is over the global batch (XLA adds the reduction across devices).

    Args:
      q: queries ``(*batch, T_q, H_q, d)`` (Flax's layout).
      k: keys ``(*batch, T_k, H_k, d)``; ``H_k`` divides ``H_q``.
      mask: optional boolean mask broadcastable to ``(*batch, H_q, T_q, T_k)`` (Flax's), ``False``
        where a logit is masked out.
      is_causal: also mask the keys after each query (``j > i``).

    Returns:
      ``(H_q,)`` float array, at least float32; ``-inf`` for a head whose logits are all masked.

    Example:
      >>> import jax.numpy as jnp
      >>> import manifold_optax as mo
      >>> q = jnp.ones((2, 5, 4, 8))  # batch 2, length 5, 4 query heads, head_dim 8
      >>> k = jnp.ones((2, 5, 2, 8))  # 2 key heads: grouped-query attention
      >>> mo.max_attention_logits(q, k).shape
      (4,)
    """
    q = jnp.asarray(q)
    k = jnp.asarray(k)
    if q.ndim < 3 or k.ndim != q.ndim:
        raise ValueError(
            f"q and k must be (*batch, length, heads, head_dim) with the same rank, got shapes "
            f"{q.shape} and {k.shape}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} and {k.shape[-1]}")
    hq, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if hq % hk:
        raise ValueError(f"the key heads ({hk}) must divide the query heads ({hq})")
    dtype = jnp.promote_types(jnp.result_type(q, k), jnp.float32)
    q, k = q.astype(dtype), k.astype(dtype)
    g = hq // hk
    qg = q.reshape(q.shape[:-2] + (hk, g, d))
    logits = jnp.einsum("...qhgd,...khd->...hgqk", qg, k) / jnp.sqrt(jnp.asarray(d, dtype))
    logits = logits.reshape(logits.shape[:-4] + (hq,) + logits.shape[-2:])
    keep = None if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), logits.shape)
    if is_causal:
        tq, tk = logits.shape[-2:]
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((tq, tk), bool)), logits.shape)
        keep = causal if keep is None else keep & causal
    if keep is not None:
        logits = jnp.where(keep, logits, -jnp.inf)
    axes = tuple(a for a in range(logits.ndim) if a != logits.ndim - 3)
    return jnp.max(logits, axis=axes)


def attention_with_max_logits(
    query,
    key,
    value,
    bias=None,
    mask=None,
    broadcast_dropout: bool = True,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module=None,
    is_causal: bool = False,
    **kwargs,
):
    r"""Flax's dot-product attention that also sows each head's largest logit, for
    :func:`~manifold_optax.qk_clip`.

    A drop-in ``attention_fn`` for ``flax.nnx.MultiHeadAttention``: the output is
    ``flax.nnx.dot_product_attention``'s (the weights from ``dot_product_attention_weights``,
    dropout included), and ``S_h`` of :func:`max_attention_logits` (after the mask) is sown on
    the calling module as ``nnx.Intermediate`` ``"max_logits"``. The module passes itself only
    when called with ``sow_weights=True``; without a module nothing is sown. The attention
    weights themselves are not sown.

    Args:
      query: ``(*batch, T_q, H_q, d)``.
      key: ``(*batch, T_k, H_k, d)``; ``H_k`` divides ``H_q``.
      value: ``(*batch, T_k, H_k, d_v)``.
      bias: optional additive bias broadcastable to ``(*batch, H_q, T_q, T_k)`` (not part of the
        sown logit).
      mask: optional boolean mask broadcastable to ``(*batch, H_q, T_q, T_k)``.
      broadcast_dropout: as Flax's.
      dropout_rng: as Flax's.
      dropout_rate: as Flax's.
      deterministic: as Flax's.
      dtype: as Flax's.
      precision: as Flax's.
      module: the ``nnx.Module`` to sow on (``MultiHeadAttention`` passes itself with
        ``sow_weights=True``), or ``None``.
      is_causal: mask the keys after each query.
      **kwargs: passed to ``dot_product_attention_weights`` (``promote_dtype``).

    Returns:
      The attention output ``(*batch, T_q, H_q, d_v)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import manifold_optax as mo
      >>> attn = nnx.MultiHeadAttention(
      ...     num_heads=2, in_features=8, attention_fn=mo.attention_with_max_logits,
      ...     decode=False, rngs=nnx.Rngs(0))
      >>> y = attn(jnp.ones((3, 5, 8)), sow_weights=True)
      >>> nnx.pop(attn, nnx.Intermediate)["max_logits"][0].shape
      (2,)
    """
    from flax import nnx
    from flax.nnx.nn.attention import dot_product_attention_weights

    weights = dot_product_attention_weights(
        query,
        key,
        bias,
        mask,
        broadcast_dropout,
        dropout_rng,
        dropout_rate,
        deterministic,
        dtype,
        precision,
        None,
        is_causal=is_causal,
        **kwargs,
    )
    if module is not None:
        module.sow(
            nnx.Intermediate,
            MAX_LOGITS,
            max_attention_logits(query, key, mask, is_causal=is_causal),
        )
    hq, hv = weights.shape[-3], value.shape[-2]
    value = value.astype(weights.dtype)
    if hq != hv:
        w = weights.reshape(weights.shape[:-3] + (hv, hq // hv) + weights.shape[-2:])
        out = jnp.einsum("...hgqk,...khd->...qhgd", w, value, precision=precision)
        return out.reshape(out.shape[:-3] + (hq, out.shape[-1]))
    return jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=precision)
