"""QK-clip: the per-head max logit, the rescaling rule against a float64 numpy reference, heads
over the threshold ending at it on the batch they were measured on, the others untouched, bad
input, the global max under a sharded batch, and the a-priori bound of a spectral sphere."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import manifold_optax as mo

ROOT = pathlib.Path(__file__).parents[1]
EPS32 = float(np.finfo(np.float32).eps)


# ---- float64 numpy references -------------------------------------------------------------


def np_max_logits(q, k, mask=None):
    """``(*batch, T, Hq, D)``, ``(*batch, T, Hk, D)`` → ``(Hq,)``, one head at a time."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    hq, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    out = np.empty(hq)
    for h in range(hq):
        g = h // (hq // hk)
        s = np.einsum("...id,...jd->...ij", q[..., h, :], k[..., g, :]) / np.sqrt(d)
        if mask is not None:
            m = np.broadcast_to(mask, s.shape[:-2] + (hq,) + s.shape[-2:])[..., h, :, :]
            s = np.where(m, s, -np.inf)
        out[h] = s.max()
    return out


def np_qk_clip(wq, wk, s, tau, bq=None, bk=None):
    """The MuonClip rule on ``(in, H·D)`` kernels and ``(H·D,)`` biases (float64)."""
    wq, wk = np.array(wq, np.float64), np.array(wk, np.float64)
    bq = None if bq is None else np.array(bq, np.float64)
    bk = None if bk is None else np.array(bk, np.float64)
    hq = len(s)
    d = wq.shape[-1] // hq
    hk = wk.shape[-1] // d
    for h in range(hq):
        if not (np.isfinite(s[h]) and s[h] > tau):
            continue
        gamma = tau / s[h]
        cols = slice(h * d, (h + 1) * d)
        fq = gamma if hk != hq else np.sqrt(gamma)
        wq[:, cols] *= fq
        if bq is not None:
            bq[cols] *= fq
        if hk == hq:
            wk[:, cols] *= np.sqrt(gamma)
            if bk is not None:
                bk[cols] *= np.sqrt(gamma)
    return wq, wk, bq, bk


# ---- max_attention_logits -----------------------------------------------------------------


@pytest.mark.parametrize("hk", [4, 2, 1])
def test_max_attention_logits_matches_numpy(rng, hk):
    b, t, hq, d = 3, 6, 4, 8
    q = rng.standard_normal((b, t, hq, d)).astype(np.float32)
    k = rng.standard_normal((b, t, hk, d)).astype(np.float32)
    pad = rng.random((b, 1, 1, t)) > 0.3
    pad[..., 0] = True
    causal = np.tril(np.ones((t, t), bool))
    tol = 4 * EPS32 * d * np.abs(q).max() * np.abs(k).max() / np.sqrt(d)
    for mask, kw in [(None, {}), (pad, {}), (pad, {"is_causal": True})]:
        full = pad & causal if kw else mask
        got = np.asarray(mo.max_attention_logits(q, k, mask, **kw))
        np.testing.assert_allclose(got, np_max_logits(q, k, full), rtol=0, atol=tol)
    masked_out = np.zeros((b, hq, t, t), bool)
    assert np.all(np.asarray(mo.max_attention_logits(q, k, masked_out)) == -np.inf)
    with pytest.raises(ValueError, match="divide"):
        mo.max_attention_logits(q, np.zeros((b, t, 3, d), np.float32))


# ---- nnx.MultiHeadAttention, end to end ----------------------------------------------------


def _mha(num_kv_heads, *, heads=4, features=16, boost=4.0):
    attn = nnx.MultiHeadAttention(
        num_heads=heads,
        in_features=features,
        num_kv_heads=num_kv_heads,
        attention_fn=mo.attention_with_max_logits,
        decode=False,
        rngs=nnx.Rngs(0),
    )
    key = jax.random.key(1)
    for proj in (attn.query, attn.key):
        key, k1, k2 = jax.random.split(key, 3)
        proj.kernel[...] = (
            boost * proj.kernel[...] * jnp.linspace(0.5, 2.0, proj.kernel.shape[1])[:, None]
        )
        proj.bias[...] = jax.random.normal(k2, proj.bias.shape)
    return attn


@nnx.jit
def _train_step(model, optimizer, x):
    def loss_fn(model):
        y, sown = nnx.capture(model, nnx.Intermediate)(x, sow_weights=True)
        return jnp.mean(y**2), sown

    grads, max_logits = nnx.grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, max_logits=max_logits)
    return max_logits


