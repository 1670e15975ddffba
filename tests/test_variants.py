"""NorMuon and AdaMuon against float64 references of their authors' rules, written here with
the exact polar factor, over several steps on plain, stacked and conv leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import manifold_optax as mo

BETA = 0.9


def _polar(a):
    u, _, vt = np.linalg.svd(a, full_matrices=False)
    return u @ vt


def _views(x, kind):
    """The leaf as [b, fan_in, fan_out] matrices, and back."""
    if kind == "plain":
        return x[None], lambda v: v[0]
    if kind == "stacked":  # (layers, in, out)
        return x, lambda v: v
    k = x.reshape(-1, x.shape[-1])  # conv (h, w, in, out): (h·w·in) × out
    return k[None], lambda v: v[0].reshape(x.shape)


# Wide matrices: a tall polar factor has unit columns, on which the neuron-wise moment is flat.
SHAPES = {"plain": (8, 12), "stacked": (3, 8, 12), "conv": (2, 2, 2, 12)}
SPECS = {
    "plain": None,
    "stacked": mo.MatrixSpec(1, 2),
    "conv": mo.MatrixSpec((0, 1, 2), (3,)),
}


def _reference(rule, kind, grads, lr, beta2, eps, sign_momentum=False):
    mu = np.zeros_like(grads[0])
    nu = None
    out = []
    for t, g in enumerate(grads, start=1):
        mu = BETA * mu + (1 - BETA) * g
        m_hat = BETA * mu / (1 - BETA ** (t + 1)) + (1 - BETA) * g / (1 - BETA**t)
        views, back = _views(m_hat, kind)
        if sign_momentum:
            views = np.sign(views)
        O = np.stack([_polar(v) for v in views])
        if rule == "normuon":
            mean = np.mean(O * O, axis=1, keepdims=True)
            nu = (1 - beta2) * mean if nu is None else beta2 * nu + (1 - beta2) * mean
            S = O / (np.sqrt(nu) + eps)
            S *= np.linalg.norm(O, axis=(1, 2), keepdims=True) / np.linalg.norm(
                S, axis=(1, 2), keepdims=True
            )
            fan_in, fan_out = O.shape[1:]
            S *= np.sqrt(max(1.0, fan_out / fan_in))
        else:
            nu = (1 - beta2) * O * O if nu is None else beta2 * nu + (1 - beta2) * O * O
            S = O / (np.sqrt(nu / (1 - beta2**t)) + eps)
            m, n = O.shape[1:]
            S *= 0.2 * np.sqrt(m * n) / np.linalg.norm(S, axis=(1, 2), keepdims=True)
        out.append(-lr * back(S))
    return out


@pytest.mark.parametrize("kind", sorted(SHAPES))
@pytest.mark.parametrize(
    "rule, options",
    [("normuon", {}), ("adamuon", {}), ("adamuon", {"sign_momentum": True})],
    ids=["normuon", "adamuon", "adamuon_sign"],
)
def test_each_rule_matches_its_float64_reference(rule, options, kind):
    rng = np.random.default_rng(0)
    lr, beta2, eps = 0.05, 0.9, 1e-8
    with jax.enable_x64():
        params = {"w": jnp.asarray(rng.standard_normal(SHAPES[kind]))}
        grads = [rng.standard_normal(SHAPES[kind]) for _ in range(4)]
        make = mo.normuon if rule == "normuon" else mo.adamuon
        tx = make(
            lr,
            beta=BETA,
            beta2=beta2,
            eps=eps,
            ns_steps=14,
            precision=jax.lax.Precision.HIGHEST,
            weight_dimension_numbers=None if SPECS[kind] is None else {"w": SPECS[kind]},
            **options,
        )
        state = tx.init(params)
        ref = _reference(rule, kind, grads, lr, beta2, eps, **options)
        for g, r in zip(grads, ref, strict=True):
            u, state = tx.update({"w": jnp.asarray(g)}, state, params)
            # Newton–Schulz to float64 accuracy on these spectra; the rules are smooth in O.
            np.testing.assert_allclose(np.asarray(u["w"]), r, rtol=1e-6, atol=1e-9)


def test_variants_take_muons_keywords_and_send_vectors_to_adamw():
    params = {"w": jnp.eye(4), "b": jnp.zeros(4), "embed": jnp.ones((5, 4))}
    g = {"w": jnp.eye(4), "b": jnp.ones(4), "embed": jnp.ones((5, 4))}
    for make in (mo.normuon, mo.adamuon):
        tx = make(0.01, adam_learning_rate=0.1, weight_decay=0.1, nesterov=False)
        u, _ = tx.update(g, tx.init(params), params)
        # AdamW's first step on the fallback leaves: −lr·sign(g) (no Nesterov).
        np.testing.assert_allclose(u["b"], -0.1 * np.ones(4), rtol=1e-4)
        np.testing.assert_allclose(u["embed"], -0.1 * np.ones((5, 4)), rtol=1e-4)
        with pytest.raises(TypeError):
            make(0.01, not_a_keyword=1)
