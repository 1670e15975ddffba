"""Reading training curves, shared by the language-model benchmarks (``train_lm.py``,
``gpt.py``): a curve is a list of ``(step, train loss, val loss, ...)`` evaluations."""

from __future__ import annotations


def best_runs(runs):
    """Each optimizer's run with the lowest final validation loss, in the order of first
    appearance (a diverged run's NaN loses to any finite loss)."""
    best = {}
    for r in runs:
        n = r["optimizer"]
        if n not in best or not (r["final_val"] >= best[n]["final_val"]):
            best[n] = r
    return best


def steps_to(curve, target):
    """The first evaluated step whose validation loss is at most ``target``; None if none is."""
    return next((c[0] for c in curve if c[2] <= target), None)


def loss_at(curve, seconds):
    """The validation loss of the last evaluation at or before ``seconds`` of training (the
    curve's fourth field); None before the first."""
    seen = [c[2] for c in curve if c[3] <= seconds * (1 + 1e-9)]
    return seen[-1] if seen else None
