"""The GPT of ``benchmarks/gpt.py``: a decoder-only Transformer as Flax NNX users write one.

Token embedding (bytes, vocabulary 256), rotary position embedding, one fused QKV kernel per
block (split into its q, k, v matrices by ``mo.flax_dimension_numbers(..., split_fused=...)``),
causal multi-head attention, RMSNorm before attention and MLP, a SwiGLU MLP, an untied output
head. The blocks are created once with ``nnx.vmap`` (every parameter gets a leading layer
axis) and run with ``nnx.scan`` (one traced block). The data: the Python standard library's
source at byte level, split into train and validation by file, cut into fixed-length windows
that each epoch visits in a fresh random order.
"""

from __future__ import annotations

import math
import pathlib
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import manifold_optax as mo

VOCAB = 256  # bytes


def load_corpus(max_bytes: int, val_fraction: float = 0.1, seed: int = 0):
    """``(train, val)`` uint8 arrays: the standard library's ``.py`` files (recursively) in a
    seeded random order, the first files up to ``val_fraction`` of the bytes for validation,
    the rest for training, ``max_bytes`` in all."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    np.random.default_rng(seed).shuffle(files)
    val, train, total = [], [], 0
    for f in files:
        try:
            b = f.read_bytes()
        except OSError:
            continue
        (val if total < val_fraction * max_bytes else train).append(b)
        total += len(b)
        if total >= max_bytes:
            break
    as_array = lambda chunks: np.frombuffer(b"\n".join(chunks), dtype=np.uint8).copy()
    return as_array(train), as_array(val)


class Windows:
    """Batches of ``batch`` windows of ``seq + 1`` bytes: the data cut into consecutive
    windows (a random offset per epoch), each epoch in a new random order."""

    def __init__(self, data: np.ndarray, seq: int, batch: int, seed: int = 0):
        self.data, self.seq, self.batch = data, seq, batch
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []

    def _epoch(self):
        n = self.seq + 1
        offset = int(self.rng.integers(0, n))
        starts = np.arange(offset, len(self.data) - n + 1, n)
        self.order = list(self.rng.permutation(starts))

    def next(self) -> np.ndarray:
        if len(self.order) < self.batch:
            self._epoch()
        starts, self.order = self.order[: self.batch], self.order[self.batch :]
        return np.stack([self.data[s : s + self.seq + 1] for s in starts]).astype(np.int32)


def rope_tables(seq: int, head_dim: int, base: float = 10000.0):
    """``(cos, sin)``, each ``(seq, head_dim // 2)``: rotary angles ``t · base^(−2i/head_dim)``."""
    inv = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    ang = jnp.arange(seq, dtype=jnp.float32)[:, None] * inv[None, :]
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin):
    """Rotate the pairs ``(x[..., :h/2], x[..., h/2:])`` of ``x (b, t, heads, h)`` by the
    angles of each position."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


class Attention(nnx.Module):
    def __init__(self, d: int, heads: int, *, rngs):
        init = nnx.initializers.lecun_normal()
        self.heads = heads
        self.qkv = nnx.Linear(d, 3 * d, use_bias=False, kernel_init=init, rngs=rngs)
        self.o = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)

    def __call__(self, x, cos, sin):
        """The block's output and each head's largest logit (for QK-clip)."""
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        heads = lambda z: z.reshape(b, t, self.heads, d // self.heads)
        q, k, v = apply_rope(heads(q), cos, sin), apply_rope(heads(k), cos, sin), heads(v)
        mask = jnp.tril(jnp.ones((t, t), bool))
        s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d // self.heads)
        max_logits = jnp.max(jnp.where(mask, s, -jnp.inf), axis=(0, 2, 3))
        p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
        out = jnp.einsum("bhts,bshd->bthd", p, v).reshape(b, t, d)
        return self.o(out), max_logits


class SwiGLU(nnx.Module):
    def __init__(self, d: int, hidden: int, *, rngs):
        init = nnx.initializers.lecun_normal()
        self.gate = nnx.Linear(d, hidden, use_bias=False, kernel_init=init, rngs=rngs)
        self.up = nnx.Linear(d, hidden, use_bias=False, kernel_init=init, rngs=rngs)
        self.down = nnx.Linear(hidden, d, use_bias=False, kernel_init=init, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, hidden: int, *, rngs):
        self.attn_norm = nnx.RMSNorm(d, rngs=rngs)
        self.attn = Attention(d, heads, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(d, rngs=rngs)
        self.mlp = SwiGLU(d, hidden, rngs=rngs)

    def __call__(self, x, cos, sin):
        a, max_logits = self.attn(self.attn_norm(x), cos, sin)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), max_logits


def swiglu_hidden(d: int) -> int:
    """``8d/3`` rounded up to a multiple of 16 (the SwiGLU MLP's FLOPs match a ``4d`` GELU's)."""
    return -(-8 * d // 3 // 16) * 16


class GPT(nnx.Module):
    def __init__(self, d: int, layers: int, heads: int, seq: int, *, rngs):
        self.embed = nnx.Embed(VOCAB, d, rngs=rngs)
        hidden = swiglu_hidden(d)

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return Block(d, heads, hidden, rngs=rngs)

        self.blocks = blocks(rngs)
        self.norm = nnx.RMSNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, VOCAB, use_bias=False, rngs=rngs)
        self.cos, self.sin = (nnx.Variable(t) for t in rope_tables(seq, d // heads))

    def __call__(self, tokens):
        """Logits ``(b, t, 256)`` and the largest attention logit of each layer and head
        ``(layers, heads)`` (over this batch, causal mask)."""
        t = tokens.shape[1]
        cos, sin = self.cos[...][:t], self.sin[...][:t]

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
        def run(block, x):
            return block(x, cos, sin)

        x, max_logits = run(self.blocks, self.embed(tokens))
        return self.head(self.norm(x)), max_logits


def dimension_numbers(model: GPT):
    """Each parameter's matrix: the fused QKV kernel is three ``d × d`` matrices per layer,
    every other hidden kernel one per layer; embeddings, head and norm scales ``None``."""
    return mo.flax_dimension_numbers(model, split_fused={"qkv": 3})


def count_params(model: GPT) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
