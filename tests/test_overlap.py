"""Training text never overlaps a test sequence (memctl.overlap): checked by hand on small cases."""

from __future__ import annotations

import numpy as np
import pandas as pd

from memctl import overlap
from memctl.extract import drop_test_overlap


def test_a_shared_run_of_n_tokens_is_an_overlap_and_n_minus_one_is_not():
    test = np.arange(100, 164)  # one 32/32 test sequence
    index = overlap.ngram_index([test], n=16)
    assert len(index) == 64 - 16 + 1
    rng = np.random.default_rng(0)
    window = rng.integers(0, 99, size=128)
    inside = window.copy()
    inside[40:56] = test[10:26]  # 16 shared tokens
    almost = window.copy()
    almost[40:55] = test[10:25]  # 15 shared tokens
    assert overlap.overlapping([window, inside, almost], index, 16).tolist() == [False, True, False]
    assert overlap.overlapping([almost], overlap.ngram_index([test], 15), 15).tolist() == [True]
    assert overlap.ngrams([1, 2, 3], 4) == set()


def _table(rows):
    return pd.DataFrame({"candidate_id": [f"c{i}" for i in range(len(rows))],
                         "prefix_ids": [r[:8] for r in rows], "suffix_ids": [r[8:] for r in rows]})


def test_training_rows_that_overlap_a_test_sequence_are_dropped_and_counted():
    rng = np.random.default_rng(1)
    test = [rng.integers(0, 50, 16) + 1000 * k for k in range(1, 3)]
    clean = [rng.integers(0, 50, 16) for _ in range(5)]
    shifted = np.concatenate([test[0][4:], rng.integers(0, 50, 4)])  # shares 12 tokens with test[0]
    splits = {"memorized_test": _table([test[0]]), "er_test": _table([test[1]]),
              "memorized_train": _table([*clean[:2], test[0]]), "memorized_val": _table([clean[2], test[1]]),
              "er_train": _table([*clean, test[1], shifted])}
    out = drop_test_overlap(dict(splits), n=12)
    assert out["dropped"] == {"memorized_train": 1, "memorized_val": 1, "er_train": 2}
    assert len(out["memorized_train"]) == 2 and len(out["memorized_val"]) == 1 and len(out["er_train"]) == 5
    kept = drop_test_overlap(dict(splits), n=13)  # the shifted row shares only 12
    assert kept["dropped"] == {"memorized_train": 1, "memorized_val": 1, "er_train": 1}
    assert drop_test_overlap(dict(splits), n=0)["dropped"] == {}
