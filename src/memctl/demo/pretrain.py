"""Pretrain the demo model: a small Pythia-style GPT-NeoX, from scratch, on the CPU.

Training token stream (:func:`memctl.corpus_stream.train_token_stream`, importable from here too)
    Every segment of ``train.parquet`` (documents and canary copies, in stream order) is tokenized
    on its own without special tokens and followed by one eos token; the results are concatenated.
    A canary copy therefore has exactly the ids of the canary text tokenized alone. Other stages
    (window sampling, duplicate counting) reuse this function so that they see the same stream; it
    lives in a core module because core stages must not import the demo.

Training (:func:`pretrain`)
    Each step draws ``batch_size`` windows of ``context_length + 1`` tokens at uniformly random
    offsets of the stream (seeded), predicts every next token of the window, and takes one AdamW
    step (betas 0.9/0.95, weight decay on matrices only, gradient norm clipped at 1.0). The learning
    rate rises linearly for ``warmup_steps`` and then follows a cosine to ``min_lr_ratio * lr`` at
    the last step. With ``bf16`` the forward pass runs under CPU bf16 autocast (AMX where present)
    while weights and optimizer state stay fp32. Results are deterministic for a given seed, thread
    count and machine.

Measured with the schema defaults (a ~0.96M-token stream of which ~0.19M are canary copies; 4
layers, d=256, vocab 4096, context 128, batch 32, 640 steps = 2.6M training tokens, ~2.7 passes;
5.3M parameters): exact 32 -> 32 greedy extraction of the canaries 0% at 1, 2 and 4 copies, 12%
at 8, 100% at 16 and more. config/config.yaml's testbed (docs/demo-testbed.md: context 64, 1150
steps = 2.36M tokens over a 1.12M-token stream, ~80% canary copies, lr 4e-3): 0-3% at 2-4 copies,
26% at 6, 47% at 8, 85% at 12, 92% at 16, 100% at 24; ~530 of 1,360 candidates memorized.
Speed on 2 cores, steady state, measured side by side: bf16 autocast 12.1k tokens/s at context
128 and 12.9k at 64 on a Xeon with AMX, fp32 6.2k / 6.3k there (bf16 halves the time only where
AMX is present); ~6.4-7.7k tokens/s in bf16 on an AMD EPYC without AMX; a one-thread run of the
testbed averaged 7.6k on the AMX host. Budget by steps, the host's speed swings.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from memctl.progress import tqdm
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from memctl.corpus_stream import as_tokenizer, tokenize_segments, train_token_stream
from memctl.demo import resolve_settings

#: Global gradient-norm clip applied at every step.
GRAD_CLIP = 1.0
#: Adam betas (Pythia's).
ADAM_BETAS = (0.9, 0.95)
#: Attention implementation used while training (eager measured faster than sdpa on 2 CPU cores).
TRAIN_ATTN = "eager"
#: Number of final steps whose mean loss is reported as the final loss.
FINAL_LOSS_STEPS = 20


def model_config(arch_settings: Mapping[str, Any] | None, vocab_size: int, eos_token_id: int) -> GPTNeoXConfig:
    """GPT-NeoX config of the demo model (Pythia choices: parallel residual, 25% rotary, untied head)."""
    arch = resolve_settings("architecture", arch_settings)
    return GPTNeoXConfig(
        vocab_size=int(vocab_size),
        hidden_size=int(arch["hidden_size"]),
        num_hidden_layers=int(arch["num_hidden_layers"]),
        num_attention_heads=int(arch["num_attention_heads"]),
        intermediate_size=int(arch["intermediate_size"]),
        max_position_embeddings=int(arch["context_length"]),
        hidden_act="gelu",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        initializer_range=0.02,
        bos_token_id=int(eos_token_id),
        eos_token_id=int(eos_token_id),
        pad_token_id=int(eos_token_id),
        use_cache=True,
    )


def lr_at(step: int, steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of 0-based ``step``: linear warmup, then cosine down to ``min_lr_ratio * lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = lr * min_lr_ratio
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * progress))


def _threads(requested: int) -> int:
    if requested and requested > 0:
        return int(requested)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def pretrain(
    token_stream: np.ndarray,
    tokenizer,
    arch_settings: Mapping[str, Any] | None,
    train_settings: Mapping[str, Any] | None,
    *,
    progress: bool = True,
) -> tuple[GPTNeoXForCausalLM, pd.DataFrame]:
    """Train the demo GPT-NeoX on ``token_stream``; return ``(model, log_df)``.

    ``log_df`` has one row per step: ``step``, ``loss``, ``lr``, ``tokens_per_s``; summary numbers
    are in ``log_df.attrs`` (``final_loss``, ``tokens_per_s``, ``wall_time_s``, ``threads``, ...).
    The returned model is in eval mode, fp32.
    """
    tokenizer = as_tokenizer(tokenizer)
    arch = resolve_settings("architecture", arch_settings)
    cfg = resolve_settings("train", train_settings)
    stream = np.asarray(token_stream, dtype=np.int64)
    ctx = int(arch["context_length"])
    if stream.ndim != 1 or len(stream) < ctx + 2:
        raise ValueError(f"token stream of {len(stream)} tokens is shorter than one window of {ctx + 1}")
    vocab_size = len(tokenizer)
    if int(stream.max()) >= vocab_size:
        raise ValueError(f"token id {int(stream.max())} outside the tokenizer's vocabulary of {vocab_size}")

    threads = _threads(int(cfg["threads"]))
    torch.set_num_threads(threads)
    from memctl.config import resolve_bf16  # `auto` (run by hand; the plan resolves it for its jobs)

    bf16 = resolve_bf16(cfg["bf16"])
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    config = model_config(arch, vocab_size, tokenizer.eos_token_id)
    model = GPTNeoXForCausalLM(config).float()
    # Eager attention trains ~15% faster than SDPA at this size on the CPU; the returned model gets
    # back the default implementation, the one from_pretrained gives.
    default_attn = model.config._attn_implementation
    model.set_attn_implementation(TRAIN_ATTN)
    model.train()

    decay, no_decay = [], []
    for _name, param in model.named_parameters():
        (decay if param.ndim >= 2 else no_decay).append(param)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": float(cfg["weight_decay"])},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=float(cfg["lr"]),
        betas=ADAM_BETAS,
        eps=1e-8,
    )

    steps, batch = int(cfg["steps"]), int(cfg["batch_size"])
    data = torch.from_numpy(stream)
    offsets = torch.arange(ctx + 1)
    tokens_per_step = batch * ctx
    log_rows = []
    started = time.perf_counter()
    bar = tqdm(range(steps), desc="pretrain", disable=not progress, mininterval=2.0, dynamic_ncols=True)
    smoothed = None
    for step in bar:
        t0 = time.perf_counter()
        lr = lr_at(step, steps, float(cfg["lr"]), int(cfg["warmup_steps"]), float(cfg["min_lr_ratio"]))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.from_numpy(rng.integers(0, len(stream) - ctx, size=batch))
        window = data[starts[:, None] + offsets[None, :]]
        inputs, targets = window[:, :-1], window[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=inputs, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab_size), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"pretrain: loss became {loss_value} at step {step}")
        dt = time.perf_counter() - t0
        tps = tokens_per_step / dt if dt > 0 else float("nan")
        log_rows.append((step, loss_value, lr, tps))
        smoothed = loss_value if smoothed is None else 0.9 * smoothed + 0.1 * loss_value
        if progress:
            bar.set_postfix(loss=f"{smoothed:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
    bar.close()
    wall = time.perf_counter() - started
    model.set_attn_implementation(default_attn)
    model.eval()

    log_df = pd.DataFrame(log_rows, columns=["step", "loss", "lr", "tokens_per_s"]).astype(
        {"step": "int64", "loss": "float64", "lr": "float64", "tokens_per_s": "float64"}
    )
    tail = log_df["loss"].tail(min(FINAL_LOSS_STEPS, len(log_df)))
    log_df.attrs.update(
        {
            "final_loss": float(tail.mean()),
            "last_loss": float(log_df["loss"].iloc[-1]),
            "first_loss": float(log_df["loss"].iloc[0]),
            "tokens_per_s": float(steps * tokens_per_step / wall) if wall > 0 else float("nan"),
            "tokens_per_s_median_step": float(log_df["tokens_per_s"].median()),
            "wall_time_s": float(wall),
            "train_tokens": int(steps * tokens_per_step),
            "stream_tokens": int(len(stream)),
            "epochs": float(steps * tokens_per_step / len(stream)),
            "threads": threads,
            "n_params": int(sum(p.numel() for p in model.parameters())),
        }
    )
    return model, log_df


def save_model(model: GPTNeoXForCausalLM, tokenizer, log_df: pd.DataFrame | None, out_dir: str | os.PathLike) -> None:
    """Write a HF model directory: safetensors weights, config, generation config, tokenizer, train log."""
    out_dir = Path(out_dir)
    tokenizer = as_tokenizer(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if log_df is not None:
        pd.DataFrame(log_df).to_parquet(out_dir / "train_log.parquet", index=False)


__all__ = ["lr_at", "model_config", "pretrain", "save_model", "tokenize_segments", "train_token_stream"]