def _logits(attn, x):
    return np.asarray(mo.max_attention_logits(attn.query(x), attn.key(x)), np.float64)


@pytest.mark.parametrize("num_kv_heads", [4, 1], ids=["mha", "mqa"])
def test_nnx_heads_over_threshold_end_at_it(num_kv_heads):
    attn = _mha(num_kv_heads)
    x = jax.random.normal(jax.random.key(2), (2, 7, 16))
    s = _logits(attn, x)
    tau = float(np.median(s))
    over = s > tau
    assert over.any() and (~over).any()
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(attn, nnx.Param)))
    tx = optax.chain(optax.sgd(0.0), mo.qk_clip(tau))
    optimizer = nnx.Optimizer(attn, tx, wrt=nnx.Param)
    sown = _train_step(attn, optimizer, x)
    (entry,) = jax.tree.leaves(sown)
    np.testing.assert_allclose(np.asarray(entry), s, rtol=8 * EPS32 * 16)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(attn, nnx.Param)))
    s_new = _logits(attn, x)
    # the clipped heads' logits on the same batch: τ, to the rounding of two float32 projections
    np.testing.assert_allclose(s_new[over], tau, rtol=16 * EPS32 * (16 + 4))
    np.testing.assert_array_equal(s_new[~over], s[~over])
    for name in ("query", "key"):
        for leaf in ("kernel", "bias"):
            a, b = after[name][leaf], before[name][leaf]
            if name == "key" and num_kv_heads != 4:
                np.testing.assert_array_equal(a, b)  # the shared key is untouched
                continue
            np.testing.assert_array_equal(a[..., ~over, :], b[..., ~over, :])
            assert not np.any(a[..., over, :] == b[..., over, :])
    for name in ("value", "out"):
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(after[name][leaf], before[name][leaf])


# ---- a hand-written block: the rule with a nonzero update, stacked layers ------------------


def _block(rng, layers, hq, hk, d=4, features=12):
    def w(cols):
        return rng.standard_normal((layers, features, cols)) * 3.0

    params = {
        "blocks": {
            "attn": {
                "wq": {"kernel": w(hq * d), "bias": rng.standard_normal((layers, hq * d))},
                "wk": w(hk * d),  # a bare parameter
                "wv": w(hk * d),
            },
            "norm": rng.standard_normal((layers, features)),
        }
    }
    x = rng.standard_normal((layers, 2, 5, features))
    return params, x


def _block_logits(p, x, hq, hk):
    a = p["blocks"]["attn"]
    q = jnp.einsum("lbti,lic->lbtc", x, a["wq"]["kernel"]) + a["wq"]["bias"][:, None, None]
    k = jnp.einsum("lbti,lic->lbtc", x, a["wk"])
    q = q.reshape(q.shape[:-1] + (hq, -1))
    k = k.reshape(k.shape[:-1] + (hk, -1))
    return jax.vmap(mo.max_attention_logits)(q, k)


