"""Paired statistics for tables whose rows are scored on the same sequences.

Every model of a table (the unedited one, each edit) is evaluated on the same examples of a track
(memorized test split, extraction-rate test split, out-of-domain family, vision image groups) and
on the same held-out windows. Two rows are therefore *paired*: a difference between them is tested
on the units they share, not by asking whether two separate intervals overlap (overlap is neither a
test of a difference nor sensitive where most examples agree). The choices, used by every report:

- **Intervals of rates** (Exact ER = strict accuracy, loose accuracy, the vision accuracies): exact
  Clopper-Pearson 95% intervals, ``scipy.stats.binomtest(k, n).proportion_ci(method="exact")``.
  They are never degenerate: 0/81 gives [0, 1 - 0.025^(1/81)] = [0.000, 0.045]. Tables print the
  count ``k/N`` beside each rate.
- **Differences of rates** (a binary outcome per example): the exact McNemar test, i.e. the
  two-sided exact binomial test (p = 1/2) on the discordant pairs (examples one row gets right and
  the other wrong), ``scipy.stats.binomtest``. With no discordant pair the rows agree on every
  example: p = 1.
- **Fractional ER, average Levenshtein, perplexity ratios**: a paired percentile bootstrap over the
  shared units (examples; held-out windows for perplexity), ``scipy.stats.bootstrap(paired=True,
  method="percentile")`` with a seeded generator (:data:`SEED`, :data:`N_BOOT` resamples), so the
  same tables give the same numbers. The interval is that of the difference (of the ratio for
  perplexity: the bootstrap runs on the log ratio, the mean per-token NLL difference); the p-value
  is the two-sided bootstrap p-value of that distribution against 0, ``2 min(#{d* <= 0}, #{d* >= 0})``
  with the usual ``+1`` correction, capped at 1: the difference's (1 - alpha) percentile interval
  excludes 0 exactly when p < alpha. A row's own fractional ER / Levenshtein interval is the same
  bootstrap over its examples; a fractional ER of exactly 0 (or 1) over equal-length suffixes, where
  every resample repeats the point, gets the exact interval of 0/N (N/N) examples instead, which
  bounds it (:func:`fraction_interval`).
- **Several seeds** (``masks.seeds``: the same mode trained with several seeds, one table row): the
  unit stays the example. Each example's outcome is averaged over the seeds (the share of seeds
  that extract it; the mean matched positions, the mean Levenshtein distance), so the pooled rate
  is the mean of the seeds' rates and examples are never counted twice. Its interval is the
  Clopper-Pearson interval in its beta-quantile form at the averaged count ``k = sum_i mean_s x_is``
  out of N examples: conservative, since a per-example share in [0, 1] has at most the variance of
  a Bernoulli with the same mean. Rates are compared with the exact sign-flip permutation test of
  the per-example differences (``scipy.stats.permutation_test(permutation_type="samples")``; Monte
  Carlo with a seeded generator beyond 2^13 non-zero differences), which for one seed on each side
  is the exact McNemar test again. The bootstrap quantities resample the same per-example averages.
- **Verdicts**: ``lower (p=0.003)``, ``higher (p=0.003)`` (the row against its reference) or
  ``no evidence of a difference (p=0.41)`` at the significance level :data:`ALPHA` (0.05). One test
  per cell; no correction for the many cells of a table, which are read one comparison at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _sps():
    """``scipy.stats``, imported when a test or interval is computed: it takes about a second to
    import, and every ``memctl`` command (``memctl verify`` included) builds its parser from modules
    that import this one."""
    from scipy import stats

    return stats

#: Significance level of every verdict.
ALPHA = 0.05
#: Confidence level of every interval.
LEVEL = 0.95
#: Bootstrap resamples and the seed of their generator.
N_BOOT = 2000
SEED = 0
#: Random sign flips of the permutation test where exact enumeration (2^m) is larger.
N_PERMUTATIONS = 9999


@dataclass(frozen=True)
class Comparison:
    """A row against a reference on the units they share.

    ``estimate`` is row minus reference (``null`` 0), or row over reference for perplexity (``null``
    1); ``lo``/``hi`` its interval (NaN for the rate tests, which test without one); ``n`` the shared
    units; ``row_only``/``ref_only`` the discordant examples of a McNemar table (None otherwise).
    """

    test: str
    estimate: float
    pvalue: float
    n: int
    lo: float = math.nan
    hi: float = math.nan
    null: float = 0.0
    row_only: int | None = None
    ref_only: int | None = None


def format_p(p: float) -> str:
    """``p=0.021``, ``p=0.41``, ``p=1``; ``p<0.001`` below 0.001."""
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def verdict(comparison: Comparison | None, alpha: float = ALPHA) -> str:
    """The row against its reference in words: ``lower (p=…)``, ``higher (p=…)`` or ``no evidence of
    a difference (p=…)``; ``-`` where there is nothing to compare."""
    if comparison is None or not math.isfinite(comparison.pvalue):
        return "-"
    p = comparison.pvalue
    if p < alpha and comparison.estimate != comparison.null:
        word = "lower" if comparison.estimate < comparison.null else "higher"
    else:
        word = "no evidence of a difference"
    return f"{word} ({format_p(p)})"


def rate_interval(k: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Exact Clopper-Pearson interval of ``k`` successes out of ``n`` (NaN for n = 0), from the beta
    quantiles that define it: the interval ``scipy.stats.binomtest(k, n).proportion_ci(method="exact")``
    finds by root search (~60 ms a call on a CPU; ~0.3 ms here). A non-integer ``k`` (an
    example-level average over seeds) uses the same quantiles."""
    if n <= 0:
        return math.nan, math.nan
    k, a = float(k), (1 - level) / 2
    beta = _sps().beta
    lo = 0.0 if k <= 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k >= n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def per_unit(values) -> tuple[np.ndarray, int]:
    """(per-unit values averaged over seeds, number of seeds) of a 1-D array (one seed) or a 2-D
    array (seeds x units)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        return arr, 1
    if arr.ndim != 2:
        raise ValueError(f"expected units or seeds x units, got shape {arr.shape}")
    return arr.mean(axis=0), int(arr.shape[0])


def rate(outcomes) -> tuple[float, float, float, float, int]:
    """(rate, lo, hi, k, n) of binary outcomes per unit (1-D), or per seed and unit (2-D: the
    averaged count, module docstring)."""
    x, _ = per_unit(outcomes)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan, 0.0, 0
    k = float(x.sum())
    if abs(k - round(k)) < 1e-9:
        k = float(round(k))
    lo, hi = rate_interval(k, n)
    return k / n, lo, hi, k, n


def mcnemar(row, ref) -> Comparison:
    """Exact McNemar test of two binary outcome vectors on the same units (module docstring)."""
    x, y = np.asarray(row, dtype=bool), np.asarray(ref, dtype=bool)
    if x.shape != y.shape:
        raise ValueError(f"paired outcomes differ in shape: {x.shape} vs {y.shape}")
    b, c = int((x & ~y).sum()), int((~x & y).sum())
    p = float(_sps().binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
    return Comparison("exact McNemar", (b - c) / len(x) if len(x) else math.nan, p if len(x) else math.nan,
                      int(len(x)), row_only=b, ref_only=c)


def compare_rates(row, ref, seed: int = SEED) -> Comparison:
    """Binary outcomes of a row against its reference's on the same units: the exact McNemar test
    for one seed on each side, else the sign-flip permutation test of the per-unit differences of
    the seed-averaged outcomes (module docstring). ``estimate`` = rate difference."""
    x, sx = per_unit(row)
    y, sy = per_unit(ref)
    if x.shape != y.shape:
        raise ValueError(f"paired outcomes differ in length: {x.shape} vs {y.shape}")
    if sx == 1 and sy == 1:
        return mcnemar(x > 0.5, y > 0.5)
    n = len(x)
    if n == 0:
        return Comparison("sign-flip permutation", math.nan, math.nan, 0)
    d = x - y
    nonzero = d[np.abs(d) > 1e-12]
    if len(nonzero) == 0:
        return Comparison("sign-flip permutation", 0.0, 1.0, n)
    res = _sps().permutation_test((nonzero,), lambda v, axis=-1: np.sum(v, axis=axis), vectorized=True,
                               permutation_type="samples", n_resamples=N_PERMUTATIONS,
                               rng=np.random.default_rng(seed))
    return Comparison("sign-flip permutation", float(d.mean()), min(1.0, float(res.pvalue)), n)


def _bootstrap(data: Sequence[np.ndarray], statistic, n_boot: int, seed: int,
               level: float) -> tuple[float, float, float, np.ndarray]:
    """(point, lo, hi, resampled statistics) of a paired percentile bootstrap over the last axis."""
    point = float(statistic(*data, axis=-1))
    res = _sps().bootstrap(tuple(data), statistic, paired=True, vectorized=True, axis=-1, n_resamples=n_boot,
                        method="percentile", confidence_level=level, rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return point, float(ci.low), float(ci.high), np.asarray(res.bootstrap_distribution)


def _two_sided_p(distribution: np.ndarray, null: float = 0.0) -> float:
    """Two-sided bootstrap p-value of ``null`` (the percentile interval's inversion, +1 corrected)."""
    b = len(distribution)
    tail = min(int((distribution <= null).sum()), int((distribution >= null).sum()))
    return min(1.0, 2.0 * (tail + 1) / (b + 1))


def _paired(row, ref, *more) -> tuple[list[np.ndarray], int]:
    arrays = [per_unit(a)[0] for a in (row, ref, *more)]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"paired units differ in number: {[len(a) for a in arrays]}")
    return arrays, n


