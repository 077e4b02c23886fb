"""memctl.stats against cases worked by hand: a McNemar table, Clopper-Pearson at 0/81 and 81/81,
a paired bootstrap that sees what overlapping intervals miss, seeds pooled per example."""

import math

import numpy as np
import pytest

from memctl import stats


def _table(both: int, row_only: int, ref_only: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    row = np.array([1] * both + [1] * row_only + [0] * ref_only + [0] * neither, dtype=bool)
    ref = np.array([1] * both + [0] * row_only + [1] * ref_only + [0] * neither, dtype=bool)
    return row, ref


def test_mcnemar_worked_by_hand():
    """Discordant 9 (row only) vs 1 (reference only): two-sided exact p = 2 * sum_{k<=1} C(10, k) / 2^10
    = 2 * 11 / 1024 = 0.021484375; the concordant examples do not enter."""
    row, ref = _table(both=30, row_only=9, ref_only=1, neither=41)
    c = stats.mcnemar(row, ref)
    by_hand = 2 * (math.comb(10, 0) + math.comb(10, 1)) / 2**10
    assert c.pvalue == pytest.approx(by_hand, rel=1e-12) and by_hand == pytest.approx(0.021484375)
    assert (c.row_only, c.ref_only, c.n) == (9, 1, 81)
    assert c.estimate == pytest.approx(8 / 81)
    assert stats.verdict(c) == "higher (p=0.021)"
    assert stats.verdict(stats.mcnemar(ref, row)) == "lower (p=0.021)"
    # 5 vs 3: p = 2 * sum_{k<=3} C(8, k) / 2^8 = 2 * 93 / 256 = 0.7265625
    row, ref = _table(both=10, row_only=5, ref_only=3, neither=10)
    assert stats.mcnemar(row, ref).pvalue == pytest.approx(2 * 93 / 256)
    assert stats.verdict(stats.mcnemar(row, ref)) == "no evidence of a difference (p=0.73)"
    # no discordant pair: the rows agree on every example
    row, ref = _table(both=4, row_only=0, ref_only=0, neither=4)
    assert stats.mcnemar(row, ref).pvalue == 1.0
    assert stats.verdict(stats.mcnemar(row, ref)) == "no evidence of a difference (p=1)"
    with pytest.raises(ValueError, match="shape"):
        stats.mcnemar(row, ref[:-1])


def test_clopper_pearson_at_zero_and_one_and_inside():
    """0/81: lower 0, upper solves (1 - p)^81 = 0.025, i.e. 1 - 0.025^(1/81) = 0.0445; 81/81 mirrors it."""
    lo, hi = stats.rate_interval(0, 81)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 81), rel=1e-9)
    assert f"[{lo:.3f}, {hi:.3f}]" == "[0.000, 0.045]"
    lo, hi = stats.rate_interval(81, 81)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 81), rel=1e-9)
    # inside: the bounds are the binomial tails' 2.5% points (checked on the binomial distribution itself)
    from scipy.stats import binom

    lo, hi = stats.rate_interval(36, 81)
    assert binom.sf(35, 81, lo) == pytest.approx(0.025, rel=1e-6)  # P(X >= 36 | lo) = 0.025
    assert binom.cdf(36, 81, hi) == pytest.approx(0.025, rel=1e-6)  # P(X <= 36 | hi) = 0.025
    assert math.isnan(stats.rate_interval(0, 0)[0])
    # the beta form for averaged (non-integer) counts joins the integer one continuously
    assert stats.rate_interval(36.0000001, 81) == pytest.approx(stats.rate_interval(36, 81), abs=1e-6)


def test_clopper_pearson_is_scipys_exact_interval_for_every_count():
    """The beta-quantile form equals scipy's own exact interval (root search on the binomial) for every
    k of several n, and at another level."""
    from scipy.stats import binomtest

    for n in (1, 2, 5, 12, 81):
        for k in range(n + 1):
            for level in (0.95, 0.9):
                ci = binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
                assert stats.rate_interval(k, n, level) == pytest.approx((ci.low, ci.high), abs=1e-9), (k, n, level)


def test_rates_pool_seeds_per_example():
    """Three seeds of 4 examples: per-example shares (1, 2/3, 0, 0) -> rate 5/12, counted out of 4
    examples (not 12), with an interval at least as wide as the single-seed one at the same rate."""
    seeds = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    value, lo, hi, k, n = stats.rate(seeds)
    assert (value, k, n) == (pytest.approx(5 / 12), pytest.approx(5 / 3), 4)
    assert 0 < lo < value < hi < 1
    assert stats.rate(np.zeros((3, 81)))[1:3] == pytest.approx(stats.rate_interval(0, 81))


