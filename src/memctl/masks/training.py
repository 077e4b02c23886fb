"""Mask training: gate logits on frozen weights, sparsity regularizer, memorization modes.

Objective per mode (the weight-pruning paper, eqs. 2-10):

- ``none``: ``L_clm(calibration) + lambda_s R_s``
- ``up``: ``... + lambda_m L_mem``
- ``down``: two AdamW steps per iteration, each on a fresh gate sample: step 1 minimises
  ``L_clm + lambda_s R_s``, step 2 minimises ``|lambda_m L_mem - t|`` (learning threshold ``t``)
- ``reciprocal``: ``... + lambda_m / L_mem``

The model is never modified: each step builds the masked weights ``w * h`` of the gated matrices and
runs the model through :func:`torch.func.functional_call`, so only the logits (and their AdamW
state) persist per gated weight. The learning rate follows a linear warm-up and a cosine schedule
per iteration (both steps of a ``down`` iteration use the same rate). Noise seeds and batch order
are pure functions of (seed, iteration), so a run resumed from a checkpoint is bit-identical to an
uninterrupted one.

``steps: null`` is one pass over the calibration windows and ``lr: null`` is sized to that run
(:func:`resolve_budget`). After training, :func:`convergence` checks that the mask reached its target
(the gates' sampled sparsity, and a final cut made of logits that crossed the gate boundary); a mask
that did not fails its job with what to change (:class:`NotConvergedError`), or is written marked
"did not converge" (``on_unconverged: flag``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from memctl.progress import tqdm

from memctl.architectures import LinearTarget, linear_targets
from memctl.config import ConfigError
from memctl.masks import checkpoint, gates
from memctl.masks.checkpoint import CHECKPOINT, LEGACY_CHECKPOINT, CheckpointError
from memctl.masks.data import Sequences, cycling_indices, sequence_loss, window_loss
from memctl.masks.regularizers import memorization_term, sparsity_regularizer
from memctl.masks.settings import MaskJob, has_sparsity_term, resolve_mask_job

log = logging.getLogger(__name__)

LOG_COLUMNS = [
    "iteration", "lr", "loss", "calib_loss", "mem_loss", "mem_term", "r_s", "train_sparsity", "eval_sparsity",
]
#: lr: null gives every logit room to travel this many times its distance to the gate boundary.
AUTO_LR_TRAVEL = 4.0
#: A top-k final cut counts as trained only if at least this share of the weights it prunes have
#: logits that crossed the gate boundary (logit + offset <= 0) during training.
MIN_CROSSED_SHARE = 0.9


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class MaskGates(nn.Module):
    """Gate logits for a list of matrices, in each parameter's storage layout.

    With ``rank`` set, the logits of a matrix are ``init + U @ V`` (U random, V zero, so training
    starts from ``init`` exactly, as LoRA starts from the pretrained weights).
    """

    def __init__(self, model: nn.Module, targets: list[LinearTarget], init: float = 0.0, rank: int | None = None,
                 seed: int = 0):
        super().__init__()
        self.targets = list(targets)
        self.init = float(init)
        self.rank = rank
        params = dict(model.named_parameters())
        self.shapes = [tuple(params[t.param_name].shape) for t in self.targets]
        device = params[self.targets[0].param_name].device
        if rank is None:
            self.logits = nn.ParameterList(
                [nn.Parameter(torch.full(shape, self.init, dtype=torch.float32, device=device)) for shape in self.shapes]
            )
        else:
            gen = torch.Generator().manual_seed(derive_seed(seed, 7))
            self.left = nn.ParameterList()
            self.right = nn.ParameterList()
            for rows, cols in self.shapes:
                k = min(rank, rows, cols)
                self.left.append(nn.Parameter((torch.randn(rows, k, generator=gen) / math.sqrt(k)).to(device)))
                self.right.append(nn.Parameter(torch.zeros(k, cols, device=device)))

    @property
    def total(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes))

    def logits_of(self, i: int) -> torch.Tensor:
        if self.rank is None:
            return self.logits[i]
        return self.left[i] @ self.right[i] + self.init

    def sample(self, model_params: Mapping[str, torch.Tensor], seed: int, kind: str, tau: float, offset: float):
        """Masked weights ``{param_name: w * h}`` of one gate sample, and the open-gate count (STE gradients)."""
        masked, kept = {}, None
        for i, target in enumerate(self.targets):
            name = target.param_name
            w, k = gates.gated_weight(self.logits_of(i), model_params[name], derive_seed(seed, i), kind, tau, offset)
            masked[name] = w
            kept = k if kept is None else kept + k
        return masked, kept

    @torch.no_grad()
    def eval_masks(self, offset: float) -> dict[str, torch.Tensor]:
        return {t.param_name: gates.eval_mask(self.logits_of(i), offset) for i, t in enumerate(self.targets)}

    @torch.no_grad()
    def topk_masks(self, keep_fraction: float) -> dict[str, torch.Tensor]:
        """Exactly ``round(keep_fraction * P)`` open gates: the largest logits globally (ties: lowest index)."""
        flat = torch.cat([self.logits_of(i).detach().float().flatten() for i in range(len(self.targets))])
        n_keep = round(keep_fraction * flat.numel())
        if n_keep <= 0:
            keep = torch.zeros_like(flat, dtype=torch.bool)
        elif n_keep >= flat.numel():
            keep = torch.ones_like(flat, dtype=torch.bool)
        else:
            value = flat.kthvalue(flat.numel() - n_keep + 1).values  # the n_keep-th largest
            keep = flat > value
            missing = n_keep - int(keep.sum())
            if missing > 0:
                ties = torch.nonzero(flat == value).flatten()[:missing]
                keep[ties] = True
        out, start = {}, 0
        for t, shape in zip(self.targets, self.shapes, strict=True):
            n = math.prod(shape)
            out[t.param_name] = keep[start : start + n].view(shape).clone()
            start += n
        return out


def cosine_lr(iteration: int, steps: int, lr: float, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """Linear warm-up for ``warmup`` iterations, then a cosine from ``lr`` to ``lr * min_ratio``."""
    if warmup and iteration < warmup:
        return lr * (iteration + 1) / warmup
    span = max(steps - warmup, 1)
    progress = min(max(iteration - warmup, 0) / span, 1.0)
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Share of closed gates (pruned weights) over all gated weights."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total if total else 0.0


@dataclass
class MaskResult:
    masks: dict[str, torch.Tensor]  #: param name -> bool keep-mask in the parameter's storage layout
    log: pd.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)
    targets: list[LinearTarget] = field(default_factory=list)
    #: what the whole job cost (:func:`train_mask`), every resumed segment included: kept out of
    #: ``stats`` (the delta's header), which must not change with wall time
    cost: dict[str, Any] = field(default_factory=dict)


class NotConvergedError(ConfigError):
    """A trained edit that did not reach its target with these settings on this data (the message
    has the numbers seen and what to change)."""


def schedule_sum(steps: int, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """Sum over the iterations of the schedule's factor (:func:`cosine_lr` at ``lr = 1``)."""
    return float(sum(cosine_lr(it, steps, 1.0, warmup, min_ratio) for it in range(steps)))