def _frac(m, s, axis=-1):
    return np.sum(m, axis=axis) / np.maximum(np.sum(s, axis=axis), 1e-300)


def fraction_interval(n_match, n_suffix, n_boot: int = N_BOOT, seed: int = SEED,
                      level: float = LEVEL) -> tuple[float, float, float]:
    """(pooled fraction sum n_match / sum n_suffix, lo, hi): percentile bootstrap over examples."""
    (m, s), n = _paired(n_match, n_suffix)
    if n == 0 or s.sum() == 0:
        return math.nan, math.nan, math.nan
    if n < 2:
        return float(_frac(m, s)), math.nan, math.nan
    if np.all(s == s[0]) and (m.sum() == 0 or np.all(m == s)):
        # No position matched (or every one did): every resample repeats it and the percentile
        # interval collapses to a point. With equal suffix lengths the fraction is the mean of
        # per-example fractions, which is at most the share of examples with any matching position
        # (at least the share matching whole): the exact interval of that share, 0/n (n/n), bounds it.
        point = float(_frac(m, s))
        return (point, 0.0, rate_interval(0, n, level)[1]) if point == 0 else (point, rate_interval(n, n, level)[0], 1.0)
    point, lo, hi, _ = _bootstrap((m, s), _frac, n_boot, seed, level)
    return point, lo, hi


