"""Muon on a Linen model with MaxText-style scanned layers (kernels stored as (in, layers, out)).

Run: python docs/examples/linen_muon.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import manifold_optax as mo


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.Dense(32, name="mlp")(nn.gelu(nn.Dense(64, name="up")(h))), None


class Model(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(64, 32, name="embed")(tokens)
        # MaxText's param_scan_axis=1: each scanned kernel is stored as (in, layers, out).
        layers = nn.scan(Block, variable_axes={"params": 1}, split_rngs={"params": True}, length=4)
        h, _ = layers(name="layers")(h, None)
        return nn.Dense(64, name="lm_head")(nn.RMSNorm()(h))


def main(steps: int = 30) -> tuple[float, float]:
    model = Model()
    tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, 64)
    params = model.init(jax.random.key(1), tokens)["params"]
    # Traced abstractly: every kernel's matrix, the scanned axis a batch of 4 layers;
    # the embedding and the head get None (AdamW).
    specs = mo.flax_dimension_numbers(model, tokens)
    assert specs["layers"]["up"]["kernel"] == mo.MatrixSpec((0,), (2,))
    tx = mo.muon(0.02, adam_learning_rate=3e-3, weight_dimension_numbers=specs)
    state = tx.init(params)

    def loss_fn(params):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    first = last = None
    for _ in range(steps):
        params, state, loss = step(params, state)
        first = float(loss) if first is None else first
        last = float(loss)
    return first, last


if __name__ == "__main__":
    first, last = main()
    print(f"loss {first:.3f} -> {last:.3f}")
    assert jnp.isfinite(last) and last < first
