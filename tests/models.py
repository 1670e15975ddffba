"""Small Flax NNX models and a fixed regression dataset for the optimizer tests."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class MLP(nnx.Module):
    def __init__(self, sizes=(16, 32, 32, 4), *, rngs):
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.tanh(layer(x))
        return self.layers[-1](x)


def regression_data(n=256, d_in=16, d_out=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    w = rng.standard_normal((d_in, d_out)).astype(np.float32) / np.sqrt(d_in)
    y = np.tanh(x @ w) + 0.1 * np.sin(3 * x[:, :d_out])
    return jnp.asarray(x), jnp.asarray(y.astype(np.float32))


def train(model, tx, x, y, steps=60):
    """Train under nnx.jit with nnx.Optimizer; return the loss history."""
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(m):
        return jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def step(m, o):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        o.update(m, grads)
        return loss

    return [float(step(model, opt)) for _ in range(steps)]
