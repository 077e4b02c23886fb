"""Token batches for mask training and the baselines: calibration windows and prefix+suffix sequences.

Batch order is a pure function of (seed, iteration): a resumed run draws exactly the batches an
uninterrupted run would have drawn, with no sampler state to checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch


def load_windows(path: str | os.PathLike, limit: int | None = None) -> torch.Tensor:
    """int64 [n, context] windows from a ``windows.safetensors`` (calibration / held-out stage output)."""
    from safetensors.torch import load_file

    windows = load_file(str(path))["windows"].to(torch.long)
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"{path}: expected a non-empty [n_windows, context] tensor 'windows', got {tuple(windows.shape)}")
    return windows[:limit] if limit else windows


def sample_rows(table: pd.DataFrame, rows: int | None, seed: int) -> pd.DataFrame:
    """A seeded sample of ``rows`` rows of ``table`` without replacement, in the table's order (all of
    it when ``rows`` is None or not smaller): the forget track's rows (``masks.own_memories``)."""
    if rows is not None and rows < 1:
        raise ValueError(f"masks.own_memories.rows: {rows} is less than 1")
    if rows is None or rows >= len(table):
        return table.reset_index(drop=True)
    keep = np.sort(np.random.default_rng(int(seed)).choice(len(table), size=int(rows), replace=False))
    return table.iloc[keep].reset_index(drop=True)


def cycling_indices(n: int, batch_size: int, iteration: int, seed: int, stream: int = 0) -> np.ndarray:
    """Indices of batch ``iteration`` when cycling through ``n`` items in a fresh seeded order per pass."""
    if n <= 0:
        raise ValueError("no items to draw batches from")
    start = iteration * batch_size
    out = np.empty(batch_size, dtype=np.int64)
    for j in range(batch_size):
        epoch, pos = divmod(start + j, n)
        perm = _permutation(n, seed, stream, epoch)
        out[j] = perm[pos]
    return out


_PERM_CACHE: dict[tuple[int, int, int, int], np.ndarray] = {}


def _permutation(n: int, seed: int, stream: int, epoch: int) -> np.ndarray:
    key = (n, seed, stream, epoch)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 64:
            _PERM_CACHE.clear()
        _PERM_CACHE[key] = np.random.default_rng([seed, stream, epoch]).permutation(n)
    return _PERM_CACHE[key]


@dataclass
class Sequences:
    """Prefix + suffix sequences, right-padded, with the positions each loss averages over.

    ``targets[b, t]`` is True where the token ``ids[b, t + 1]`` is scored given ``ids[b, : t + 1]``.
    """

    ids: torch.Tensor  # int64 [n, width]
    attention: torch.Tensor  # int64 [n, width]
    targets: torch.Tensor  # bool [n, width - 1]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def batch(self, idx: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sel = torch.as_tensor(idx)
        width = int(self.attention[sel].sum(1).max())  # trim the padding this batch does not need
        return (
            self.ids[sel, :width].to(device),
            self.attention[sel, :width].to(device),
            self.targets[sel, : width - 1].to(device),
        )


def sequences_from_pairs(
    prefixes: Sequence[Sequence[int]], suffixes: Sequence[Sequence[int]], tokens: str = "full", pad_id: int = 0
) -> Sequences:
    """``tokens='full'``: every next-token position of prefix + suffix; ``'suffix'``: suffix tokens only."""
    if tokens not in ("full", "suffix"):
        raise ValueError(f"loss tokens must be 'full' or 'suffix', got {tokens!r}")
    if len(prefixes) == 0:
        raise ValueError("no sequences")
    joined = [list(map(int, p)) + list(map(int, s)) for p, s in zip(prefixes, suffixes, strict=True)]
    width = max(len(j) for j in joined)
    if width < 2:
        raise ValueError("sequences need at least two tokens")
    ids = torch.full((len(joined), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(joined), width), dtype=torch.long)
    targets = torch.zeros((len(joined), width - 1), dtype=torch.bool)
    for row, (seq, prefix) in enumerate(zip(joined, prefixes, strict=True)):
        ids[row, : len(seq)] = torch.as_tensor(seq)
        attention[row, : len(seq)] = 1
        first = 0 if tokens == "full" else max(len(prefix) - 1, 0)
        targets[row, first : len(seq) - 1] = True
    return Sequences(ids, attention, targets)


def sequences_from_table(path_or_df, tokens: str = "full", pad_id: int = 0) -> Sequences:
    """Sequences from a table with ``prefix_ids`` and ``suffix_ids`` (the extraction splits)."""
    df = path_or_df if isinstance(path_or_df, pd.DataFrame) else pd.read_parquet(path_or_df)
    missing = {"prefix_ids", "suffix_ids"} - set(df.columns)
    if missing:
        raise ValueError(f"{path_or_df if not isinstance(path_or_df, pd.DataFrame) else 'table'}: missing columns {sorted(missing)}")
    if len(df) == 0:
        raise ValueError(f"{path_or_df if not isinstance(path_or_df, pd.DataFrame) else 'table'}: no sequences "
                         "(a training split the extract stage left empty: its log says why, e.g. every row shared "
                         "a run of extract.disjoint_ngram tokens with a test sequence)")
    return sequences_from_pairs(list(df["prefix_ids"]), list(df["suffix_ids"]), tokens, pad_id)


def sequences_from_windows(windows: torch.Tensor) -> Sequences:
    """Full windows as sequences scored at every position (calibration text as a retain set)."""
    n, width = windows.shape
    return Sequences(
        windows.to(torch.long), torch.ones((n, width), dtype=torch.long), torch.ones((n, width - 1), dtype=torch.bool)
    )


def sequence_loss(logits: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the target positions."""
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)
    mask = targets.to(nll.dtype)
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def window_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over full (unpadded) windows: the calibration CLM loss."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