def boundary_distance(s: MaskJob) -> float:
    """How far a logit starts from the gate boundary ``logit + offset = 0`` (at least 1)."""
    return max(abs(float(s.logit_init) + float(s.offset)), 1.0)


def resolve_budget(job: MaskJob | Mapping[str, Any], n_windows: int) -> tuple[MaskJob, dict[str, Any]]:
    """``steps: null`` -> one pass over ``n_windows`` calibration windows; ``lr: null`` -> sized to the run.

    Both are derived from this run (its windows, the gates' distance to their boundary), not defaults.
    Returns the job with both set and a record of how (for the delta and its sidecar).
    """
    s = job if isinstance(job, MaskJob) else MaskJob.from_dict(job)
    info: dict[str, Any] = {"calibration_windows_used": int(n_windows)}
    if s.steps is None:
        s = replace(s, steps=max(1, math.ceil(n_windows / s.batch_size)))
        info["steps_rule"] = f"one pass over {n_windows} calibration windows at batch_size {s.batch_size}"
    else:
        info["steps_rule"] = "set"
    if s.lr is None:
        total = schedule_sum(s.steps, s.warmup_steps, s.min_lr_ratio)
        s = replace(s, lr=AUTO_LR_TRAVEL * boundary_distance(s) / max(total, 1e-12))
        info["lr_rule"] = (f"{AUTO_LR_TRAVEL:g} x distance to the gate boundary {boundary_distance(s):g} / "
                           f"schedule sum {total:.4g} over {s.steps} iterations")
    else:
        info["lr_rule"] = "set"
    info["steps"], info["lr"] = int(s.steps), float(s.lr)
    return s, info


