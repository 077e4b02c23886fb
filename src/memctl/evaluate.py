"""Evaluation of one (model, edit): memorization on two tracks, and utility.

- The memorized track (loss-curvature paper Sec. 4.2): held-out sequences the unedited model
  extracts exactly (``memorized_test``); unprefixed columns.
- The extraction-rate track (weight-pruning paper Sec. 4.1): a held-out split of all candidates,
  whatever the unedited model extracts (``er_test``); columns prefixed ``er_``.

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
from memctl.generation import greedy_generate, score_suffixes, window_nlls

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
    "ndcg10_text",
    "er_n_examples",
    "er_exact_er",
    "er_fractional_er",
    "er_loose_accuracy",
    "val_n_examples",
    "val_exact_er",
    "val_fractional_er",
    "val_loose_accuracy",
    "ood_n_examples",
    "ood_exact_er",
    "ood_fractional_er",
    "ood_loose_accuracy",
    "ood_nonmem_n_examples",
    "ood_nonmem_exact_er",
    "ood_nonmem_fractional_er",
    "forget_n_examples",
    "forget_exact_er",
    "forget_fractional_er",
    "converged",
]
#: Generation-only tracks besides the memorized one: argument name -> (column prefix, track name).
EXTRA_TRACKS = {"er_test": ("er_", "extraction_rate"), "validation": ("val_", "validation"),
                "ood": ("ood_", "ood"), "ood_nonmemorized": ("ood_nonmem_", "ood_nonmemorized"),
                "forget": ("forget_", "forget")}
#: Columns of the candidates that per-example scores keep (copy-count buckets, groups).
ID_COLUMNS = ("candidate_id", "group", "copies")


def _generation_scores(model, table: pd.DataFrame, pad_id: int, batch: int, progress: bool) -> pd.DataFrame:
    """Greedy generations of ``table``'s prefixes scored against its suffixes, with its id columns."""
    prefixes = [list(map(int, p)) for p in table["prefix_ids"]]
    suffixes = [list(map(int, s)) for s in table["suffix_ids"]]
    if not prefixes:
        return metrics.score_generations([], [])
    generated = greedy_generate(model, prefixes, len(suffixes[0]), pad_id, batch_size=batch, progress=progress)
    scores = metrics.score_generations(generated, suffixes)
    for i, col in enumerate(c for c in ID_COLUMNS if c in table.columns):
        scores.insert(i, col, table[col].to_numpy())
    scores["generated_ids"] = list(generated)
    return scores


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
    er_test: pd.DataFrame | None = None,
    forget: pd.DataFrame | None = None,
    validation: pd.DataFrame | None = None,
    ood: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (one-row metrics table, per-example scores); the scores' ``track`` column says
    ``heldout`` (one row per held-out window: its summed NLL), ``memorized``, ``extraction_rate`` (``er_test``, when given) or ``forget`` (an edit's own
    training set, e.g. BalancedSubnet's: the paper's Table 1 contrast with held-out memories) or
    ``validation`` (the memorized track's validation slice: what strengths are chosen on) or
    ``ood`` (the out-of-domain family's memorized members, with their short suffixes; with a
    ``memorized`` column in ``ood`` its other members are scored apart as ``ood_nonmemorized``)."""
    batch = int(settings.get("batch_size", 32))
    loose = float(settings.get("loose_threshold", metrics.LOOSE_THRESHOLD))
    prefixes = [list(map(int, p)) for p in memorized["prefix_ids"]]
    suffixes = [list(map(int, s)) for s in memorized["suffix_ids"]]
    scores = _generation_scores(model, memorized, pad_id, batch, progress)
    if prefixes:
        forced = score_suffixes(model, prefixes, suffixes, pad_id, batch_size=batch, progress=progress)
        mem_nll, mem_tokens = float(forced["nll_sum"].sum()), int(forced["n_tokens"].sum())
        scores["suffix_nll"] = forced["nll_sum"]
        scores["teacher_forced_match"] = forced["argmax_match"]
        tf_match = float(np.average(forced["argmax_match"], weights=forced["n_tokens"]))
    else:
        mem_nll, mem_tokens, tf_match = 0.0, 0, math.nan
    summary = metrics.memorization_summary(scores, loose) if len(scores) else {
        "n_examples": 0, "exact_er": math.nan, "fractional_er": math.nan, "strict_accuracy": math.nan,
        "loose_accuracy": math.nan, "avg_levenshtein": math.nan,
    }
    window_nll = window_nlls(model, heldout, batch_size=int(settings.get("heldout_batch_size", 4)), progress=progress)
    held_nll = float(window_nll.sum())
    held_tokens = int(len(window_nll) * max(np.asarray(heldout).shape[-1] - 1, 0)) if len(window_nll) else 0
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
        "ndcg10_text": math.nan,
        **{c: math.nan for c in METRIC_COLUMNS if c.startswith(("er_", "forget_", "val_", "ood_"))},
        "er_n_examples": 0,
        "val_n_examples": 0,
        "ood_n_examples": 0,
        "ood_nonmem_n_examples": 0,
        "forget_n_examples": 0,
        "converged": True,  # the evaluate command sets it from the edit's delta
    }
    scores.insert(0, "track", "memorized")
    ood_nonmemorized = None
    if ood is not None and "memorized" in ood.columns:  # the paper's OOD set: memorized quotes only
        known = ood["memorized"].astype(bool)
        ood, ood_nonmemorized = ood[known].reset_index(drop=True), ood[~known].reset_index(drop=True)
    for name, table in (("er_test", er_test), ("validation", validation), ("ood", ood),
                        ("ood_nonmemorized", ood_nonmemorized), ("forget", forget)):
        if table is None:
            continue
        prefix, track = EXTRA_TRACKS[name]
        extra = _generation_scores(model, table, pad_id, batch, progress)
        if len(extra):
            values = {"n_examples": int(len(extra)), "exact_er": metrics.exact_er(extra),
                      "fractional_er": metrics.fractional_er(extra), "loose_accuracy": metrics.loose_accuracy(extra, loose)}
            row.update({prefix + k: v for k, v in values.items() if prefix + k in METRIC_COLUMNS})
        extra.insert(0, "track", track)
        scores = pd.concat([scores, extra], ignore_index=True)
    if len(window_nll):
        # per-window held-out NLL: perplexity ratios get paired bootstrap intervals from these
        held = pd.DataFrame({"track": "heldout", "window": np.arange(len(window_nll)), "nll_sum": window_nll,
                             "n_tokens": np.full(len(window_nll), held_tokens // len(window_nll))})
        scores = pd.concat([scores, held], ignore_index=True)
    return pd.DataFrame([row])[METRIC_COLUMNS], scores
