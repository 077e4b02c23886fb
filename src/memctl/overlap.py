"""Disjointness of training text and test sequences, by token n-grams.

The loss-curvature paper requires that the evaluated memories are "not used to calculate A and
G"; the same holds for the text that trains a mask or calibrates a pruning baseline. A window (or a
training sequence) that shares any run of ``n`` tokens with a test sequence is dropped. ``n``
defaults to 16 tokens: long enough that common code or prose fragments do not match by chance,
short enough that a 32/32 test sequence cannot hide inside a calibration window.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

DEFAULT_N = 16


def ngrams(ids: Sequence[int] | np.ndarray, n: int) -> set[bytes]:
    """The distinct runs of ``n`` consecutive tokens of ``ids`` (as bytes of int64), empty when shorter."""
    arr = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
    if n < 1:
        raise ValueError(f"n-gram length must be >= 1, got {n}")
    if arr.size < n:
        return set()
    view = np.lib.stride_tricks.sliding_window_view(arr, n)
    return {row.tobytes() for row in view}


def ngram_index(sequences: Iterable[Sequence[int] | np.ndarray], n: int = DEFAULT_N) -> set[bytes]:
    """Every n-gram of every sequence (the test side)."""
    index: set[bytes] = set()
    for seq in sequences:
        index |= ngrams(seq, n)
    return index


def overlapping(rows: Iterable[Sequence[int] | np.ndarray], index: set[bytes], n: int = DEFAULT_N) -> np.ndarray:
    """Boolean per row: does it share an n-gram with ``index``?"""
    rows = list(rows)
    if not index:
        return np.zeros(len(rows), dtype=bool)
    return np.array([not ngrams(row, n).isdisjoint(index) for row in rows], dtype=bool)


def first_disjoint(rows: Sequence[Sequence[int] | np.ndarray] | np.ndarray, order: Sequence[int] | np.ndarray,
                   index: set[bytes], n: int = DEFAULT_N, limit: int | None = None,
                   chunk: int = 256) -> tuple[np.ndarray, int]:
    """Walk ``rows`` in ``order`` and keep those that share no n-gram with ``index``, until ``limit``
    are kept (None: walk every row). Returns (the kept row indices, in walk order; how many rows
    were examined: the walk's length up to and including the last kept row, or all of ``order``
    when it ran out). Rows are checked ``chunk`` (at least as many as are still wanted) at a time,
    so a large set is only checked as far as the budget needs; which rows are kept does not depend
    on ``chunk``, and a smaller ``limit`` keeps a prefix of what a larger one keeps."""
    order = np.asarray(order, dtype=np.int64)
    want = len(order) if limit is None else min(int(limit), len(order))
    if not index:
        return order[:want].copy(), want
    kept: list[int] = []
    pos = 0  # rows of the walk checked so far
    examined = 0
    while len(kept) < want and pos < len(order):
        part = order[pos : pos + max(int(chunk), want - len(kept))]
        hit = overlapping((rows[i] for i in part), index, n)
        for j, (i, h) in enumerate(zip(part.tolist(), hit.tolist())):
            if not h:
                kept.append(i)
                if len(kept) == want:
                    examined = pos + j + 1
                    break
        else:
            examined = pos + len(part)
        pos += len(part)
    return np.asarray(kept, dtype=np.int64), examined


def sequences_of(tables) -> list[np.ndarray]:
    """prefix + suffix token ids of every row of candidate tables (pandas DataFrames)."""
    out = []
    for table in tables:
        for prefix, suffix in zip(table["prefix_ids"], table["suffix_ids"]):
            out.append(np.concatenate([np.asarray(prefix, dtype=np.int64), np.asarray(suffix, dtype=np.int64)]))
    return out
