"""Every memorization and utility metric, defined once (see shared/notes/reference-facts.md).

- Exact ER = strict accuracy: share of examples whose whole generated suffix equals the true suffix.
- Fractional ER: share of suffix positions whose generated id equals the true id, position-wise with
  no alignment, pooled over all positions of all examples.
- Levenshtein: token-level edit distance ``d`` between id lists (rapidfuzz); normalised ``d/|S|``
  with ``|S|`` the true suffix length. Loose accuracy: share with ``1 - d/|S| >= 0.75``.
- Perplexity: ``exp`` of the mean token NLL pooled over all tokens (corpus perplexity).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from rapidfuzz.distance import Levenshtein

LOOSE_THRESHOLD = 0.75
COPY_THRESHOLD = 0.95


def position_matches(generated: Sequence[int], target: Sequence[int]) -> np.ndarray:
    """Boolean per target position: generated id equals the true id (missing positions = False)."""
    target = np.asarray(target)
    gen = np.asarray(generated)[: len(target)]
    out = np.zeros(len(target), dtype=bool)
    out[: len(gen)] = gen == target[: len(gen)]
    return out


def token_levenshtein(generated: Sequence[int], target: Sequence[int]) -> int:
    return int(Levenshtein.distance(list(map(int, generated)), list(map(int, target))))


def score_generations(generated: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> pd.DataFrame:
    """Per-example scores: exact match, matched positions, Levenshtein distance and similarity."""
    rows = []
    for gen, tgt in zip(generated, targets, strict=True):
        matches = position_matches(gen, tgt)
        dist = token_levenshtein(gen, tgt)
        n = len(tgt)
        rows.append(
            {
                "exact_match": bool(n > 0 and matches.all() and len(gen) >= n),
                "n_match": int(matches.sum()),
                "n_suffix": n,
                "match_positions": np.flatnonzero(matches).astype(np.int32),
                "frac_match": float(matches.mean()) if n else 0.0,
                "levenshtein": dist,
                "levenshtein_norm": dist / n if n else 0.0,
                "levenshtein_sim": 1.0 - dist / n if n else 1.0,
            }
        )
    return pd.DataFrame(rows)


def exact_er(scores: pd.DataFrame) -> float:
    return float(scores["exact_match"].mean()) if len(scores) else math.nan


def fractional_er(scores: pd.DataFrame) -> float:
    total = scores["n_suffix"].sum()
    return float(scores["n_match"].sum() / total) if total else math.nan


def loose_accuracy(scores: pd.DataFrame, threshold: float = LOOSE_THRESHOLD) -> float:
    return float((scores["levenshtein_sim"] >= threshold).mean()) if len(scores) else math.nan


def average_levenshtein(scores: pd.DataFrame) -> float:
    return float(scores["levenshtein_norm"].mean()) if len(scores) else math.nan


def perplexity(nll_sum: float, n_tokens: int) -> float:
    if n_tokens <= 0:
        return math.nan
    return float(math.exp(nll_sum / n_tokens))


def memorization_summary(scores: pd.DataFrame, loose_threshold: float = LOOSE_THRESHOLD) -> dict[str, float]:
    """The paper metrics over a set of scored generations."""
    return {
        "n_examples": int(len(scores)),
        "exact_er": exact_er(scores),
        "fractional_er": fractional_er(scores),
        "strict_accuracy": exact_er(scores),
        "loose_accuracy": loose_accuracy(scores, loose_threshold),
        "copy_rate": loose_accuracy(scores, COPY_THRESHOLD),
        "avg_levenshtein": average_levenshtein(scores),
    }


def ndcg_at_k(reference_topk: np.ndarray, edited_topk: np.ndarray) -> np.ndarray:
    """nDCG@k of the edited model's top-k next-token ids against the unedited model's, per position.

    The reference's rank ``r`` (0-based) has relevance ``k - r``; the edited model's slot ``i`` gains
    the relevance of its id (0 if absent from the reference) times ``1 / log2(i + 2)``; the sum is
    divided by the ideal (the reference list itself), so identical lists score 1.
    """
    ref = np.asarray(reference_topk).reshape(-1, np.shape(reference_topk)[-1])
    ed = np.asarray(edited_topk).reshape(ref.shape)
    k = ref.shape[1]
    relevance = (k - np.arange(k)).astype(np.float64)
    discount = 1.0 / np.log2(np.arange(k) + 2.0)
    matches = ed[:, :, None] == ref[:, None, :]  # [positions, edited slot, reference rank]
    gains = (matches * relevance[None, None, :]).sum(-1)
    return (gains * discount).sum(-1) / float((relevance * discount).sum())


def bootstrap_ci(
    scores: pd.DataFrame, statistic, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(scores)`` over examples resampled with
    replacement (``n_boot`` resamples, a fixed ``seed``: the same table gives the same interval).
    NaN when there are no examples."""
    n = len(scores)
    if n == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    values = np.array([statistic(scores.iloc[row]) for row in idx], dtype=np.float64)
    lo, hi = np.nanquantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def rate_ci(exact: np.ndarray, n_match: np.ndarray, n_suffix: np.ndarray, n_boot: int = 1000, seed: int = 0,
            level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Bootstrap intervals of Exact ER and Fractional ER from per-example arrays (vectorised)."""
    n = len(exact)
    if n == 0:
        return {"exact_er": (math.nan, math.nan), "fractional_er": (math.nan, math.nan)}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    ex = np.asarray(exact, dtype=np.float64)[idx].mean(axis=1)
    frac = np.asarray(n_match, dtype=np.float64)[idx].sum(axis=1) / np.maximum(
        np.asarray(n_suffix, dtype=np.float64)[idx].sum(axis=1), 1)
    return {"exact_er": tuple(map(float, np.quantile(ex, q))), "fractional_er": tuple(map(float, np.quantile(frac, q)))}


def ppl_ratio_ci(edited_nll: np.ndarray, base_nll: np.ndarray, tokens_per_window: int, n_boot: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Held-out perplexity ratio (edited / unedited) with a paired percentile-bootstrap interval.

    Both arrays hold the summed NLL of the same windows in the same order (every window predicts
    ``tokens_per_window`` tokens); each resample draws windows once for both models, so the
    interval reflects which text was sampled, not the two models' noise twice. Returns
    ``(ratio, lo, hi)``; the ratio is ``exp((sum edited - sum base) / tokens)`` = PPL_e / PPL_b.
    """
    edited, base = np.asarray(edited_nll, dtype=np.float64), np.asarray(base_nll, dtype=np.float64)
    if edited.shape != base.shape:
        raise ValueError(f"paired windows differ: {edited.shape} vs {base.shape}")
    n = len(base)
    if n == 0 or tokens_per_window <= 0:
        return math.nan, math.nan, math.nan
    diff = edited - base
    ratio = math.exp(diff.sum() / (n * tokens_per_window))
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = np.exp(diff[idx].sum(axis=1) / (n * tokens_per_window))
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return ratio, float(lo), float(hi)