def mean_interval(values, n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, lo, hi): percentile bootstrap over units."""
    v, _ = per_unit(values)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    if len(v) < 2:
        return float(v.mean()), math.nan, math.nan
    point, lo, hi, _ = _bootstrap((v,), lambda a, axis=-1: np.mean(a, axis=axis), n_boot, seed, level)
    return point, lo, hi


def compare_fractions(row_match, ref_match, n_suffix, n_boot: int = N_BOOT, seed: int = SEED,
                      level: float = LEVEL) -> Comparison:
    """Fractional ER of a row minus its reference's (matched positions per example over the same
    suffixes): paired bootstrap over examples."""
    (x, y, s), n = _paired(row_match, ref_match, n_suffix)
    if n < 2 or s.sum() == 0:
        return Comparison("paired bootstrap", math.nan, math.nan, n)
    stat = lambda a, b, t, axis=-1: (np.sum(a, axis=axis) - np.sum(b, axis=axis)) / np.maximum(  # noqa: E731
        np.sum(t, axis=axis), 1e-300)
    point, lo, hi, dist = _bootstrap((x, y, s), stat, n_boot, seed, level)
    return Comparison("paired bootstrap", point, _two_sided_p(dist), n, lo, hi)


def compare_means(row, ref, n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL) -> Comparison:
    """Mean of a per-unit quantity (e.g. normalised Levenshtein distance) of a row minus its
    reference's: paired bootstrap over the units."""
    (x, y), n = _paired(row, ref)
    if n < 2:
        return Comparison("paired bootstrap", math.nan, math.nan, n)
    d = x - y
    point, lo, hi, dist = _bootstrap((d,), lambda a, axis=-1: np.mean(a, axis=axis), n_boot, seed, level)
    return Comparison("paired bootstrap", point, _two_sided_p(dist), n, lo, hi)


