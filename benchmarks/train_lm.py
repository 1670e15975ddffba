"""Character-level language model: AdamW vs Muon, its variants and manifold Muon at equal
steps.

A small decoder-only Transformer (Flax NNX, ~1M parameters by default) trained on the Python
standard library's own source files, read from the running interpreter's install (real text,
offline). Each optimizer gets a 3-point learning-rate sweep; we report the final validation
loss and the number of steps each needs to reach AdamW's final validation loss.

Run: ``python benchmarks/train_lm.py`` (default: 24 runs, about an hour on 2 idle CPU cores) or
``--large`` (4× the steps, a wider model). Results: ``benchmarks/results/train_lm.{json,md,png}``.
``--only NAME ...`` runs those optimizers alone and merges their runs into the existing results
(same configuration required), each replacing an earlier run of the same optimizer and learning
rate.

Manifold variants put every hidden matrix (attention q/k/v/o, MLP up/down) on the manifold;
embeddings, the output head and norms use AdamW. Muon, NorMuon and AdaMuon send embeddings and
the head to AdamW (at ``adam_lr``, as Muon). ``muon_qk_clip`` is Muon followed by
``mo.qk_clip(QK_CLIP_THRESHOLD)``: every block sows its heads' largest logit
(``mo.max_attention_logits`` on its queries and keys, causal mask) and the step passes what it
captured as ``max_logits=``. Every run records, at each evaluation, the largest attention logit
(over layers and heads) of the training batches since the previous evaluation, and how many
(step, layer, head) logits passed the threshold.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import manifold_optax as mo

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _curves import best_runs, steps_to  # noqa: E402
from _machine import machine  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


def load_corpus(max_bytes: int, seed: int = 0):
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    rng = np.random.default_rng(seed)
    rng.shuffle(files)
    chunks, total = [], 0
    for f in files:
        try:
            b = f.read_bytes()
        except OSError:
            continue
        chunks.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    data = np.frombuffer(b"\n".join(chunks)[:max_bytes], dtype=np.uint8).copy()
    data[data >= 128] = ord("?")  # ASCII vocabulary of 128 symbols
    n_val = len(data) // 10
    return data[n_val:], data[:n_val]


class Block(nnx.Module):
    def __init__(self, d, heads, *, rngs):
        self.heads = heads
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        init = nnx.initializers.lecun_normal()
        self.q = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)
        self.k = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)
        self.v = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)
        self.o = nnx.Linear(d, d, use_bias=False, kernel_init=init, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, use_bias=False, kernel_init=init, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, use_bias=False, kernel_init=init, rngs=rngs)

    def __call__(self, x, sow=False):
        b, t, d = x.shape
        h = self.ln1(x)
        split = lambda z: z.reshape(b, t, self.heads, d // self.heads)
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        att = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d // self.heads)
        mask = jnp.tril(jnp.ones((t, t), bool))
        if sow:  # each head's largest logit, for QK-clip (paths blocks/i/max_logits → q, k)
            self.sow(nnx.Intermediate, "max_logits", mo.max_attention_logits(q, k, mask))
        att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
        x = x + self.o(jnp.einsum("bhts,bshd->bthd", att, v).reshape(b, t, d))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class CharLM(nnx.Module):
    def __init__(self, vocab, d, layers, heads, seq, *, rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq, d)))
        self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens, sow=False):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for blk in self.blocks:
            x = blk(x, sow)
        return self.head(self.ln(x))


QK_CLIP_THRESHOLD = 20.0  # below Muon's max logit at every lr here, so QK-clip engages

HIDDEN = ("/q/", "/k/", "/v/", "/o/", "/up/", "/down/")


def is_hidden(path: str) -> bool:
    return any(h in "/" + path + "/" for h in HIDDEN) and path.endswith("kernel")


def manifold_spec(kind):
    make = {
        "stiefel": lambda fi, fo: mo.Stiefel(),
        "spectral_sphere": lambda fi, fo: mo.SpectralSphere(math.sqrt(fo / fi)),
        "sphere": lambda fi, fo: mo.Sphere(math.sqrt(fo)),
    }[kind]

    def spec(params):
        return jax.tree_util.tree_map_with_path(
            lambda p, x: make(*x.shape) if is_hidden(mo.path_to_str(p)) else None, params
        )

    return spec


MUON_FAMILY = {"muon": mo.muon, "normuon": mo.normuon, "adamuon": mo.adamuon}


def make_tx(name, lr, steps, adam_lr):
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.1)
    adam_sched = optax.warmup_cosine_decay_schedule(
        0.0, adam_lr, max(1, steps // 20), steps, adam_lr * 0.1
    )
    if name == "adamw":
        return optax.adamw(sched, b2=0.95, weight_decay=0.01), None
    base = "muon" if name == "muon_qk_clip" else name
    if base in MUON_FAMILY:
        tx = MUON_FAMILY[base](
            sched,
            fallback_patterns=("embed", "head", "pos"),
            adam_learning_rate=adam_sched,
            adam_b2=0.95,
        )
        if name == "muon_qk_clip":
            tx = optax.chain(tx, mo.qk_clip(QK_CLIP_THRESHOLD, query="q", key="k"))
        return tx, None
    spec = manifold_spec(name)
    return mo.manifold_muon(sched, spec, adam_learning_rate=adam_sched, adam_b2=0.95), spec


def run(name, lr, cfg, train, val, seed=0):
    model = CharLM(128, cfg["d"], cfg["layers"], cfg["heads"], cfg["seq"], rngs=nnx.Rngs(seed))
    tx, spec = make_tx(name, lr, cfg["steps"], cfg["adam_lr"])
    if spec is not None:
        nnx.update(model, mo.project_params(nnx.state(model, nnx.Param), spec))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    seq, bs = cfg["seq"], cfg["batch"]
    clip = name == "muon_qk_clip"

    def loss_fn(m, xy):
        logits = m(xy[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, xy[:, 1:]).mean()

    def sown_loss(m, xy):
        logits, sown = nnx.capture(m, nnx.Intermediate)(xy[:, :-1], sow=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, xy[:, 1:]).mean()
        return loss, sown

    @nnx.jit(donate_argnums=(0, 1))
    def step(m, o, xy):
        (loss, sown), g = nnx.value_and_grad(sown_loss, has_aux=True)(m, xy)
        if clip:
            o.update(m, g, max_logits=sown)
        else:
            o.update(m, g)
        s = jnp.stack(jax.tree.leaves(sown))  # (layers, heads): this batch, before the step
        return loss, jnp.max(s), jnp.sum(s > QK_CLIP_THRESHOLD)

    @nnx.jit
    def evaluate(m, xy):
        return loss_fn(m, xy)

    rng = np.random.default_rng(seed)
    vrng = np.random.default_rng(1234)
    vstarts = vrng.integers(0, len(val) - seq - 1, cfg["val_batches"] * bs)
    vbatches = [
        jnp.asarray(np.stack([val[s : s + seq + 1] for s in vstarts[i * bs : (i + 1) * bs]]))
        for i in range(cfg["val_batches"])
    ]
    curve, logits, t0 = [], [], time.perf_counter()
    window, over, over_steps = -jnp.inf, 0, 0
    for t in range(1, cfg["steps"] + 1):
        starts = rng.integers(0, len(train) - seq - 1, bs)
        xy = jnp.asarray(np.stack([train[s : s + seq + 1] for s in starts]).astype(np.int32))
        loss, s_max, n_over = step(model, opt, xy)
        window = jnp.maximum(window, s_max)
        over = over + n_over
        over_steps = over_steps + (n_over > 0)
        if t % cfg["eval_every"] == 0 or t == cfg["steps"]:
            vl = float(np.mean([float(evaluate(model, v.astype(jnp.int32))) for v in vbatches]))
            curve.append((t, float(loss), vl))
            logits.append((t, float(window)))
            window = -jnp.inf
            if not np.isfinite(vl):
                break
    return {
        "optimizer": name,
        "lr": lr,
        "curve": curve,
        "final_val": curve[-1][2],
        "seconds": time.perf_counter() - t0,
        "max_logit": logits,
        "threshold": QK_CLIP_THRESHOLD,
        "over_threshold": {
            "steps": int(over_steps),
            "logits": int(over),
            "of_steps": curve[-1][0],
            "of_logits": curve[-1][0] * cfg["layers"] * cfg["heads"],
        },
        "machine": machine(),
    }


LRS = {
    "adamw": [1e-3, 3e-3, 1e-2],
    "muon": [0.01, 0.02, 0.04],
    "stiefel": [0.02, 0.05, 0.1],
    "spectral_sphere": [0.02, 0.05, 0.1],
    "sphere": [0.05, 0.15, 0.4],
    "normuon": [0.01, 0.02, 0.04],  # Muon's learning rates (the Frobenius norm is Muon's)
    "adamuon": [1e-3, 3e-3, 1e-2],  # AdamW's (the update has AdamW's RMS)
    "muon_qk_clip": [0.01, 0.02, 0.04],
}


def summarize(runs):
    """The best run of each optimizer (in the order of first appearance) and the summary:
    best lr, final val loss, steps to AdamW's final val loss and their ratio to AdamW's."""
    best = best_runs(runs)
    target = best["adamw"]["final_val"] if "adamw" in best else None
    adam_steps = steps_to(best["adamw"]["curve"], target) if target else None
    summary = {}
    for n, r in best.items():
        s = steps_to(r["curve"], target) if target else None
        summary[n] = {
            "lr": r["lr"],
            "final_val": r["final_val"],
            "steps_to_target": s,
            "ratio": (s / adam_steps) if (s and adam_steps) else None,
        }
    return best, target, summary


def merge(old_runs, new_runs):
    """``old_runs`` with each run of the same optimizer and lr as one of ``new_runs`` replaced
    in place, then the other new runs."""
    new = {(r["optimizer"], r["lr"]): r for r in new_runs}
    out = [new.pop((r["optimizer"], r["lr"]), r) for r in old_runs]
    return out + list(new.values())


def write_results(result, tag):
    target = result["target"]
    best = {
        n: next(r for r in result["runs"] if r["optimizer"] == n and r["lr"] == s["lr"])
        for n, s in result["summary"].items()
    }
    lines = [
        "| optimizer | best lr | final val loss | steps to AdamW's final val | ratio to AdamW |",
        "|---|---|---|---|---|",
    ]
    for n, s in result["summary"].items():
        steps, ratio = s["steps_to_target"], s["ratio"]
        lines.append(
            f"| {n} | {s['lr']:g} | {s['final_val']:.4f} | {steps if steps else 'not reached'} | "
            f"{f'{ratio:.2f}' if ratio else '—'} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    cfg, n_params = result["config"], result["params"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{tag}.md").write_text(
        f"Char-level LM on Python stdlib source, {n_params / 1e6:.2f}M params, "
        f"{cfg['steps']} steps × {cfg['batch']}×{cfg['seq']} tokens\n\n{table}\n"
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for n, r in best.items():
            c = np.asarray(r["curve"])
            ax.plot(c[:, 0], c[:, 2], label=f"{n} (lr {r['lr']:g})")
        if target:
            ax.axhline(target, color="gray", ls=":", lw=1)
        ax.set(xlabel="step", ylabel="validation loss (nats/char)", title="Char-level LM")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / f"{tag}.png", dpi=110)
    except ImportError:
        pass
    print(f"wrote {RESULTS / (tag + '.json')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--large", action="store_true", help="wider model, 4x steps")
    ap.add_argument("--quick", action="store_true", help="smoke test (tiny)")
    ap.add_argument(
        "--optimizers",
        default="adamw,muon,stiefel,spectral_sphere,sphere,muon_qk_clip,normuon,adamuon",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        choices=sorted(LRS),
        help="run only these and merge them into the existing results (same config)",
    )
    ap.add_argument("--lrs", nargs="+", type=float, help="with --only: these learning rates")
    a = ap.parse_args()
    cfg = dict(
        d=128,
        layers=4,
        heads=4,
        seq=128,
        batch=16,
        steps=600,
        eval_every=25,
        val_batches=8,
        adam_lr=3e-3,
        corpus=4_000_000,
    )
    lrs = dict(LRS)
    if a.large:
        cfg.update(d=256, layers=6, heads=8, steps=2400, batch=32, corpus=16_000_000)
    if a.quick:
        cfg.update(
            d=32,
            layers=1,
            heads=2,
            seq=32,
            batch=4,
            steps=20,
            eval_every=10,
            val_batches=1,
            corpus=200_000,
        )
        lrs = {k: v[1:2] for k, v in lrs.items()}
    tag = "train_lm" + ("_large" if a.large else "") + ("_quick" if a.quick else "")
    names = a.only or a.optimizers.split(",")
    old = None
    if a.only:
        path = RESULTS / f"{tag}.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old["config"] != cfg:
                raise SystemExit(f"{path} was run with another config: {old['config']}")
        if a.lrs:
            lrs.update({n: a.lrs for n in names})
    train, val = load_corpus(cfg["corpus"])
    n_params = sum(
        x.size
        for x in jax.tree.leaves(
            nnx.state(
                CharLM(128, cfg["d"], cfg["layers"], cfg["heads"], cfg["seq"], rngs=nnx.Rngs(0)),
                nnx.Param,
            )
        )
    )
    print(f"corpus: {len(train)} train / {len(val)} val bytes; model: {n_params / 1e6:.2f}M params")
    runs = []
    for n in names:
        for lr in lrs[n]:
            r = run(n, lr, cfg, train, val)
            runs.append(r)
            print(
                f"  {n:16s} lr={lr:<6g} final val {r['final_val']:.4f}  "
                f"max logit {max(x for _, x in r['max_logit']):.1f}  ({r['seconds']:.0f}s)",
                flush=True,
            )
            if old is not None:  # merge as we go: an interrupted sweep keeps what it finished
                merged = dict(old, runs=merge(old["runs"], runs))
                _, merged["target"], merged["summary"] = summarize(merged["runs"])
                write_results(merged, tag)
    if old is None:
        _, target, summary = summarize(runs)
        result = {
            "machine": machine(),
            "config": cfg,
            "params": n_params,
            "target": target,
            "summary": summary,
            "runs": runs,
        }
        write_results(result, tag)


if __name__ == "__main__":
    main()
