"""A Flax NNX model sharded over a 2-D mesh (data × fsdp), trained with manifold Muon.

The kernels are split over ``fsdp`` (``nnx.with_partitioning``), the batch over ``data``.
``nnx.Optimizer`` shards the optimizer state like the parameters by itself, and the step
runs under ``nnx.jit`` with no ``in_shardings`` or ``out_shardings``. On a one-device mesh
(``jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1])``) the same code gives
the same parameters to float32 round-off.
"""

import jax
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

import manifold_optax as mo


class MLP(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs):
        kernel = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("fsdp", None))
        self.up = nnx.Linear(d, 2 * d, kernel_init=kernel, rngs=rngs)
        self.down = nnx.Linear(2 * d, d, kernel_init=kernel, rngs=rngs)
        self.head = nnx.Linear(d, 8, kernel_init=kernel, rngs=rngs)

    def __call__(self, x):
        return self.head(x + self.down(nnx.gelu(self.up(x))))


def train(mesh, steps: int = 3, d: int = 64, batch: int = 32):
    """Train for ``steps`` on a fixed batch under ``mesh``; return the model and its
    optimizer."""
    with jax.set_mesh(mesh):
        model = MLP(d, nnx.Rngs(0))
        params = nnx.state(model, nnx.Param)
        nnx.update(model, mo.project_params(params, mo.Stiefel()))
        optimizer = nnx.Optimizer(
            model, mo.manifold_muon(0.02, mo.Stiefel(), fallback="adamw"), wrt=nnx.Param
        )
        x = jax.random.normal(jax.random.key(1), (batch, d))
        y = jax.random.randint(jax.random.key(2), (batch,), 0, 8)
        x, y = jax.device_put(x, P("data", None)), jax.device_put(y, P("data"))

        @nnx.jit
        def step(model, optimizer, x, y):
            def loss_fn(model):
                logits = model(x)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return loss

        for _ in range(steps):
            step(model, optimizer, x, y)
    return model, optimizer
