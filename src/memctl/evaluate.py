"""Evaluation of one (model, edit): memorization on held-out memorized sequences, and utility.

The unedited model is the edit ``none``; edited models (curvature edits, masks, baselines) plug in
through the same function once they exist. One metrics row per (model, edit):
Exact ER, Fractional ER, strict / loose accuracy, average Levenshtein (generation on the memorized
test split); loss and perplexity on the memorized suffixes (teacher-forced); held-out corpus loss
and perplexity over non-overlapping context-length windows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from memctl import metrics
from memctl.generation import greedy_generate, score_suffixes, window_losses

METRIC_COLUMNS = [
    "model",
    "edit",
    "method",
    "n_examples",
    "exact_er",
    "fractional_er",
    "strict_accuracy",
    "loose_accuracy",
    "avg_levenshtein",
    "mem_loss",
    "mem_ppl",
    "mem_teacher_forced_match",
    "heldout_loss",
    "heldout_ppl",
    "heldout_tokens",
    "ndcg10",
]


def evaluate_model(
    model,
    memorized: pd.DataFrame,
    heldout: np.ndarray,
    pad_id: int,
    settings: Mapping[str, Any],
    model_name: str,
    edit: str = "none",
    method: str = "Origin",
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (one-row metrics table, per-example scores on the memorized split)."""
    batch = int(settings.get("batch_size", 32))
    loose = float(settings.get("loose_threshold", metrics.LOOSE_THRESHOLD))
    prefixes = [list(map(int, p)) for p in memorized["prefix_ids"]]
    suffixes = [list(map(int, s)) for s in memorized["suffix_ids"]]
    if prefixes:
        n_new = len(suffixes[0])
        generated = greedy_generate(model, prefixes, n_new, pad_id, batch_size=batch, progress=progress)
        scores = metrics.score_generations(generated, suffixes)
        forced = score_suffixes(model, prefixes, suffixes, pad_id, batch_size=batch, progress=progress)
        mem_nll, mem_tokens = float(forced["nll_sum"].sum()), int(forced["n_tokens"].sum())
        scores.insert(0, "candidate_id", memorized["candidate_id"].to_numpy())
        scores["generated_ids"] = [row for row in generated]
        scores["suffix_nll"] = forced["nll_sum"]
        scores["teacher_forced_match"] = forced["argmax_match"]
        tf_match = float(np.average(forced["argmax_match"], weights=forced["n_tokens"]))
    else:
        scores = metrics.score_generations([], [])
        mem_nll, mem_tokens, tf_match = 0.0, 0, math.nan
    summary = metrics.memorization_summary(scores, loose) if len(scores) else {
        "n_examples": 0, "exact_er": math.nan, "fractional_er": math.nan, "strict_accuracy": math.nan,
        "loose_accuracy": math.nan, "avg_levenshtein": math.nan,
    }
    held_nll, held_tokens = window_losses(
        model, heldout, batch_size=int(settings.get("heldout_batch_size", 4)), progress=progress
    )
    row = {
        "model": model_name,
        "edit": edit,
        "method": method,
        **{k: summary[k] for k in METRIC_COLUMNS if k in summary},
        "mem_loss": mem_nll / mem_tokens if mem_tokens else math.nan,
        "mem_ppl": metrics.perplexity(mem_nll, mem_tokens),
        "mem_teacher_forced_match": tf_match,
        "heldout_loss": held_nll / held_tokens if held_tokens else math.nan,
        "heldout_ppl": metrics.perplexity(held_nll, held_tokens),
        "heldout_tokens": held_tokens,
        "ndcg10": math.nan,  # filled in by the evaluate command when it has the reference top-10
    }
    return pd.DataFrame([row])[METRIC_COLUMNS], scores