def test_seed_pooled_test_is_mcnemar_for_one_seed_and_sees_every_seed():
    row, ref = _table(both=5, row_only=7, ref_only=1, neither=5)
    one = stats.compare_rates(row, ref)
    same = stats.compare_rates(np.stack([row, row]), ref)  # two identical seeds: the sign-flip test
    assert one.test == "exact McNemar" and same.test == "sign-flip permutation"
    assert same.pvalue == pytest.approx(one.pvalue)  # 8 non-zero differences: enumerated exactly
    # the second seed agrees with the reference everywhere: the per-example differences halve and
    # the evidence weakens, but each example still counts once
    half = stats.compare_rates(np.stack([row, ref]), ref)
    assert half.estimate == pytest.approx(one.estimate / 2) and half.pvalue >= one.pvalue


def test_paired_bootstrap_detects_what_overlapping_intervals_miss():
    """Each of 60 examples loses 2 of 40 matched positions under the edit (the reference's positions
    vary widely between examples). The two rows' own intervals overlap heavily, yet every
    paired difference has the same sign: the paired bootstrap finds it."""
    rng = np.random.default_rng(3)
    ref = rng.integers(5, 40, size=60)
    row = ref - 2
    n_suffix = np.full(60, 40)
    _, lo_row, hi_row = stats.fraction_interval(row, n_suffix)
    _, lo_ref, hi_ref = stats.fraction_interval(ref, n_suffix)
    assert lo_ref < hi_row and lo_row < hi_ref  # the old overlap rule: "overlap"
    c = stats.compare_fractions(row, ref, n_suffix)
    assert c.estimate == pytest.approx(-2 / 40)
    assert c.lo == pytest.approx(-0.05) and c.hi == pytest.approx(-0.05)  # the difference never varies
    assert c.pvalue == pytest.approx(2 / (stats.N_BOOT + 1))
    assert stats.verdict(c) == "lower (p<0.001)"  # the smallest bootstrap p-value, 2 / 2001
    # no difference: p = 1
    assert stats.compare_fractions(ref, ref, n_suffix).pvalue == 1.0


def test_perplexity_ratio_is_paired_over_windows():
    """Windows of very different difficulty, each 0.63 nats (0.01 per token over 63 tokens) worse:
    ratio exp(0.01), the interval a point, higher; a ratio interval of unpaired windows would not be."""
    rng = np.random.default_rng(0)
    base = rng.uniform(100, 400, size=50)
    c = stats.compare_perplexity(base + 0.63, base, 63)
    assert c.estimate == pytest.approx(math.exp(0.01)) and c.null == 1.0
    assert c.lo == pytest.approx(math.exp(0.01)) and c.hi == pytest.approx(math.exp(0.01))
    assert stats.verdict(c) == "higher (p<0.001)"
    noisy = stats.compare_perplexity(base + rng.normal(0, 30, size=50), base, 63)
    assert noisy.lo < 1 < noisy.hi and stats.verdict(noisy).startswith("no evidence of a difference")


def test_bootstrap_is_deterministic_with_a_seed():
    rng = np.random.default_rng(7)
    a, b = rng.uniform(0, 1, 80), rng.uniform(0, 1, 80)
    first = stats.compare_means(a, b)
    assert stats.compare_means(a, b) == first  # same seed, same numbers
    other = stats.compare_means(a, b, seed=1)
    assert other.estimate == first.estimate and (other.lo, other.hi) != (first.lo, first.hi)
    assert stats.mean_interval(a) == stats.mean_interval(a)


def test_p_values_print_as_the_tables_show_them():
    assert stats.format_p(0.0214) == "p=0.021" and stats.format_p(0.41) == "p=0.41"
    assert stats.format_p(0.00031) == "p<0.001" and stats.format_p(1.0) == "p=1"
    assert stats.verdict(None) == "-"


def test_fractional_er_at_zero_and_one_has_an_interval_not_a_point():
    """No suffix position matched in 81 examples of 32 tokens: the bootstrap would print [0, 0]; the
    fraction is at most the share of examples with any match, 0/81, whose exact upper bound is
    1 - 0.025^(1/81) = 0.0445. Every position matched mirrors it; unequal lengths keep the bootstrap."""
    value, lo, hi = stats.fraction_interval(np.zeros(81), np.full(81, 32))
    assert (value, lo) == (0.0, 0.0) and hi == pytest.approx(1 - 0.025 ** (1 / 81), rel=1e-9)
    value, lo, hi = stats.fraction_interval(np.full(81, 32), np.full(81, 32))
    assert (value, hi) == (1.0, 1.0) and lo == pytest.approx(0.025 ** (1 / 81), rel=1e-9)
    value, lo, hi = stats.fraction_interval(np.zeros(81), np.r_[np.full(40, 32), np.full(41, 16)])
    assert (value, lo, hi) == (0.0, 0.0, 0.0)
    value, lo, hi = stats.fraction_interval(np.r_[np.ones(10), np.zeros(71)], np.full(81, 32))
    assert value == pytest.approx(10 / (81 * 32)) and lo < value < hi