class _Trainer:
    def __init__(self, model, calibration, memorized, settings: MaskJob, device):
        self.s = settings
        self.model = model
        self.device = device
        self.params = dict(model.named_parameters())
        self.calibration = calibration
        self.memorized = memorized
        from memctl.config import resolve_bf16  # `auto` (a job run by hand): bf16 where it is fast

        bf16 = resolve_bf16(settings.bf16, device.type == "cuda")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def _forward(self, masked, **inputs):
        with self.autocast:
            return torch.func.functional_call(self.model, masked, args=(), kwargs={**inputs, "use_cache": False}).logits

    def calib_loss(self, masked, iteration: int, stream: int) -> torch.Tensor:
        idx = cycling_indices(len(self.calibration), self.s.batch_size, iteration, self.s.seed, stream)
        ids = self.calibration[torch.as_tensor(idx)].to(self.device)
        return window_loss(self._forward(masked, input_ids=ids), ids)

    def mem_loss(self, masked, iteration: int, stream: int) -> torch.Tensor:
        idx = cycling_indices(len(self.memorized), self.s.mem_batch_size, iteration, self.s.seed, stream)
        ids, attention, targets = self.memorized.batch(idx, self.device)
        return sequence_loss(self._forward(masked, input_ids=ids, attention_mask=attention), ids, targets)

    @torch.no_grad()
    def unpruned_mem_loss(self) -> float:
        """L_mem of the unpruned model over every memorized training sequence (token-weighted, the
        tokens of ``mem_loss_tokens``, the training forward's autocast): the quantity the learning
        threshold t is compared with (below it, mode down amplifies; paper Fig. 4)."""
        total = tokens = 0.0
        size = max(int(self.s.mem_batch_size), 1)
        for start in range(0, len(self.memorized), size):
            idx = np.arange(start, min(start + size, len(self.memorized)))
            ids, attention, targets = self.memorized.batch(idx, self.device)
            n = float(targets.sum())
            total += float(sequence_loss(self._forward({}, input_ids=ids, attention_mask=attention), ids, targets)) * n
            tokens += n
        return total / tokens if tokens else math.nan