@pytest.mark.parametrize("hk", [4, 2], ids=["mha", "gqa"])
def test_hand_written_block_matches_reference(rng, hk):
    hq, layers = 4, 2
    with jax.enable_x64(True):
        params, x = _block(rng, layers, hq, hk)
        params = jax.tree.map(jnp.asarray, params)
        s = np.asarray(_block_logits(params, x, hq, hk))
        tau = float(np.median(s))
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params)
        tx = optax.chain(
            optax.sgd(0.1, momentum=0.9),
            mo.qk_clip(tau, query="wq", key="wk"),
        )
        step = jax.jit(tx.update)
        state = tx.init(params)
        updates, state = step(grads, state, params, max_logits={"blocks/attn": s})
        # a second step: the rule reads the momentum's updated weights, not the gradient
        p1 = optax.apply_updates(params, updates)
        s1 = np.asarray(_block_logits(p1, x, hq, hk)) * 1.5
        updates, state = step(grads, state, p1, max_logits={"blocks": {"attn": s1}})
        sgd = optax.sgd(0.1, momentum=0.9)
        sgd_state = sgd.init(params)
        u0, sgd_state = sgd.update(grads, sgd_state, params)
        u1, _ = sgd.update(grads, sgd_state, p1)
        new = optax.apply_updates(p1, updates)
        a1, a0, u = p1["blocks"]["attn"], params["blocks"]["attn"], u1["blocks"]["attn"]
        for layer in range(layers):
            # step 0 reproduced: p1 is the reference's rescaled params from step 0
            for before, upd, logits, after in (
                (a0, u0["blocks"]["attn"], s, a1),
                (a1, u, s1, new["blocks"]["attn"]),
            ):
                wq, wk, bq, _ = np_qk_clip(
                    before["wq"]["kernel"][layer] + upd["wq"]["kernel"][layer],
                    before["wk"][layer] + upd["wk"][layer],
                    logits[layer],
                    tau,
                    bq=before["wq"]["bias"][layer] + upd["wq"]["bias"][layer],
                )
                np.testing.assert_allclose(after["wq"]["kernel"][layer], wq, rtol=1e-14)
                np.testing.assert_allclose(after["wq"]["bias"][layer], bq, rtol=1e-14)
                np.testing.assert_allclose(after["wk"][layer], wk, rtol=1e-14)
        # the heads under the threshold keep the update bitwise (not (W + u) - W)
        under = np.repeat(s1 <= tau, 4, axis=-1)
        got = updates["blocks"]["attn"]["wq"]["kernel"]
        np.testing.assert_array_equal(
            np.asarray(got).transpose(0, 2, 1)[under],
            np.asarray(u["wq"]["kernel"]).transpose(0, 2, 1)[under],
        )
        np.testing.assert_array_equal(updates["blocks"]["attn"]["wv"], u["wv"])
        np.testing.assert_array_equal(updates["blocks"]["norm"], u1["blocks"]["norm"])


def test_hand_written_gqa_heads_end_at_threshold(rng):
    hq, hk, layers = 4, 2, 2
    params, x = _block(rng, layers, hq, hk)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    x = jnp.asarray(x, jnp.float32)
    s = np.asarray(_block_logits(params, x, hq, hk), np.float64)
    tau = float(np.median(s))
    over = s > tau
    tx = optax.chain(optax.sgd(0.0), mo.qk_clip(tau, query="wq", key="wk"))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params, max_logits={"blocks/attn": s})
    new = optax.apply_updates(params, updates)
    s_new = np.asarray(_block_logits(new, x, hq, hk), np.float64)
    np.testing.assert_allclose(s_new[over], tau, rtol=16 * EPS32 * (12 + 4))
    np.testing.assert_array_equal(s_new[~over], s[~over].astype(np.float32))
    np.testing.assert_array_equal(new["blocks"]["attn"]["wk"], params["blocks"]["attn"]["wk"])
    unchanged = jax.tree.map(lambda u: bool(jnp.all(u == 0)), updates)
    assert unchanged["blocks"]["attn"]["wv"] and unchanged["blocks"]["norm"]


@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside:DeprecationWarning")
def test_popped_entries_of_a_module_called_twice_take_their_max():
    attn = _mha(4)
    x = jax.random.normal(jax.random.key(3), (2, 7, 16))
    attn(x, sow_weights=True)
    attn(2.0 * x, sow_weights=True)
    sown = nnx.pop(attn, nnx.Intermediate)
    assert len(jax.tree.leaves(sown)) == 2
    s = np.maximum(_logits(attn, x), _logits(attn, 2.0 * x))
    tau = float(np.median(s))
    params = nnx.state(attn, nnx.Param)
    tx = optax.chain(optax.sgd(0.0), mo.qk_clip(tau))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, max_logits=sown)
    nnx.update(attn, optax.apply_updates(params, updates))
    s_new = np.maximum(_logits(attn, x), _logits(attn, 2.0 * x))
    over = s > tau
    np.testing.assert_allclose(s_new[over], tau, rtol=16 * EPS32 * (16 + 4))
    np.testing.assert_array_equal(s_new[~over], s[~over])


def test_after_muon_in_a_chain():
    attn = _mha(4)
    x = jax.random.normal(jax.random.key(3), (2, 7, 16))
    _, sown = nnx.capture(attn, nnx.Intermediate)(x, sow_weights=True)
    s = _logits(attn, x)
    tau = float(np.median(s))
    params = nnx.state(attn, nnx.Param)
    dims = mo.flax_dimension_numbers(attn)
    tx = optax.chain(mo.muon(0.0, weight_dimension_numbers=dims), mo.qk_clip(tau))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params, max_logits=sown)
    nnx.update(attn, optax.apply_updates(params, updates))
    over = s > tau
    np.testing.assert_allclose(_logits(attn, x)[over], tau, rtol=16 * EPS32 * (16 + 4))


