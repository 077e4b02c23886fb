"""Power of the paired Exact ER comparison: what a test split can detect (issue 23 item 6).

The masks tables compare an edit's Exact ER with Origin's on the same examples by the exact McNemar
test (:func:`memctl.stats.mcnemar`: the two-sided exact binomial test of the discordant pairs at 1/2).
Before reading a "no evidence of a difference" as "no effect", the report states how large an effect
the split could have shown. This module computes that, exactly, for one edit against Origin:

- Each of the ``n`` examples falls in one of four cells; ``p_row`` is the probability that the edit
  extracts it and Origin does not, ``p_ref`` the reverse (the discordant cells). The Exact ER
  difference (edit minus Origin) is ``delta = p_row - p_ref``.
- :func:`mcnemar_power` is the test's power: the number of discordant pairs ``d`` is
  Binomial(n, p_row + p_ref); given ``d``, the edit-only count is Binomial(d, p_row / (p_row + p_ref));
  the test rejects where the two-sided exact binomial p-value of that count at 1/2 is ``<= alpha``.
  Summed exactly over ``d`` (no normal approximation).
- :func:`minimum_detectable_difference` is the smallest ``delta`` (on a grid of ``step``) whose
  power reaches ``power`` when the reverse flips occur at a fixed rate ``background`` (``p_ref =
  background``, ``p_row = background + delta``). ``background = 0`` (the edit flips examples in one
  direction only) gives the floor: no split detects less. A positive ``background`` (e.g. the churn
  that pruning alone causes, measured as the ``none`` mask's flips against Origin) raises it.
- :func:`near_threshold` counts the examples an edit could plausibly tip: fractional ER between
  ``lo`` and ``hi`` without exact extraction (the issue's documented criterion, 0.2-0.9).

Pure functions of numbers (numpy, scipy); no model, no tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

#: Significance level and power the report states the detectable difference at.
ALPHA = 0.05
POWER = 0.8
#: The near-threshold criterion: fractional ER in [NEAR_LO, NEAR_HI] and not extracted exactly.
NEAR_LO, NEAR_HI = 0.2, 0.9


def critical_counts(d_max: int, alpha: float = ALPHA) -> np.ndarray:
    """Per number of discordant pairs ``d = 0 .. d_max``: the largest ``c`` such that the exact
    two-sided McNemar test rejects when the smaller discordant count is ``<= c`` (``p = min(1,
    2 P(Bin(d, 1/2) <= c)) <= alpha``); -1 where no split of ``d`` pairs rejects."""
    if d_max < 0:
        raise ValueError(f"d_max: {d_max} is negative")
    out = np.full(d_max + 1, -1, dtype=np.int64)
    for d in range(1, d_max + 1):
        cdf = sps.binom.cdf(np.arange(d // 2 + 1), d, 0.5)
        ok = np.nonzero(np.minimum(1.0, 2.0 * cdf) <= alpha)[0]
        out[d] = int(ok[-1]) if len(ok) else -1
    return out


def mcnemar_power(n: int, p_row: float, p_ref: float, alpha: float = ALPHA,
                  critical: np.ndarray | None = None) -> float:
    """Exact power of the two-sided exact McNemar test on ``n`` paired examples whose discordant
    cells have probabilities ``p_row`` (edit only) and ``p_ref`` (reference only); see the module
    docstring. ``critical`` (from :func:`critical_counts` with ``d_max >= n``) saves recomputing it."""
    if n < 0:
        raise ValueError(f"n: {n} is negative")
    if not (0.0 <= p_row <= 1.0 and 0.0 <= p_ref <= 1.0 and p_row + p_ref <= 1.0 + 1e-12):
        raise ValueError(f"discordant probabilities p_row {p_row}, p_ref {p_ref}: each in [0, 1], summing to <= 1")
    if n == 0:
        return 0.0
    crit = critical_counts(n, alpha) if critical is None else critical
    if len(crit) < n + 1:
        raise ValueError(f"critical: {len(crit)} entries, {n + 1} needed")
    disc = min(p_row + p_ref, 1.0)
    if disc == 0.0:
        return 0.0
    q = p_row / disc
    d = np.arange(n + 1)
    weight = sps.binom.pmf(d, n, disc)
    c = crit[: n + 1]
    reject = np.where(c >= 0, sps.binom.cdf(c, d, q) + sps.binom.sf(d - c - 1, d, q), 0.0)
    return float(np.clip((weight * reject).sum(), 0.0, 1.0))


@dataclass(frozen=True)
class Detectable:
    """The smallest detectable Exact ER difference of a split (:func:`minimum_detectable_difference`)."""

    n: int
    delta: float  #: NaN where no difference up to the largest possible one reaches the power
    background: float
    alpha: float
    power: float
    achieved: float  #: the power at ``delta`` (NaN where none)


def minimum_detectable_difference(n: int, background: float = 0.0, alpha: float = ALPHA, power: float = POWER,
                                  step: float = 0.001) -> Detectable:
    """The smallest ``delta`` on the grid ``step, 2 step, ...`` (up to ``1 - 2 background``, the
    largest difference with ``p_ref = background``) at which :func:`mcnemar_power` with ``p_row =
    background + delta``, ``p_ref = background`` reaches ``power``. Scans the grid (the exact test's
    power is not smooth in ``n`` and need not be monotone in ``delta``, so no bisection)."""
    if n < 1:
        raise ValueError(f"n: {n} examples; the split needs at least one")
    if not 0.0 <= background < 0.5:
        raise ValueError(f"background: {background} must be in [0, 0.5)")
    if not 0.0 < power < 1.0 or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha {alpha} and power {power} must be in (0, 1)")
    if not 0.0 < step <= 0.1:
        raise ValueError(f"step: {step} must be in (0, 0.1]")
    crit = critical_counts(n, alpha)
    top = 1.0 - 2.0 * background
    for i in range(1, int(math.floor(top / step + 1e-9)) + 1):
        delta = round(i * step, 10)
        achieved = mcnemar_power(n, background + delta, background, alpha, crit)
        if achieved >= power:
            return Detectable(n, delta, background, alpha, power, achieved)
    return Detectable(n, math.nan, background, alpha, power, math.nan)


def near_threshold(fractional, exact, lo: float = NEAR_LO, hi: float = NEAR_HI) -> int:
    """Examples with fractional ER in ``[lo, hi]`` that are not extracted exactly."""
    f = np.asarray(fractional, dtype=np.float64)
    e = np.asarray(exact, dtype=bool)
    if f.shape != e.shape:
        raise ValueError(f"fractional {f.shape} and exact {e.shape} differ in shape")
    return int(((f >= lo) & (f <= hi) & ~e).sum())
