"""The demo (the README's main job) runs, reports every requested optimizer, and keeps the
manifold rows on their manifolds."""

from manifold_optax import demo


def test_demo_runs_and_reports(tmp_path, capsys):
    rows = demo.main(
        ["--optimizers", "adamw,muon,stiefel,sphere", "--steps", "40", "--out", str(tmp_path)]
    )
    assert [r["optimizer"] for r in rows] == ["adamw", "muon", "stiefel", "sphere"]
    out = capsys.readouterr().out
    assert "| stiefel |" in out and "| adamw |" in out
    assert (tmp_path / "loss_and_spectra.png").stat().st_size > 10_000
    for r in rows:
        assert r["test_accuracy"] > 0.5  # 10 classes; even 40 steps learn a lot
        if r["optimizer"] == "stiefel":
            assert r["max_constraint_violation"] <= 1e-5
            assert abs(r["sigma_min"] - 1) <= 1e-5 and abs(r["sigma_max"] - 1) <= 1e-5
        if r["optimizer"] == "sphere":
            assert r["max_constraint_violation"] <= 1e-6


def test_train_hands_every_updated_model_to_on_step():
    # demo.train is the loop the demo and benchmarks/spectral_accuracy.py share; the latter
    # checks the constraint in on_step, so on_step must see each step's new parameters.
    import numpy as np
    import optax
    from flax import nnx

    (xtr, ytr), _ = demo.load_digits(0)
    model = demo.MLP(rngs=nnx.Rngs(0))
    seen = []
    losses, seconds = demo.train(
        model,
        optax.sgd(0.1),
        xtr,
        ytr,
        steps=3,
        batch=32,
        seed=0,
        on_step=lambda m: seen.append(np.array(m.layers[0].kernel[...])),
    )
    assert len(losses) == len(seen) == 3 and len(seconds) == 2  # the first step compiles
    assert not np.array_equal(seen[0], seen[1]) and not np.array_equal(seen[1], seen[2])
    np.testing.assert_array_equal(seen[-1], np.asarray(model.layers[0].kernel[...]))