def _fuse(sep):
    """``{wq, wk, wv}`` (each a kernel and a bias) → ``{qkv}``, the columns side by side."""
    a = sep["blocks"]["attn"]
    cat = {n: jnp.concatenate([a[p][n] for p in ("wq", "wk", "wv")], -1) for n in a["wq"]}
    return {"blocks": {"attn": {"qkv": cat}}}


def test_fused_qkv_is_clipped_as_separate_projections(rng):
    """A fused ``qkv`` kernel ``(layers, in, 3·heads·head_dim)`` and its bias come out of a
    step as their three column blocks would as separate ``wq``, ``wk``, ``wv`` (checked against
    the reference above): bitwise, the value columns untouched."""
    hq, layers = 4, 2
    params, x = _block(rng, layers, hq, hq)
    a = params["blocks"]["attn"]
    s = np.asarray(_block_logits(params, x, hq, hq), np.float32)
    kv = {
        n: {"kernel": a[n], "bias": rng.standard_normal(a["wq"]["bias"].shape)}
        for n in ("wk", "wv")
    }
    sep = {"blocks": {"attn": {"wq": a["wq"], **kv}}}
    sep = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), sep)
    grads = jax.tree.map(lambda v: jnp.asarray(rng.standard_normal(v.shape), v.dtype), sep)
    tau = float(np.median(s))
    assert np.any(s > tau) and np.any(s <= tau)

    def stepped(p, g, **names):
        tx = optax.chain(optax.sgd(0.1), mo.qk_clip(tau, **names))
        u, _ = jax.jit(tx.update)(g, tx.init(p), p, max_logits={"blocks/attn": s})
        return optax.apply_updates(p, u)

    got = stepped(_fuse(sep), _fuse(grads), fused="qkv")
    want = _fuse(stepped(sep, grads, query="wq", key="wk"))
    jax.tree.map(np.testing.assert_array_equal, got, want)
    v_cols = slice(2 * a["wk"].shape[-1], None)
    np.testing.assert_array_equal(
        got["blocks"]["attn"]["qkv"]["kernel"][..., v_cols],
        (sep["blocks"]["attn"]["wv"]["kernel"] - 0.1 * grads["blocks"]["attn"]["wv"]["kernel"]),
    )
    tx = mo.qk_clip(tau, fused="qkv")
    fused = _fuse(sep)
    with pytest.raises(ValueError, match="'blocks/attn/qkv/kernel'.*15 heads"):
        tx.update(fused, tx.init(fused), fused, max_logits={"blocks/attn": np.ones((layers, 5))})
    with pytest.raises(ValueError, match="or 'qkv'"):
        tx.update(fused, tx.init(fused), fused, max_logits={"blocks/norm": s})


# ---- bad input ---------------------------------------------------------------------------


def _toy():
    params = {
        "attn": {
            "query": {"kernel": jnp.ones((4, 2, 3)), "bias": jnp.ones((2, 3))},
            "key": {"kernel": jnp.ones((4, 2, 3)), "bias": jnp.ones((2, 3))},
        },
        "mlp": {"kernel": jnp.ones((4, 4))},
    }
    return params, jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)  # 1 + 0.1 - 1 != 0.1


def test_bad_input_errors():
    params, updates = _toy()
    tx = mo.qk_clip(10.0)
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs max_logits"):
        tx.update(updates, state, params)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(updates, state, max_logits={"attn": jnp.ones(2)})
    with pytest.raises(ValueError, match="empty"):
        tx.update(updates, state, params, max_logits={})
    with pytest.raises(ValueError, match="'mlp'"):
        tx.update(updates, state, params, max_logits={"mlp": jnp.ones(2)})
    with pytest.raises(ValueError, match="'attn/query/kernel'.*3 heads"):
        tx.update(updates, state, params, max_logits={"attn": jnp.ones(3)})
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            mo.qk_clip(bad)


def test_manifold_leaf_is_an_error():
    params, updates = _toy()
    params = {"attn": {"query": {"kernel": jnp.ones((4, 6))}, "key": {"kernel": jnp.ones((4, 6))}}}
    updates = jax.tree.map(jnp.zeros_like, params)
    spec = {"attn": {"query": mo.SpectralSphere(1.0), "key": None}}
    tx = mo.qk_clip(1.0, manifold=spec)
    s = {"attn": jnp.array([5.0, 0.0])}
    with pytest.raises(ValueError, match="'attn/query/kernel'.*manifold"):
        tx.update(updates, tx.init(params), params, max_logits=s)
    ok = mo.qk_clip(1.0, manifold={"attn": None})
    ok.update(updates, ok.init(params), params, max_logits=s)


