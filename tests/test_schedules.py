"""Newton–Schulz schedules: generation reproduces the published Polar Express rows, and each
schedule's composed scalar map has the accuracy MATH.md §2 tabulates."""

import numpy as np
import pytest

from manifold_optax import schedules as S


def test_generated_polar_express_matches_published_rows():
    # MATH.md §2: the greedy construction reproduces the published rows to ~1e-9.
    raw = S.polar_express_coefficients(8, 1e-3, safety=0.0)
    np.testing.assert_allclose(raw, S.POLAR_EXPRESS_PUBLISHED, rtol=0, atol=1e-8)


def test_cushion_matters_for_the_first_row():
    # Without the cushion the first row comes out as (8.470, −25.108, 18.629) (MATH.md §2).
    raw = S.polar_express_coefficients(1, 1e-3, safety=0.0, cushion=0.0)
    np.testing.assert_allclose(raw[0], [8.470, -25.108, 18.629], atol=2e-3)


def test_safety_factor_scales_all_rows_but_the_last():
    raw = S.polar_express_coefficients(8, safety=0.0)
    safe = S.polar_express_coefficients(8)
    s = 1.01
    np.testing.assert_allclose(safe[:-1], raw[:-1] / np.array([s, s**3, s**5]), rtol=1e-14)
    np.testing.assert_array_equal(safe[-1], raw[-1])


def _max_err(table, lo, norm=1.0):
    sigma = np.logspace(np.log10(lo), 0, 20001) / norm
    return np.abs(S.composed_map(table, sigma) - 1).max()


@pytest.mark.parametrize(
    "steps, lo, bound",
    # MATH.md §2 table ("PE raw"), plus the float64 floor at 8 steps.
    [(5, 1e-2, 0.125), (5, 1e-3, 0.125), (6, 1e-3, 1.3e-3), (7, 1e-3, 1.1e-9), (8, 1e-3, 1e-14)],
)
def test_polar_express_raw_accuracy(steps, lo, bound):
    assert _max_err(S.polar_express_coefficients(steps, safety=0.0), lo) <= bound


def test_jordan_and_you_accuracy():
    jordan5 = S.get_schedule("jordan", 5)[0]
    assert 0.30 < _max_err(jordan5, 1e-2) < 0.32  # never converges to 1, by design
    assert _max_err(S.YOU, 1e-2) < 0.033
    assert _max_err(S.YOU, 1e-3) > 0.5  # You's set is tuned for [1e-2, 1]


def test_generation_for_other_lower_bounds_converges():
    # A schedule designed for a smaller lower bound still reaches float64 accuracy.
    table = S.polar_express_coefficients(11, 1e-5, safety=0.0)
    assert _max_err(table, 1e-5) < 1e-12


def test_get_schedule_resolution_and_errors():
    table, steps = S.get_schedule("polar_express", None)
    assert steps == 5 and table.shape == (5, 3)
    assert S.get_schedule("jordan", 3)[0].shape == (3, 3)
    with pytest.raises(ValueError, match="exactly 5 steps"):
        S.get_schedule("you", 6)
    with pytest.raises(ValueError, match="accepted names"):
        S.get_schedule("newton", 5)
    with pytest.raises(ValueError, match=r"\(k, 3\)"):
        S.get_schedule(np.ones((2, 4)), None)
    explicit = np.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(S.get_schedule(explicit, 2)[0], explicit[2:])
    assert S.get_schedule(explicit, 6)[0].shape == (6, 3)
    assert S.get_schedule((1.0, 2.0, 3.0), 4)[0].shape == (4, 3)
