"""memctl.power: the exact McNemar power and the smallest detectable Exact ER difference, against
cases computed by hand."""

import math

import numpy as np
import pytest

from memctl import power, stats


def test_critical_counts_by_hand():
    # two-sided exact p of the smaller count c among d pairs: 2 * P(Bin(d, 1/2) <= c)
    # d = 5: c = 0 gives 2/32 = 0.0625 > 0.05 (never rejects); d = 6: 2/64 = 0.031 (c = 0), c = 1: 14/64 = 0.22
    # d = 8: c = 0: 2/256, c = 1: 18/256 = 0.070 -> 0; d = 9: c = 1: 20/512 = 0.039 -> 1
    crit = power.critical_counts(9)
    assert list(crit) == [-1, -1, -1, -1, -1, -1, 0, 0, 0, 1]


def test_critical_counts_agree_with_the_tables_test():
    """The rejection region is the one memctl.stats.mcnemar's p-value gives."""
    crit = power.critical_counts(30)
    for d in range(1, 31):
        for c in range(d + 1):
            row = np.array([True] * c + [False] * (d - c))
            p = stats.mcnemar(row, ~row).pvalue
            assert (p <= 0.05) == (min(c, d - c) <= crit[d]), (d, c)


def test_power_one_direction_by_hand():
    # p_ref = 0: every discordant pair is the edit's, so the test rejects iff d >= 6;
    # n = 10, p_row = 0.5: P(Bin(10, 1/2) >= 6) = (210 + 120 + 45 + 10 + 1) / 1024
    assert power.mcnemar_power(10, 0.5, 0.0) == pytest.approx(386 / 1024, abs=1e-12)
    # n = 6, every pair discordant, half each way: d = 6 always, rejects at 0/6 and 6/6: 2 / 64 (the size)
    assert power.mcnemar_power(6, 0.5, 0.5) == pytest.approx(2 / 64, abs=1e-12)
    # no discordance, or too few examples to ever reject
    assert power.mcnemar_power(10, 0.0, 0.0) == 0.0
    assert power.mcnemar_power(5, 1.0, 0.0) == 0.0
    assert power.mcnemar_power(6, 1.0, 0.0) == pytest.approx(1.0)


def test_power_two_directions_by_hand():
    # n = 7, p_row = 0.6, p_ref = 0.2 (discordant 0.8, q = 3/4). Rejecting splits: d = 6 at 0 or 6,
    # d = 7 at 0 or 7 (d = 7: c = 0 gives 2/128; c = 1 gives 16/128 > 0.05).
    pd6 = 7 * 0.8 ** 6 * 0.2
    pd7 = 0.8 ** 7
    expected = pd6 * (0.75 ** 6 + 0.25 ** 6) + pd7 * (0.75 ** 7 + 0.25 ** 7)
    assert power.mcnemar_power(7, 0.6, 0.2) == pytest.approx(expected, abs=1e-12)


def test_minimum_detectable_difference_by_hand():
    # n = 10, no reverse flips: power(delta) = P(Bin(10, delta) >= 6);
    # at 0.65: 0.7515 (< 0.8), at 0.70: 0.8497 (>= 0.8) -> the answer lies in (0.65, 0.70]
    def by_hand(p):
        return sum(math.comb(10, k) * p ** k * (1 - p) ** (10 - k) for k in range(6, 11))

    assert by_hand(0.65) == pytest.approx(0.7515, abs=1e-4) and by_hand(0.70) == pytest.approx(0.8497, abs=1e-4)
    mdd = power.minimum_detectable_difference(10)
    assert 0.65 < mdd.delta <= 0.70
    assert mdd.achieved == pytest.approx(by_hand(mdd.delta), abs=1e-12) and mdd.achieved >= 0.8
    assert by_hand(mdd.delta - 0.001) < 0.8  # the smallest on the grid
    # reverse flips make it larger; a split too small for any difference says so (NaN)
    assert power.minimum_detectable_difference(10, background=0.05).delta > mdd.delta
    assert math.isnan(power.minimum_detectable_difference(10, background=0.1).delta)  # 0.8 of room: not enough
    assert math.isnan(power.minimum_detectable_difference(5).delta)


def test_minimum_detectable_difference_shrinks_with_n():
    small, large = power.minimum_detectable_difference(81), power.minimum_detectable_difference(324)
    assert large.delta < small.delta
    # the floor: 80% chance of >= 6 one-way flips among 81 examples needs delta ~ 0.10
    assert 0.08 < small.delta < 0.13


def test_near_threshold_by_hand():
    frac = [0.0, 0.2, 0.5, 0.9, 0.95, 1.0, 0.5]
    exact = [False, False, False, False, False, True, True]
    assert power.near_threshold(frac, exact) == 3  # 0.2, 0.5, 0.9 (the last 0.5 is extracted: excluded)


def test_errors_name_the_value():
    with pytest.raises(ValueError, match="background"):
        power.minimum_detectable_difference(10, background=0.6)
    with pytest.raises(ValueError, match="n: 0"):
        power.minimum_detectable_difference(0)
    with pytest.raises(ValueError, match="p_row"):
        power.mcnemar_power(10, 0.8, 0.4)