def test_non_finite_max_logit_leaves_the_update_bitwise():
    params, updates = _toy()
    tx = mo.qk_clip(10.0)
    step = jax.jit(lambda u, p, s: tx.update(u, optax.EmptyState(), p, max_logits=s)[0])
    for s in ([jnp.nan, jnp.inf], [-jnp.inf, jnp.nan], [5.0, 10.0]):
        got = step(updates, params, {"attn": jnp.array(s)})
        jax.tree.map(np.testing.assert_array_equal, got, updates)
    got = step(updates, params, {"attn": jnp.array([jnp.nan, 40.0])})
    assert np.all(np.asarray(got["attn"]["query"]["kernel"][:, 0]) == np.float32(0.1))
    np.testing.assert_allclose(
        np.asarray(params["attn"]["query"]["kernel"] + got["attn"]["query"]["kernel"])[:, 1],
        1.1 * 0.5,
        rtol=2 * EPS32,
    )


# ---- a spectral sphere on W_q, W_k bounds the logits a priori ------------------------------


def test_spectral_sphere_bounds_the_logits(rng):
    features, heads, d = 16, 4, 4
    r_q, r_k = 3.0, 5.0
    wq = mo.SpectralSphere(r_q).retract(jnp.asarray(rng.standard_normal((features, heads * d))))
    wk = mo.SpectralSphere(r_k).retract(jnp.asarray(rng.standard_normal((features, heads * d))))
    np.testing.assert_allclose(mo.spectral_norm(wq), r_q, rtol=1e-4)
    x = jnp.asarray(rng.standard_normal((3, 9, features)) * rng.uniform(0.5, 4.0, (3, 9, 1)))
    bound = r_q * r_k * float(jnp.max(jnp.sum(x * x, -1))) / np.sqrt(d)
    s = np.asarray(
        mo.max_attention_logits((x @ wq).reshape(3, 9, heads, d), (x @ wk).reshape(3, 9, heads, d))
    )
    assert np.all(np.abs(s) <= bound * (1 + 1e-5))
    # attained: W = r·I and a token inside one head's block
    eye = jnp.eye(features)
    v = jnp.zeros(features).at[d : 2 * d].set(jnp.asarray(rng.standard_normal(d)))
    xs = jnp.stack([v, 0.5 * v])[None]
    s = np.asarray(
        mo.max_attention_logits(
            (xs @ (r_q * eye)).reshape(1, 2, heads, d), (xs @ (r_k * eye)).reshape(1, 2, heads, d)
        )
    )
    np.testing.assert_allclose(s[1], r_q * r_k * float(v @ v) / np.sqrt(d), rtol=1e-5)


# ---- the global max under a sharded batch (8 simulated devices) ----------------------------

_SHARDED = textwrap.dedent(
    """
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from flax import nnx
    import manifold_optax as mo
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    q = rng.standard_normal((8, 5, 4, 8)).astype(np.float32)
    k = rng.standard_normal((8, 5, 2, 8)).astype(np.float32)
    q[5] *= 10.0  # the largest logits live on one device's shard
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
    got = jax.jit(mo.max_attention_logits)(put(q), put(k))
    ref = mo.max_attention_logits(q, k)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    local = mo.max_attention_logits(q[:1], k[:1])
    assert np.all(np.asarray(got) > np.asarray(local))
    attn = nnx.MultiHeadAttention(num_heads=4, in_features=8, decode=False,
                                  attention_fn=mo.attention_with_max_logits, rngs=nnx.Rngs(0))
    x = rng.standard_normal((8, 5, 8)).astype(np.float32)
    x[3] *= 10.0
    @nnx.jit
    def fwd(m, x):
        m(x, sow_weights=True)
        return nnx.pop(m, nnx.Intermediate)
    sown = jax.tree.leaves(fwd(attn, put(x)))[0]
    ref = mo.max_attention_logits(attn.query(x), attn.key(x))
    np.testing.assert_allclose(np.asarray(sown), np.asarray(ref), rtol=1e-5)
    print("OK")
    """
)


def test_sharded_batch_gives_the_global_max():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", _SHARDED],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
