"""Metric definitions against hand-computed cases (shared/notes/reference-facts.md)."""

import math

import numpy as np

import pytest

from memctl import metrics

TARGET = [1, 2, 3, 4]
GENERATED = [
    [1, 2, 3, 4],  # identical: exact, 4/4 positions, d = 0
    [1, 2, 9, 4],  # one substitution: 3/4 positions, d = 1, similarity 0.75 (loose boundary)
    [2, 3, 4, 5],  # shifted by one: 0/4 positions but d = 2 (delete 1, insert 5)
]


@pytest.fixture
def scores():
    return metrics.score_generations(GENERATED, [TARGET] * 3)


def test_per_example_scores(scores):
    assert scores["exact_match"].tolist() == [True, False, False]
    assert scores["n_match"].tolist() == [4, 3, 0]
    assert scores["levenshtein"].tolist() == [0, 1, 2]
    assert scores["levenshtein_norm"].tolist() == [0.0, 0.25, 0.5]
    assert scores["match_positions"][1].tolist() == [0, 1, 3]


def test_aggregate_rates(scores):
    summary = metrics.memorization_summary(scores)
    assert summary["exact_er"] == pytest.approx(1 / 3)
    assert summary["strict_accuracy"] == summary["exact_er"]
    # Fractional ER pools positions: (4 + 3 + 0) / 12.
    assert summary["fractional_er"] == pytest.approx(7 / 12)
    # Loose: similarity >= 0.75 holds for the first two (1.0 and exactly 0.75).
    assert summary["loose_accuracy"] == pytest.approx(2 / 3)
    assert summary["copy_rate"] == pytest.approx(1 / 3)
    assert summary["avg_levenshtein"] == pytest.approx(0.25)


def test_fractional_er_pools_positions_not_examples():
    # Suffixes of different lengths: pooled 3/6, whereas a mean of per-example rates would be 0.625.
    s = metrics.score_generations([[1, 0], [1, 2, 3, 0]], [[1, 2], [1, 2, 0, 4]])
    assert metrics.fractional_er(s) == pytest.approx(3 / 6)


def test_levenshtein_is_on_token_ids_not_characters():
    # Ids 12 and 1,2 would collide if compared as strings.
    assert metrics.token_levenshtein([12], [1, 2]) == 2
    assert metrics.token_levenshtein([5, 6, 7], [5, 7]) == 1


def test_short_generation_counts_missing_positions_as_misses():
    s = metrics.score_generations([[1, 2]], [[1, 2, 3]])
    assert not s["exact_match"][0]
    assert s["n_match"][0] == 2


def test_perplexity():
    assert metrics.perplexity(2.0 * 10, 10) == pytest.approx(math.exp(2.0))
    assert math.isnan(metrics.perplexity(0.0, 0))


def test_ndcg_at_10_by_hand():
    ref = np.arange(10)[None, :]
    # identical top-10 lists -> 1; only the top-1 right and nothing else shared -> 10 / ideal DCG
    ideal = sum((10 - i) / math.log2(i + 2) for i in range(10))  # 29.97
    only_top1 = np.array([[0, *range(100, 109)]])
    swapped = np.array([[1, 0, *range(2, 10)]])
    assert metrics.ndcg_at_k(ref, ref)[0] == pytest.approx(1.0)
    assert metrics.ndcg_at_k(ref, only_top1)[0] == pytest.approx(10 / ideal) == pytest.approx(0.3337, abs=1e-4)
    assert metrics.ndcg_at_k(ref, swapped)[0] == pytest.approx((ideal - 10 - 9 / math.log2(3) + 9 + 10 / math.log2(3)) / ideal)
    assert metrics.ndcg_at_k(ref, np.arange(50, 60)[None, :])[0] == 0.0
    # positions are scored independently and a [windows, positions, k] array is accepted
    both = metrics.ndcg_at_k(np.stack([ref, ref])[None], np.stack([ref, only_top1])[None])
    assert both.shape == (2,) and both[0] == pytest.approx(1.0)


def test_perplexity_ratio_interval_is_paired_over_windows():
    """By hand: an edit that adds exactly 0.1 nats to every window of 63 tokens multiplies
    perplexity by exp(0.1 / 63) whichever windows a resample draws, so the paired interval
    collapses to that value; independent noise per window gives an interval around the ratio of
    the two perplexities computed from their totals."""
    import numpy as np

    from memctl.metrics import perplexity, ppl_ratio_ci

    rng = np.random.default_rng(0)
    base = rng.uniform(100, 300, size=50)
    ratio, lo, hi = ppl_ratio_ci(base + 0.1, base, 63)
    assert ratio == pytest.approx(math.exp(0.1 / 63)) and lo == pytest.approx(ratio) and hi == pytest.approx(ratio)
    edited = base + rng.normal(5, 3, size=50)
    ratio, lo, hi = ppl_ratio_ci(edited, base, 63)
    expected = perplexity(edited.sum(), 50 * 63) / perplexity(base.sum(), 50 * 63)
    # paired sd of the mean log-ratio: 3 / sqrt(50) / 63 = 0.0067, so the 95% width is ~0.028
    assert ratio == pytest.approx(expected) and lo < expected < hi and 0.015 < hi - lo < 0.045
    with pytest.raises(ValueError, match="paired windows differ"):
        ppl_ratio_ci(edited[:10], base, 63)
