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
