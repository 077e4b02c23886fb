"""Batched greedy decoding and teacher-forced suffix scoring.

Greedy decoding here is plain argmax for exactly ``n_new`` steps: no EOS stopping and no EOS
suppression, so an early EOS neither shifts the scored slice nor is replaced by the runner-up token.
Prompts of different lengths are left-padded with explicit position ids, so a batch decodes the
same tokens as one prompt at a time (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from memctl.progress import tqdm


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if len(s):
            ids[row, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            mask[row, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    # Sorting by length keeps padding (wasted compute) small; a stable sort keeps it deterministic.
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _cache_keyword(model) -> str:
    """The forward argument that takes the key/value cache: ``cache`` (transformers >= 5.2x; the
    old ``past_key_values`` is deprecated and goes in 5.40), else ``past_key_values``."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    """The key/value cache of a forward's output (``cache``, formerly ``past_key_values``)."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


@torch.inference_mode()
def greedy_generate_batch(model, prompts: Sequence[Sequence[int]], n_new: int, pad_id: int) -> np.ndarray:
    """Greedy continuation of one batch of prompts: an int64 array of shape (batch, n_new)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy decoding needs non-empty prompts")
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad_id, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True)
    past, cache_kw = _cache_of(out), _cache_keyword(model)
    next_tok = out.logits[:, -1, :].argmax(-1)
    generated = [next_tok]
    positions = _positions(mask)[:, -1]
    for _ in range(n_new - 1):
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        positions = positions + 1
        out = model(
            input_ids=next_tok[:, None],
            attention_mask=mask,
            position_ids=positions[:, None],
            use_cache=True,
            **{cache_kw: past},
        )
        past = _cache_of(out)
        next_tok = out.logits[:, -1, :].argmax(-1)
        generated.append(next_tok)
    return torch.stack(generated, dim=1).cpu().numpy()


def greedy_generate(
    model,
    prompts: Sequence[Sequence[int]],
    n_new: int,
    pad_id: int,
    batch_size: int = 64,
    progress: bool = True,
) -> np.ndarray:
    """Greedy continuations of all prompts, in input order: int64 array (len(prompts), n_new)."""
    result = np.zeros((len(prompts), n_new), dtype=np.int64)
    batches = _length_sorted_batches([len(p) for p in prompts], batch_size)
    for idx in tqdm(batches, desc="greedy decoding", unit="batch", disable=not progress):
        result[idx] = greedy_generate_batch(model, [prompts[i] for i in idx], n_new, pad_id)
    return result


@torch.inference_mode()
def score_suffixes(
    model,
    prefixes: Sequence[Sequence[int]],
    suffixes: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Teacher-forced scores of each suffix given its prefix.

    Returns per example: ``nll_sum`` (summed token NLL in nats over suffix tokens), ``n_tokens`` and
    ``argmax_match`` (share of suffix positions where the argmax under the true prefix is the true
    token).
    """
    n = len(prefixes)
    nll = np.zeros(n, dtype=np.float64)
    count = np.zeros(n, dtype=np.int64)
    match = np.zeros(n, dtype=np.float64)
    device = next(model.parameters()).device
    joined = [list(p) + list(s) for p, s in zip(prefixes, suffixes, strict=True)]
    batches = _length_sorted_batches([len(j) for j in joined], batch_size)
    for idx in tqdm(batches, desc="scoring suffixes", unit="batch", disable=not progress):
        ids, mask = _left_pad([joined[i] for i in idx], pad_id, device)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False
        ).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = ids[:, 1:]
        token_nll = -logprobs.gather(-1, targets[..., None]).squeeze(-1)
        hits = logits[:, :-1].argmax(-1) == targets
        width = ids.shape[1]
        for row, i in enumerate(idx):
            s_len = len(suffixes[i])
            if s_len == 0:
                continue
            # Target position t (predicting ids[t+1]); the suffix occupies the last s_len tokens.
            sl = slice(width - 1 - s_len, width - 1)
            nll[i] = token_nll[row, sl].double().sum().item()
            count[i] = s_len
            match[i] = hits[row, sl].float().mean().item()
    return {"nll_sum": nll, "n_tokens": count, "argmax_match": match}


@torch.inference_mode()
def window_losses(
    model, windows: np.ndarray, batch_size: int = 32, progress: bool = True
) -> tuple[float, int]:
    """Summed next-token NLL (nats) and token count over full, unpadded windows (rows of ids)."""
    nll = window_nlls(model, windows, batch_size, progress)
    return float(nll.sum()), int(len(nll) * max(np.asarray(windows).shape[-1] - 1, 0)) if len(nll) else 0


@torch.inference_mode()
def window_nlls(model, windows: np.ndarray, batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Each full, unpadded window's summed next-token NLL in nats (float64 [n_windows]): what
    perplexity intervals resample (every window predicts ``context - 1`` tokens)."""
    device = next(model.parameters()).device
    out = []
    for start in tqdm(
        range(0, len(windows), batch_size), desc="held-out loss", unit="batch", disable=not progress
    ):
        ids = torch.as_tensor(np.asarray(windows[start : start + batch_size]), dtype=torch.long, device=device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )
        out.append(loss.view(ids.shape[0], -1).sum(dim=1).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float64)


@torch.inference_mode()
def window_topk(model, windows: np.ndarray, k: int = 10, batch_size: int = 4, progress: bool = True) -> torch.Tensor:
    """Top-``k`` next-token ids (descending logit) at every position of full windows: [n, ctx, k]."""
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, len(windows), batch_size), desc="top-k", unit="batch", disable=not progress):
        ids = torch.as_tensor(np.asarray(windows[start : start + batch_size]), dtype=torch.long, device=device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        out.append(torch.topk(logits, k, dim=-1).indices.to("cpu", torch.int32))
    return torch.cat(out) if out else torch.zeros((0, windows.shape[1] if windows.ndim == 2 else 0, k), dtype=torch.int32)
