"""Byte-level BPE tokenizer for the demo model, trained on the demo training stream only.

The tokenizer is GPT-2 style: byte-level pre-tokenization (GPT-2 split regex, no added prefix
space), a BPE model, byte-level decoding, so every string round-trips exactly. ``<|endoftext|>``
(id 0) is the only special token and serves as bos, eos, pad and unk. Encoding adds no special
tokens: the pretraining stage appends eos after each segment itself.

Each distinct training text counts once when the merges are learnt. Otherwise a canary planted 128
times would earn merges of its own and be tokenized into fewer tokens than a canary planted once,
which would confound the copies-vs-memorization curve. Training is deterministic for given texts
and settings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from memctl.demo import EOT_TOKEN, resolve_settings


def _unique(texts: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for text in texts:
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def train_tokenizer(train_texts: Iterable[str], settings: Mapping[str, Any] | None = None) -> PreTrainedTokenizerFast:
    """Train the demo BPE on ``train_texts`` (each distinct text once) with ``demo.tokenizer`` settings."""
    cfg = resolve_settings("tokenizer", settings)
    texts = _unique(train_texts)
    if not texts:
        raise ValueError("train_tokenizer: no training texts")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=int(cfg["vocab_size"]),
        min_frequency=int(cfg["min_frequency"]),
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return wrap_tokenizer(backend)


def wrap_tokenizer(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around a trained ``tokenizers.Tokenizer``."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        unk_token=EOT_TOKEN,
        pad_token=EOT_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def canary_token_lengths(tokenizer, canary_texts: Iterable[str]) -> list[int]:
    """Number of tokens of each canary text under ``tokenizer`` (no special tokens)."""
    texts = list(canary_texts)
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in enc]


__all__ = ["canary_token_lengths", "train_tokenizer", "wrap_tokenizer"]
