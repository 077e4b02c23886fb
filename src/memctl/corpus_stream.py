"""The training token stream of the demo corpus, as the demo model was trained on it.

Every segment of ``train.parquet`` (documents and canary copies, in stream order) is tokenized on
its own without special tokens and followed by one eos token; the results are concatenated. A
canary copy therefore has exactly the ids of the canary text tokenized alone. The demo's
pretraining (:mod:`memctl.demo.pretrain`) and the stages that read the corpus (candidate windows
and duplicate counts in :mod:`memctl.data`) all use :func:`train_token_stream`, so that they see
the same stream. A core module: it imports nothing of :mod:`memctl.demo`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd


def as_tokenizer(tokenizer):
    """``tokenizer`` itself, or the tokenizer of a tokenizer / model directory."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def tokenize_segments(texts: list[str], tokenizer, batch: int = 256, return_lengths: bool = False):
    """Token stream of ``texts``: each text's ids (no special tokens) followed by eos, concatenated.

    With ``return_lengths`` also the number of stream tokens each text occupies (its ids + eos).
    """
    tokenizer = as_tokenizer(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token")
    pieces: list[np.ndarray] = []
    for start in range(0, len(texts), batch):
        enc = tokenizer(list(texts[start : start + batch]), add_special_tokens=False)["input_ids"]
        for ids in enc:
            pieces.append(np.asarray(ids, dtype=np.int32))
            pieces.append(np.asarray([eos], dtype=np.int32))
    stream = np.concatenate(pieces).astype(np.int32, copy=False) if pieces else np.zeros(0, dtype=np.int32)
    if return_lengths:
        lengths = np.array([len(p) for p in pieces[0::2]], dtype=np.int64) + 1
        return stream, lengths
    return stream


def train_token_stream(corpus_dir: str | os.PathLike, tokenizer, return_canary_mask: bool = False):
    """The training token stream of a demo corpus directory (int32), as the model was trained on it.

    ``tokenizer`` is a tokenizer object or a tokenizer / model directory. With
    ``return_canary_mask`` also a boolean array marking the tokens of planted canary segments.
    """
    train = pd.read_parquet(Path(corpus_dir) / "train.parquet", columns=["segment", "kind", "text"])
    train = train.sort_values("segment", kind="stable")
    if not return_canary_mask:
        return tokenize_segments(train["text"].tolist(), tokenizer)
    stream, lengths = tokenize_segments(train["text"].tolist(), tokenizer, return_lengths=True)
    return stream, np.repeat((train["kind"] == "canary").to_numpy(), lengths)


__all__ = ["as_tokenizer", "tokenize_segments", "train_token_stream"]
