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
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert (tmp_path / "table.md").read_text().count("\n- ") == len(demo.COLUMNS)
    for r in rows:
        assert r["test_accuracy"] > 0.5  # 10 classes; even 40 steps learn a lot
        cv = r["curve"]
        assert cv["step"][-1] == 40 and len(cv["accuracy"]) == len(cv["step"]) >= 10
        assert [len(s) for s in r["spectra"]] == [64, 256]
        if r["optimizer"] == "stiefel":
            assert r["max_constraint_violation"] <= 1e-5
            assert abs(r["sigma_min"] - 1) <= 1e-5 and abs(r["sigma_max"] - 1) <= 1e-5
        if r["optimizer"] == "sphere":
            assert r["max_constraint_violation"] <= 1e-6


def test_cli_help_and_errors(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--optimizers", "--steps", "--batch", "--seed", "--out", "--sweep"):
        assert flag in text
    assert "default: 500" in text and "``" not in text
    for argv, message in (
        (["--steps", "0"], "--steps must be at least 1"),
        (["--batch", "-3"], "--batch must be at least 1"),
        (["--optimizers", "adam"], "unknown optimizers ['adam']"),
        (["--optimizers", ","], "--optimizers is empty"),
        (["--seed", "x"], "seed must be an integer"),
    ):
        with pytest.raises(SystemExit) as e:
            demo.main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err, argv


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
