"""Newton–Schulz coefficient schedules for the matrix sign (polar factor).

Every schedule is a ``(k, 3)`` table of odd-quintic coefficients ``(a, b, c)``; step ``i``
maps each singular value ``σ ↦ aσ + bσ³ + cσ⁵``. Three families (``docs/math.md``, Newton–Schulz):

* **Jordan** (the Muon default, optax's ``"standard"``): ``(3.4445, −4.7750, 2.0315)`` at every
  step. Never converges to 1 — singular values end in ≈ [0.68, 1.13] — by design.
* **You / Dion** five-step set (optax's ``"dion"``), tuned for exactly five steps.
* **Polar Express** (Amsel, Persson, Musco & Gower, 2025, arXiv:2505.16932): the greedy
  composition of minimax-optimal odd quintics, generated here for any step count and lower
  bound by :func:`polar_express_coefficients`, with the cushion and the safety factor.

All tables are float64 NumPy arrays; :func:`manifold_optax.msign` keeps them in float32 even
when the matrix is bfloat16.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = [
    "JORDAN",
    "YOU",
    "POLAR_EXPRESS_PUBLISHED",
    "SCHEDULE_NAMES",
    "optimal_odd_quintic",
    "polar_express_coefficients",
    "get_schedule",
    "composed_map",
    "overshoot",
]

#: Keller Jordan's quintic (modded-nanogpt, optax ``"standard"``).
JORDAN = np.array([(3.4445, -4.7750, 2.0315)], dtype=np.float64)

#: Jiacheng You's five-step set (used by Dion; optax ``"dion"``). Only valid at five steps.
YOU = np.array(
    [
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ],
    dtype=np.float64,
)

#: The eight published Polar Express rows (before the safety factor), designed for σ ∈ [1e-3, 1].
POLAR_EXPRESS_PUBLISHED = np.array(
    [
        (8.28721201814563, -23.595886519098837, 17.300387312530933),
        (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
        (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
        (3.3184196573706015, -2.488488024314874, 0.51004894012372),
        (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
        (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
        (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
        (1.875, -1.25, 0.375),
    ],
    dtype=np.float64,
)

SCHEDULE_NAMES = ("jordan", "you", "polar_express", "standard", "dion")

#: optax.contrib.muon's preset names for the same coefficient sets.
SCHEDULE_ALIASES = {"standard": "jordan", "dion": "you"}

#: The cushion of Amsel et al.: never fit on an interval with l/u below this ratio.
PE_CUSHION = 0.02407327424182761
#: Default safety factor: rows are divided as (a/s, b/s³, c/s⁵) with s = 1 + PE_SAFETY.
PE_SAFETY = 0.01


def _quintic(coeffs, x):
    a, b, c = coeffs
    return a * x + b * x**3 + c * x**5


def optimal_odd_quintic(lo: float, hi: float) -> tuple[float, float, float]:
    """Minimax-optimal odd quintic ``p`` approximating 1 on ``[lo, hi]`` (Remez exchange).

    The optimum equioscillates at four points ``lo < q < r < hi`` with errors
    ``−E, +E, −E, +E``; ``q, r`` are the interior critical points of ``p``, the roots of
    ``a + 3bx² + 5cx⁴ = 0``. Each Remez iteration solves the 4×4 linear system for
    ``(a, b, c, E)`` and moves ``q, r`` to the new critical points.
    """
    if not 0 < lo <= hi:
        raise ValueError(f"need 0 < lo <= hi, got lo={lo}, hi={hi}")
    if lo / hi >= 1 - 5e-6:
        # The equioscillating quintic degenerates to the Newton–Schulz quintic, scaled to hi.
        return 15 / 8 / hi, -10 / 8 / hi**3, 3 / 8 / hi**5
    q, r = (3 * lo + hi) / 4, (lo + 3 * hi) / 4
    err_prev = np.inf
    a = b = c = 0.0
    for _ in range(100):
        pts = np.array([lo, q, r, hi])
        lhs = np.stack([pts, pts**3, pts**5, np.array([1.0, -1.0, 1.0, -1.0])], axis=1)
        a, b, c, err = np.linalg.solve(lhs, np.ones(4))
        disc = np.sqrt(max(9 * b * b - 20 * a * c, 0.0))
        q, r = np.sqrt((-3 * b + np.array([-1.0, 1.0]) * disc) / (10 * c))
        if abs(err - err_prev) <= 1e-15:
            break
        err_prev = err
    return float(a), float(b), float(c)


@functools.lru_cache(maxsize=64)
def _polar_express_raw(steps: int, lower: float, cushion: float) -> tuple:
    lo, hi = lower, 1.0
    rows = []
    for _ in range(steps):
        fit_lo = max(lo, cushion * hi)
        a, b, c = optimal_odd_quintic(fit_lo, hi)
        # Re-centre around 1 on the true interval: p(lo) + p(hi) = 2.
        scale = 2.0 / (_quintic((a, b, c), lo) + _quintic((a, b, c), hi))
        a, b, c = a * scale, b * scale, c * scale
        rows.append((a, b, c))
        lo = _quintic((a, b, c), lo)
        hi = 2.0 - lo
    return tuple(rows)


def polar_express_coefficients(
    steps: int = 8,
    lower: float = 1e-3,
    *,
    safety: float = PE_SAFETY,
    cushion: float = PE_CUSHION,
) -> np.ndarray:
    """Generate a Polar Express schedule (Amsel et al. 2025, Algorithm 1 with the cushion).

    Greedy construction (``docs/math.md``, Newton–Schulz): start with ``l = lower, u = 1``; each step fits the
    minimax-optimal odd quintic on ``[max(l, cushion·u), u]``, rescales it so that
    ``p(l) + p(u) = 2``, then sets ``l ← p(l)``, ``u ← 2 − l``. With ``safety > 0`` every row
    but the last is divided as ``(a/s, b/s³, c/s⁵)``, ``s = 1 + safety``, which keeps round-off
    from pushing a singular value out of the polynomial's stable range; :func:`msign` pairs
    it with normalizing by ``s`` times the norm estimate.

    Args:
      steps: number of rows (≥ 1).
      lower: smallest normalized singular value the schedule is designed for.
      safety: the safety factor's excess ``s − 1`` (0 disables it).
      cushion: the smallest ratio ``l/u`` ever fitted.

    Returns:
      A float64 array of shape ``(steps, 3)``.
    """
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < lower < 1:
        raise ValueError(f"lower must be in (0, 1), got {lower}")
    rows = np.array(_polar_express_raw(int(steps), float(lower), float(cushion)))
    if safety > 0:
        s = 1.0 + safety
        rows[:-1] = rows[:-1] / np.array([s, s**3, s**5])
    return rows


def get_schedule(coeffs, steps: int | None) -> tuple[np.ndarray, int]:
    """Resolve ``coeffs`` (a name or an explicit ``(k, 3)`` / ``(3,)`` table) and ``steps``.

    Returns ``(table, steps)`` where ``table`` has exactly ``steps`` rows. Defaults: five steps
    for every named schedule and for a single ``(3,)`` row; an explicit table runs its own
    number of rows unless ``steps`` says otherwise (a single ``(3,)`` row is repeated; a longer table keeps its last rows, as
    optax does; a shorter table repeats its last row).
    """
    if isinstance(coeffs, str):
        name = coeffs.lower().replace("-", "_")
        name = SCHEDULE_ALIASES.get(name, name)
        if name not in SCHEDULE_NAMES:
            raise ValueError(
                f"unknown Newton–Schulz schedule {coeffs!r}; accepted names: {SCHEDULE_NAMES} "
                "or an explicit (k, 3) array"
            )
        steps = 5 if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if name == "jordan":
            return np.repeat(JORDAN, steps, axis=0), steps
        if name == "you":
            if steps != 5:
                raise ValueError(f"the 'you' schedule is defined for exactly 5 steps, got {steps}")
            return YOU.copy(), 5
        return polar_express_coefficients(steps), steps
    table = np.asarray(coeffs, dtype=np.float64)
    if table.ndim == 1:
        table = table[None, :]
    if table.ndim != 2 or table.shape[-1] != 3:
        raise ValueError(
            f"Newton–Schulz coefficients must have shape (3,) or (k, 3), got {table.shape}"
        )
    k = table.shape[0]
    if steps is None:
        # A single row is a repeated quintic (optax's convention): five steps by default.
        steps = 5 if k == 1 else k
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps <= k:
        return table[k - steps :], steps
    return np.concatenate([table, np.repeat(table[-1:], steps - k, axis=0)]), steps


def composed_map(table: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """The scalar map a schedule applies to normalized singular values (float64)."""
    x = np.asarray(sigma, dtype=np.float64)
    for row in np.asarray(table, dtype=np.float64):
        x = _quintic(row, x)
    return x


def overshoot(coeffs="polar_express", steps: int | None = None) -> float:
    """``e_s = max_{0 ≤ σ ≤ 1} |p(σ)| − 1``: how far a schedule's scalar map ``p``
    (:func:`composed_map`) lifts a singular value above 1, so that
    ``‖msign(X)‖₂ ≤ 1 + e_s`` for every ``X`` (the msign normalizes ``σ_max ≤ 1`` first);
    0 when it never does. Evaluated in float64 on a grid of ``2·10⁵`` points, linear and
    logarithmic, which resolves the maximum of these polynomials (their slopes are bounded)
    to well below float32's precision.

    Example:
      >>> from manifold_optax.schedules import overshoot
      >>> 0.0 < overshoot("jordan") < 0.25
      True
    """
    table, _ = get_schedule(coeffs, steps)
    sigma = np.concatenate([np.linspace(0.0, 1.0, 100_001), np.logspace(-9, 0, 100_001)])
    return max(0.0, float(np.max(np.abs(composed_map(table, sigma)))) - 1.0)