def compare_perplexity(row_nll, ref_nll, tokens_per_window: int, n_boot: int = N_BOOT, seed: int = SEED,
                       level: float = LEVEL) -> Comparison:
    """Held-out perplexity of a row over its reference's (``estimate`` = the ratio, ``null`` 1), from
    the summed NLL of the same windows (each predicting ``tokens_per_window`` tokens): paired
    bootstrap over windows of the log ratio (the mean per-token NLL difference)."""
    (x, y), n = _paired(row_nll, ref_nll)
    if n == 0 or tokens_per_window <= 0:
        return Comparison("paired bootstrap", math.nan, math.nan, n, null=1.0)
    d = (x - y) / tokens_per_window
    ratio = math.exp(float(d.mean()))
    if n < 2:
        return Comparison("paired bootstrap", ratio, math.nan, n, null=1.0)
    log_ratio, lo, hi, dist = _bootstrap((d,), lambda a, axis=-1: np.mean(a, axis=axis), n_boot, seed, level)
    return Comparison("paired bootstrap", ratio, _two_sided_p(dist), n, math.exp(lo), math.exp(hi), null=1.0)


# ------------------------------------------------------------------ how many examples a split needs

#: Documented width of a useful interval: a track's exact 95% interval of a rate should be narrower
#: than this at the worst case (a rate of 0.5, where Clopper-Pearson intervals are widest). Below the
#: N that reaches it (:func:`min_n_for_width`: 104) the track's verdicts are marked "underpowered".
TARGET_WIDTH = 0.2
#: Documented bound for the validation slice (the memorized track's, where edit strengths are
#: chosen): it needs enough sequences that a clean 0/N rules out a true rate of this much at 95%
#: (:func:`min_n_zero_below`: 17 sequences).
VALIDATION_BOUND = 0.2


def worst_case_width(n: int, level: float = LEVEL) -> float:
    """The widest exact (Clopper-Pearson) interval of a rate over ``n`` examples: at ``k = n/2``
    (for odd ``n`` the wider of the two neighbours). 1.0 for ``n = 0``."""
    n = int(n)
    if n <= 0:
        return 1.0
    widths = []
    for k in {n // 2, (n + 1) // 2}:
        lo, hi = rate_interval(k, n, level)
        widths.append(hi - lo)
    return float(max(widths))


def min_n_for_width(width: float = TARGET_WIDTH, level: float = LEVEL) -> int:
    """The smallest ``n`` whose worst-case exact interval (:func:`worst_case_width`) is narrower than
    ``width``: 104 for 0.2, 402 for 0.1 at 95%. The width falls as ``n`` grows, so a bisection
    between 1 and a bound from the normal approximation finds it."""
    if not 0 < width <= 1:
        raise ValueError(f"interval width {width!r} is not in (0, 1]")
    z = float(_sps().norm.ppf(1 - (1 - level) / 2))
    lo, hi = 1, max(2, int(math.ceil((2 * z * 0.5 / width) ** 2 * 2)) + 10)
    while worst_case_width(hi, level) >= width:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if worst_case_width(mid, level) < width:
            hi = mid
        else:
            lo = mid + 1
    return lo


def zero_upper_bound(n: int, level: float = LEVEL) -> float:
    """The exact upper bound of a rate observed as 0 of ``n``: ``1 - ((1 - level) / 2)^(1/n)``."""
    return 1.0 if n <= 0 else float(1 - ((1 - level) / 2) ** (1 / int(n)))


def min_n_zero_below(bound: float = VALIDATION_BOUND, level: float = LEVEL) -> int:
    """The smallest ``n`` at which 0 of ``n`` has an exact upper bound below ``bound``:
    ``floor(ln(alpha/2) / ln(1 - bound)) + 1`` (17 for 0.2 at 95%)."""
    if not 0 < bound < 1:
        raise ValueError(f"rate bound {bound!r} is not in (0, 1)")
    n = int(math.floor(math.log((1 - level) / 2) / math.log(1 - bound))) + 1
    while zero_upper_bound(n - 1, level) < bound and n > 1:  # guard the float floor at exact powers
        n -= 1
    return n