def train_mask(
    model: nn.Module,
    calibration: torch.Tensor,
    memorized: Sequences | None,
    settings: MaskJob | Mapping[str, Any],
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    started: float | None = None,
) -> MaskResult:
    """Train gate logits on ``model`` (left unchanged) and return the final keep-masks.

    ``calibration``: int64 [n, context] windows; ``memorized``: the memorized training sequences
    (needed by every mode but ``none``). With ``work_dir``, a checkpoint is written every
    ``checkpoint_every`` iterations and picked up by the next call with the same settings.
    ``stop_after`` ends the run after that many iterations (as a kill would; for tests).

    ``MaskResult.cost`` is what the job cost, added up across resumes: ``tokens_processed`` and
    ``forward_calls`` (every forward pass through ``model``, :func:`memctl.capture.count_tokens`),
    ``wall_time_s`` (from ``started``, the epoch time the job began, by default this call, to the
    end of training, plus the earlier segments' ``earlier_wall_time_s``), ``segments`` and the
    ``devices`` they ran on. Each checkpoint holds the cost up to it, so a resumed job records
    what an uninterrupted one would (work done after the last checkpoint of a killed segment is
    redone, and counted once).
    """
    from memctl.capture import count_tokens

    started = time.time() if started is None else float(started)
    # the job as planned (memctl train-mask passes the planner's MaskJob, read back, never resolved again);
    # plain settings (a call by hand: tests, a notebook) are resolved here, as the planner would
    s = settings if isinstance(settings, MaskJob) else resolve_mask_job(settings)
    mode = s.mode
    if mode != "none" and (memorized is None or len(memorized) == 0):
        raise ValueError(f"mode {mode!r} needs memorized training sequences")
    device = next(model.parameters()).device
    model.eval()
    model.requires_grad_(False)
    calibration = torch.as_tensor(calibration, dtype=torch.long)
    if s.calibration_windows:
        calibration = calibration[: s.calibration_windows]
    s, budget = resolve_budget(s, len(calibration))
    targets = linear_targets(model, groups=s.groups)
    trainer = _Trainer(model, calibration, memorized, s, device)
    # measured before training and outside the cost count (a measurement, not the method's work)
    unpruned = trainer.unpruned_mem_loss() if memorized is not None and len(memorized) else None
    mask_gates, optimizer, start, rows, earlier, ckpt_path = _start_or_resume(work_dir, s, model, targets)
    total = mask_gates.total
    gate_args = (s.gate, s.tau, s.offset)

    def step(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    lambda_s, lambda_m = float(s.lambda_s), float(s.lambda_m)
    def cost_so_far() -> dict[str, Any]:  # `counted`: this segment's forward passes (count_tokens below)
        return {"tokens_processed": earlier["tokens_processed"] + counted["tokens"],
                "forward_calls": earlier["forward_calls"] + counted["forward_calls"],
                "wall_time_s": round(earlier["wall_time_s"] + (time.time() - started), 3),
                "segments": earlier["segments"] + 1, "devices": [*earlier["devices"], str(device)]}

    bar = tqdm(range(start, s.steps), initial=start, total=s.steps, desc=f"mask ({mode})", unit="it",
               disable=not progress)
    with count_tokens(model) as counted:
        for it in bar:
            lr = cosine_lr(it, s.steps, s.lr, s.warmup_steps, s.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            masked, kept = mask_gates.sample(trainer.params, derive_seed(s.seed, it, 0), *gate_args)
            calib = trainer.calib_loss(masked, it, stream=0)
            r_s = sparsity_regularizer(kept, total, s.sparsity).float()
            loss = calib + lambda_s * r_s
            mem = term = None
            if mode in ("up", "reciprocal"):
                mem = trainer.mem_loss(masked, it, stream=1)
                term = memorization_term(mode, mem, lambda_m)
                loss = loss + term
            step(loss)
            if mode == "down":
                del masked
                masked2, _ = mask_gates.sample(trainer.params, derive_seed(s.seed, it, 1), *gate_args)
                mem = trainer.mem_loss(masked2, it, stream=1)
                term = memorization_term(mode, mem, lambda_m, s.threshold)
                step(term)
                del masked2
            train_sparsity = 1.0 - float(kept.detach()) / total
            calib, r_s = calib.detach(), r_s.detach()
            mem = None if mem is None else mem.detach()
            bar.set_postfix(calib=f"{float(calib):.3f}", mem="-" if mem is None else f"{float(mem):.3f}",
                            r_s=f"{float(r_s):.4f}", sparsity=f"{train_sparsity:.3f}", refresh=False)
            last = it + 1 == s.steps
            if (it + 1) % s.log_every == 0 or last or it == 0:
                rows.append({
                    "iteration": it + 1, "lr": lr,
                    "loss": float(loss.detach()) + (float(term.detach()) if mode == "down" else 0.0),
                    "calib_loss": float(calib), "mem_loss": _float(mem), "mem_term": _float(term),
                    "r_s": float(r_s), "train_sparsity": train_sparsity,
                    "eval_sparsity": mask_sparsity(mask_gates.eval_masks(s.offset)),
                })
            if ckpt_path is not None and s.checkpoint_every and ((it + 1) % s.checkpoint_every == 0 or last):
                checkpoint.save(ckpt_path, s.to_dict(), it + 1, mask_gates, optimizer, rows, cost_so_far())
            if stop_after is not None and it + 1 >= stop_after and not last:
                bar.close()
                raise KeyboardInterrupt(f"stopped after {it + 1} iterations")
    bar.close()
    cost = {**cost_so_far(), "earlier_wall_time_s": earlier["wall_time_s"], "resumed_at_iteration": start or None}

    masks, stats = final_masks(mask_gates, s)
    stats.update(budget)
    if unpruned is not None:  # the masks report draws it on the threshold plot; t is read against it
        stats.update(unpruned_mem_loss=round(unpruned, 6), unpruned_mem_loss_tokens=s.mem_loss_tokens,
                     unpruned_mem_sequences=len(memorized))
    if ckpt_path is not None and not s.keep_checkpoint:
        checkpoint.remove(ckpt_path)
    _check_convergence(mask_gates, masks, s, stats, rows)
    history = pd.DataFrame(rows, columns=LOG_COLUMNS)
    return MaskResult({k: v.cpu() for k, v in masks.items()}, history, stats, targets, cost)


def _float(value: torch.Tensor | None) -> float:
    return math.nan if value is None else float(value.detach())


def _fresh(model: nn.Module, targets, s: MaskJob):
    """(gates, AdamW over them) at their initial state."""
    mask_gates = MaskGates(model, targets, s.logit_init, s.logit_rank, s.seed)
    return mask_gates, torch.optim.AdamW(mask_gates.parameters(), lr=s.lr, weight_decay=s.weight_decay)


def _start_or_resume(work_dir, s: MaskJob, model: nn.Module, targets):
    """(gates, optimizer, first iteration, log rows, cost of earlier segments, checkpoint path or
    None): fresh, or from a usable checkpoint in ``work_dir`` (an unusable one is ignored with a warning)."""
    mask_gates, optimizer = _fresh(model, targets, s)
    if work_dir is None:
        return mask_gates, optimizer, 0, [], dict(checkpoint.NO_COST), None
    ckpt_path = Path(work_dir) / CHECKPOINT
    if (Path(work_dir) / LEGACY_CHECKPOINT).exists():
        log.warning("ignoring %s: pickle checkpoints of older versions are never loaded",
                    Path(work_dir) / LEGACY_CHECKPOINT)
    if not ckpt_path.exists():
        return mask_gates, optimizer, 0, [], dict(checkpoint.NO_COST), ckpt_path
    try:
        saved = checkpoint.read(ckpt_path, s.to_dict(), mask_gates, optimizer, LOG_COLUMNS)
    except CheckpointError as err:
        log.warning("ignoring checkpoint %s (%s): training from scratch", ckpt_path, err)
        return mask_gates, optimizer, 0, [], dict(checkpoint.NO_COST), ckpt_path
    try:
        mask_gates.load_state_dict(saved.gates)
        optimizer.load_state_dict(saved.optimizer)
    except Exception as err:  # noqa: BLE001 - anything odd: never train on a half-loaded state
        log.warning("ignoring checkpoint %s (cannot be applied: %s): training from scratch", ckpt_path, err)
        return *_fresh(model, targets, s), 0, [], dict(checkpoint.NO_COST), ckpt_path
    log.info("resuming %s mask training at iteration %d / %d from %s", s.mode, saved.iteration, s.steps,
             ckpt_path)
    return mask_gates, optimizer, saved.iteration, saved.rows, saved.cost, ckpt_path


def _check_convergence(mask_gates: MaskGates, masks, s: MaskJob, stats: dict[str, Any],
                       rows: list[dict[str, Any]]) -> None:
    """Record :func:`convergence` in ``stats``; an unconverged mask fails (``on_unconverged: fail``)
    or is flagged with a warning."""
    report = convergence(mask_gates, masks, s, stats, rows[-1]["train_sparsity"] if rows else math.nan)
    stats["converged"] = report["converged"]
    stats["convergence"] = {k: v for k, v in report.items() if k not in ("converged", "message")}
    if not report["converged"]:
        if s.on_unconverged == "fail":
            raise NotConvergedError(report["message"])
        stats["unconverged_reason"] = report["reason"]
        log.warning("%s\n(masks.on_unconverged: flag: the mask is written, marked 'did not converge')",
                    report["message"])


@torch.no_grad()
def expected_sparsity(logits: torch.Tensor, kind: str, tau: float, offset: float) -> float:
    """Sum over ``logits`` of each gate's probability of being closed in a training sample.

    gumbel: ``P(l + offset + g <= 0) = exp(-exp(l + offset))`` (standard Gumbel ``g``); bernoulli:
    ``1 - sigmoid((l + offset) / tau)``; deterministic: ``[l + offset <= 0]``. Divided by the number
    of gates it is the sampled training sparsity without the sampling noise.
    """
    x = logits.detach().double() + offset
    if kind == "gumbel":
        closed = torch.exp(-torch.exp(x))
    elif kind == "bernoulli":
        closed = 1.0 - torch.sigmoid(x / tau)
    elif kind == "deterministic":
        closed = (x <= 0).double()
    else:
        raise ValueError(f"unknown gate kind {kind!r}; known: {gates.GATE_KINDS}")
    return float(closed.sum())


@torch.no_grad()
def convergence(mask_gates: MaskGates, masks: Mapping[str, torch.Tensor], s: MaskJob,
                stats: MaskJob, last_sampled: float = math.nan) -> dict[str, Any]:
    """Did the mask reach its target? Two measurable conditions, both required:

    1. **Sparsity reached**: the gates' expected sampled sparsity under the final logits (the
       training sparsity without sampling noise, :func:`expected_sparsity`) is within
       ``sparsity_tolerance`` of the target ``r``.
    2. **The final cut was trained**: among the weights whose final state differs from the initial
       one (every gate starts open, so: the pruned weights), at least :data:`MIN_CROSSED_SHARE` have
       logits that crossed the gate boundary ``logit + offset = 0``. The threshold rule meets this
       by construction; a top-k cut of logits that barely moved (the fallback when the threshold
       rule misses ``r``) does not.

    Returns the numbers, ``converged``, and for an unconverged mask a ``reason`` and a ``message``
    that says what to change (steps, lr, lambda_s) with the numbers seen.
    """
    target, tol, offset = float(s.sparsity), float(s.sparsity_tolerance), float(s.offset)
    init_open = float(s.logit_init) + offset > 0
    closed = decided = backed = 0.0
    shift_max = shift_sum = 0.0
    reached = 0
    distance = boundary_distance(s)
    for i, t in enumerate(mask_gates.targets):
        logits = mask_gates.logits_of(i).detach().float()
        closed += expected_sparsity(logits, s.gate, float(s.tau), offset)
        crossed = (logits + offset > 0) != init_open
        differs = masks[t.param_name].to(logits.device) != init_open
        decided += float(differs.sum())
        backed += float((differs & crossed).sum())
        shift = (logits - float(s.logit_init)).abs()
        shift_max = max(shift_max, float(shift.max()))
        shift_sum += float(shift.double().sum())
        reached += int((shift >= distance).sum())
    total = mask_gates.total
    expected = closed / total
    crossed_share = backed / decided if decided else 1.0
    travel = float(s.lr) * schedule_sum(s.steps, s.warmup_steps, s.min_lr_ratio)
    out: dict[str, Any] = {
        "expected_train_sparsity": round(expected, 6),
        "last_train_sparsity": None if math.isnan(last_sampled) else round(float(last_sampled), 6),
        "crossed_share_of_cut": round(crossed_share, 6),
        "logit_shift_max": round(shift_max, 6),
        "logit_shift_mean": round(shift_sum / total, 6),
        "share_moved_past_boundary_distance": round(reached / total, 6),
        "boundary_distance": distance,
        "lr_travel": round(travel, 6),
    }
    # lambda_s 0 (no sparsity term): the target is not part of the objective, so not a condition either
    sparsity_ok = abs(expected - target) <= tol or not has_sparsity_term(s)
    if not has_sparsity_term(s):
        out["sparsity_condition"] = "none (lambda_s 0: no sparsity term)"
    cut_ok = crossed_share >= MIN_CROSSED_SHARE
    out["converged"] = sparsity_ok and cut_ok
    if out["converged"]:
        return out

    mode = s.mode
    problems, reasons = [], []
    if not sparsity_ok:
        sampled = "" if math.isnan(last_sampled) else f"; the last sample's: {last_sampled:.3f}"
        problems.append(f"the gates' training sparsity ended at {expected:.3f} (expected under the final "
                        f"logits{sampled}), target {target:.3f} +- {tol:.3f}")
        reasons.append(f"training sparsity {expected:.3f} vs target {target:.3f}")
    if not cut_ok:
        problems.append(
            f"the final mask ({stats.get('mask_rule')}) prunes {stats.get('sparsity', 0.0):.3f} of the weights, but "
            f"only {crossed_share:.1%} of them have logits that crossed the gate boundary (logit + offset <= 0; "
            f"needed: {MIN_CROSSED_SHARE:.0%}): the cut ranks logits that barely moved")
        reasons.append(f"only {crossed_share:.0%} of the pruned weights crossed the gate boundary")
    moved = (f"the logits moved at most {shift_max:.3f} (mean {shift_sum / total:.3f}) from logit_init "
             f"{float(s.logit_init):g}; the gate boundary is {distance:g} away")
    steps, lr = int(s.steps), float(s.lr)
    one_pass = stats.get("calibration_windows_used")
    pass_note = (f"; one pass over the {one_pass} calibration windows at batch_size {s.batch_size} is "
                 f"{max(1, math.ceil(one_pass / s.batch_size))}" if one_pass else "")
    needed = AUTO_LR_TRAVEL * distance
    if travel < needed:
        lr_needed = needed / max(travel / lr, 1e-12)
        advice = (
            f"With lr {lr:g} over {steps} iterations AdamW can move a logit by about sum_t lr_t = {travel:.3g} "
            f"in all (about lr per step), under the {needed:g} this needs ({AUTO_LR_TRAVEL:g} x the distance to "
            f"the boundary): raise masks.lr to >= {lr_needed:.2g} at these steps (or leave masks.lr null: sized "
            f"to the run), or masks.steps (now {steps}{pass_note}) to >= {math.ceil(steps * needed / travel)} "
            f"at this lr.")
    elif expected > target + tol:
        advice = (f"The logits had room to move (sum_t lr_t = {travel:.3g}); the sparsity overshot: lower "
                  f"masks.lambda_s (now {float(s.lambda_s):g}; the {mode} entry of a per-mode mapping) or masks.lr (now {lr:g}), or raise "
                  f"masks.steps (now {steps}{pass_note}) so the schedule settles.")
    else:
        advice = (f"The logits had room to move (sum_t lr_t = {travel:.3g}) but the sparsity term did not close "
                  f"enough gates: raise masks.lambda_s (now {float(s.lambda_s):g}; the {mode} entry of a per-mode mapping) or masks.steps "
                  f"(now {steps}{pass_note}).")
    out["reason"] = "; ".join(reasons)
    out["message"] = (
        f"the {mode} mask did not converge after {steps} iterations (lr {lr:g}, lambda_s {float(s.lambda_s):g}, "
        f"target sparsity {target:g}):\n  - " + "\n  - ".join([*problems, moved]) + f"\n{advice}\n"
        "Or set masks.on_unconverged: flag to write this mask anyway, marked 'did not converge' in its delta "
        "and in every masks table and plot."
    )
    return out


def final_masks(mask_gates: MaskGates, s: MaskJob) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The deterministic eval mask, or the exact global top-(1 - r) when asked or when it misses r."""
    target = float(s.sparsity)
    threshold_masks = mask_gates.eval_masks(s.offset)
    threshold_sparsity = mask_sparsity(threshold_masks)
    rule = "threshold"
    masks = threshold_masks
    if not has_sparsity_term(s):  # lambda_s 0: no target in the objective, so nothing to cut to
        rule = "threshold (no sparsity term)"
    elif s.eval_mask == "topk" or abs(threshold_sparsity - target) > s.sparsity_tolerance:
        if s.eval_mask == "threshold":
            log.warning(
                "threshold mask sparsity %.4f misses the target %.4f by more than %.3f: using the exact "
                "global top-%.3f logits", threshold_sparsity, target, s.sparsity_tolerance, 1 - target,
            )
            rule = "topk (threshold missed target)"
        else:
            rule = "topk"
        masks = mask_gates.topk_masks(1.0 - target)
    achieved = mask_sparsity(masks)
    per_matrix = {
        t.short: round(1.0 - float(masks[t.param_name].float().mean()), 6) for t in mask_gates.targets
    }
    stats = {
        "target_sparsity": target if has_sparsity_term(s) else None,
        "sparsity": achieved,
        "threshold_sparsity": threshold_sparsity,
        "mask_rule": rule,
        "gated_weights": mask_gates.total,
        "per_matrix_sparsity": per_matrix,
    }
    return masks, stats


# ------------------------------------------------------------------------------- checkpoints
#
# A checkpoint is a directory (renamed into place whole, so never seen half-written) holding
# ``tensors.safetensors`` (gate parameters ``gates.<name>``, AdamW state ``optimizer.<index>.<key>``)
# and ``state.json`` (format, settings and their hash, iteration, AdamW param-group
# hyperparameters, non-tensor optimizer state, log rows, and the sha256 of the tensors file). Nothing
# in it is executable: no pickle is ever read. There is no RNG state to keep: noise seeds and batch
# order are pure functions of (seed, iteration).

def per_matrix_table(result: MaskResult) -> pd.DataFrame:
    """One row per gated matrix: where it is, its size and the share of pruned weights."""
    rows = []
    for t in result.targets:
        m = result.masks[t.param_name]
        rows.append({"matrix": t.short, "param": t.param_name, "layer": t.layer, "group": t.group, "role": t.role,
                     "weights": int(m.numel()), "pruned": int(m.numel() - int(m.sum())),
                     "sparsity": float(1.0 - m.float().mean())})
    return pd.DataFrame(rows)

