"""Writes ``notebooks/04_width_transfer.ipynb`` (without outputs): ``python tools/make_notebook_04.py``."""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell(
        "# Learning rates that transfer across width\n\n"
        "Under the spectral norm, a step of size η moves every layer's RMS→RMS operator norm by "
        "about η, whatever the layer's width (the modular norm of the docs' mathematics page, "
        "Bernstein's *Modular Manifolds*). So the best learning rate of `mo.muon` and of "
        "`mo.manifold_muon` on shape-aware spectral spheres (radius √(fan_out/fan_in): unit "
        "RMS→RMS gain) should stay where it is as the network widens, while AdamW's, whose "
        "step moves each entry by about η, drifts to smaller values.\n\n"
        "We train a 3-layer MLP student on a fixed random teacher at several widths, each "
        "optimizer over the same ×2 grid of learning rates, and find the best grid point per "
        "width. `benchmarks/gpt.py --part width` runs the same study on a GPT."
    ),
    new_code_cell(
        "widths = [32, 64, 128]\nsteps = 150\nbatch = 128",
        metadata={"tags": ["parameters"]},
    ),
    new_code_cell(
        "import math\n\nimport jax\nimport jax.numpy as jnp\nimport numpy as np\nimport optax\n\n"
        "import manifold_optax as mo\n\n"
        "D_IN, D_OUT = 16, 8\n"
        "k_teacher, k_data = jax.random.split(jax.random.key(0))\n"
        "teacher = [jax.random.normal(k, s) / math.sqrt(s[0]) for k, s in zip(\n"
        "    jax.random.split(k_teacher, 2), [(D_IN, 64), (64, D_OUT)])]\n\n\n"
        "def target(x):\n"
        "    return jnp.tanh(x @ teacher[0]) @ teacher[1]\n\n\n"
        "def init(width, key):\n"
        "    shapes = [(D_IN, width), (width, width), (width, D_OUT)]\n"
        "    ks = jax.random.split(key, 3)\n"
        "    return {f'w{i}': jax.random.normal(k, s) / math.sqrt(s[0])\n"
        "            for i, (k, s) in enumerate(zip(ks, shapes))}\n\n\n"
        "def predict(p, x):\n"
        "    h = jnp.tanh(x @ p['w0'])\n"
        "    h = jnp.tanh(h @ p['w1'])\n"
        "    return h @ p['w2']\n\n\n"
        "def loss(p, x):\n"
        "    return jnp.mean((predict(p, x) - target(x)) ** 2)\n\n\n"
        "x_val = jax.random.normal(jax.random.key(1), (1024, D_IN))"
    ),
    new_code_cell(
        "spectral = mo.by_shape(lambda fan_in, fan_out: mo.SpectralSphere(math.sqrt(fan_out / fan_in)))\n"
        "OPTIMIZERS = {\n"
        "    'adamw': (lambda lr: optax.adamw(lr), [2.5e-4 * 2**k for k in range(7)], None),\n"
        "    'muon': (lambda lr: mo.muon(lr), [0.0025 * 2**k for k in range(7)], None),\n"
        "    'spectral_sphere': (lambda lr: mo.manifold_muon(lr, spectral),\n"
        "                        [0.005 * 2**k for k in range(7)], spectral),\n"
        "}\n\n\n"
        "def train(name, lr, width):\n"
        "    make, _, spec = OPTIMIZERS[name]\n"
        "    params = init(width, jax.random.key(2))\n"
        "    if spec is not None:\n"
        "        params = mo.project_params(params, spec)\n"
        "    tx = make(optax.cosine_decay_schedule(lr, steps))\n\n"
        "    def step(carry, key):\n"
        "        p, s = carry\n"
        "        g = jax.grad(loss)(p, jax.random.normal(key, (batch, D_IN)))\n"
        "        u, s = tx.update(g, s, p)\n"
        "        return (optax.apply_updates(p, u), s), None\n\n"
        "    keys = jax.random.split(k_data, steps)\n"
        "    (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, keys))((params, tx.init(params)))\n"
        "    v = float(loss(params, x_val))\n"
        "    return v if math.isfinite(v) else math.inf\n\n\n"
        "results = {name: {d: [train(name, lr, d) for lr in grid] for d in widths}\n"
        "           for name, (_, grid, _) in OPTIMIZERS.items()}"
    ),
    new_code_cell(
        "best = {name: {d: int(np.argmin(results[name][d])) for d in widths} for name in results}\n"
        "shift = {name: best[name][widths[-1]] - best[name][widths[0]] for name in results}\n"
        "for name, (_, grid, _) in OPTIMIZERS.items():\n"
        '    print(f"{name:16s} best lr per width {[grid[best[name][d]] for d in widths]}  "\n'
        '          f"moves {shift[name]:+d} grid points")'
    ),
    new_code_cell(
        "import matplotlib.pyplot as plt\n\n"
        "fig, axes = plt.subplots(1, len(OPTIMIZERS), figsize=(12, 3.5))\n"
        "for ax, (name, (_, grid, _)) in zip(axes, OPTIMIZERS.items()):\n"
        "    for d in widths:\n"
        "        ax.plot(grid, results[name][d], 'o-', label=f'width {d}')\n"
        "    ax.set(xscale='log', yscale='log', xlabel='learning rate', title=name)\n"
        "axes[0].set_ylabel('validation loss')\n"
        "axes[0].legend()\n"
        "fig.tight_layout()"
    ),
    new_markdown_cell(
        "The claim, asserted: under the spectral-norm geometry (Muon, and manifold Muon on "
        "shape-aware spectral spheres) the best learning rate moves at most one grid point "
        "(a factor 2) from the narrowest network to one 4× wider, and each optimizer's best "
        "run learns (its loss is below the loss of predicting zero)."
    ),
    new_code_cell(
        "zero = float(jnp.mean(target(x_val) ** 2))\n"
        "for name in ('muon', 'spectral_sphere'):\n"
        "    assert abs(shift[name]) <= 1, (name, best[name])\n"
        "for name in results:\n"
        "    assert min(results[name][widths[-1]]) < 0.5 * zero, (name, results[name])"
    ),
]
nb = new_notebook(
    cells=cells,
    metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
)
nbformat.write(nb, pathlib.Path(__file__).parents[1] / "notebooks" / "04_width_transfer.ipynb")
