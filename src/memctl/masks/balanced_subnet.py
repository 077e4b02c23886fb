"""BalancedSubnet: the unlearning baseline of the loss-curvature (K-FAC) paper.

Learned scores shaped like each MLP matrix; the forward pass keeps all but the lowest-``|score|``
``ratio`` of every matrix (edge-popup style: the hard top-k mask passes gradients straight through
to the scores). The loss ``-(1 - balance) * L_forget + balance * L_retain`` pushes the pruned
weights towards those that carry the memorized (forget) sequences while the retain term keeps
ordinary text working. SGD with momentum on the scores; the weights stay frozen.

The scores start random (kaiming) or at ``|W|``, so the initial mask is already a valid ``ratio``
pruning: a run whose scores barely moved reports that initial pruning as the method's result. Such
a run did not converge (:func:`convergence`): it fails (``on_unconverged: fail``, default) with the
numbers seen and what to change, or is flagged in its delta (``flag``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch
from torch import nn
from memctl.progress import tqdm

from memctl.architectures import linear_targets
from memctl.masks.data import Sequences, cycling_indices, sequence_loss
from memctl.masks.settings import BalancedSubnetJob, resolve_balanced_subnet
from memctl.masks.training import MaskResult, NotConvergedError, derive_seed, mask_sparsity

log = logging.getLogger(__name__)

#: A BalancedSubnet mask counts as trained only if at least this share of the weights it prunes
#: are not among those its initial scores pruned.
MIN_CHANGED_SHARE = 0.01


def _pruned_indices(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Flat indices of the entries :func:`lowest_fraction_mask` prunes (same order and tie-break)."""
    k = round(ratio * scores.numel())
    return torch.sort(scores.detach().abs().flatten(), stable=True).indices[:k]


def lowest_fraction_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep-mask without the ``round(ratio * numel)`` lowest ``|score|`` entries (stable tie-break)."""
    k = round(ratio * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        keep[torch.sort(scores.detach().abs().flatten(), stable=True).indices[:k]] = False
    return keep.view(scores.shape)


class _TopMask(torch.autograd.Function):
    """Hard keep-mask of the scores in the forward pass, identity (straight-through) backward."""

    @staticmethod
    def forward(ctx, scores, ratio):
        return lowest_fraction_mask(scores, ratio).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def train_balanced_subnet(
    model: nn.Module,
    forget: Sequences,
    retain: Sequences,
    settings: Mapping[str, Any],
    progress: bool = True,
) -> MaskResult:
    """Train the scores and return the final keep-masks (storage layout) of the scored matrices."""
    # the job as planned (memctl balanced-subnet passes the planner's BalancedSubnetJob, read back, never
    # resolved again); plain settings (a call by hand: tests, a notebook) are resolved here, as in train_mask
    s = settings if isinstance(settings, BalancedSubnetJob) else resolve_balanced_subnet(settings)
    device = next(model.parameters()).device
    model.eval()
    model.requires_grad_(False)
    # Models without a gate projection (GPT-NeoX, GPT-2) just have no "gate" matrices.
    targets = linear_targets(model, groups=["mlp"], roles=s["roles"])
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(derive_seed(s["seed"], 11))
    scores = nn.ParameterList()
    for t in targets:
        w = params[t.param_name]
        if s["score_init"] == "magnitude":
            init = w.detach().abs().float().cpu()
        else:  # kaiming uniform as nn.Linear / edge-popup: U(-b, b), b = 1 / sqrt(fan_in)
            bound = 1.0 / math.sqrt(t.d_in)
            init = (torch.rand(tuple(w.shape), generator=gen) * 2 - 1) * bound
        scores.append(nn.Parameter(init.to(device)))
    initial = [_pruned_indices(sc, s["ratio"]) for sc in scores]  # ~ratio x 8 bytes per weight
    optimizer = torch.optim.SGD(scores.parameters(), lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    steps_per_epoch = max(1, math.ceil(len(forget) / s["batch_size"]))
    steps = steps_per_epoch * s["epochs"]
    rows = []

    def loss_on(data: Sequences, masked, idx):
        ids, attention, tmask = data.batch(idx, device)
        logits = torch.func.functional_call(
            model, masked, args=(), kwargs={"input_ids": ids, "attention_mask": attention, "use_cache": False}
        ).logits
        return sequence_loss(logits, ids, tmask)

    for it in tqdm(range(steps), desc="balanced subnet", disable=not progress):
        masked = {
            t.param_name: params[t.param_name] * _TopMask.apply(sc.abs(), s["ratio"]).to(params[t.param_name].dtype)
            for t, sc in zip(targets, scores, strict=True)
        }
        f_idx = cycling_indices(len(forget), s["batch_size"], it, s["seed"], stream=0)
        r_idx = cycling_indices(len(retain), s["batch_size"], it, s["seed"], stream=1)
        l_forget = loss_on(forget, masked, f_idx)
        l_retain = loss_on(retain, masked, r_idx)
        loss = -(1.0 - s["balance"]) * l_forget + s["balance"] * l_retain
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        rows.append({"iteration": it + 1, "loss": float(loss.detach()), "forget_loss": float(l_forget.detach()),
                     "retain_loss": float(l_retain.detach())})
    masks = {t.param_name: lowest_fraction_mask(sc, s["ratio"]).cpu() for t, sc in zip(targets, scores, strict=True)}
    history = pd.DataFrame(rows)
    stats = {
        "target_sparsity": s["ratio"],
        "sparsity": mask_sparsity(masks),
        "gated_weights": int(sum(m.numel() for m in masks.values())),
        "matrices": [t.short for t in targets],
        "steps": steps,
    }
    report = convergence([masks[t.param_name] for t in targets], initial, history, steps_per_epoch, s)
    stats["converged"] = report["converged"]
    stats["convergence"] = {k: v for k, v in report.items() if k not in ("converged", "message")}
    if not report["converged"]:
        if s["on_unconverged"] == "fail":
            raise NotConvergedError(report["message"])
        stats["unconverged_reason"] = report["reason"]
        log.warning("%s\n(on_unconverged: flag: the mask is written, marked 'did not converge')", report["message"])
    return MaskResult(masks, history, stats, targets)


def convergence(final: list[torch.Tensor], initial: list[torch.Tensor], history: pd.DataFrame,
                steps_per_epoch: int, s: Mapping[str, Any]) -> dict[str, Any]:
    """Did the scores move the mask away from its initial pruning?

    ``changed_share``: among the weights the final mask prunes, the share its initial scores did not
    prune; at least :data:`MIN_CHANGED_SHARE` is required (below it the edit is the initial random /
    magnitude pruning). The forget and retain losses of the first and the last epoch (means of the
    logged batches; the same sequences each epoch) go with it, to say what training did.
    """
    pruned = unchanged = 0
    for keep, init in zip(final, initial, strict=True):
        flat = keep.flatten()
        pruned += int((~flat).sum())
        unchanged += int((~flat[init.to(flat.device)]).sum())
    changed = (pruned - unchanged) / pruned if pruned else 1.0
    first, last = history.iloc[:steps_per_epoch], history.iloc[-steps_per_epoch:]
    out: dict[str, Any] = {
        "changed_share": round(changed, 6),
        "forget_loss_first_epoch": round(float(first["forget_loss"].mean()), 6),
        "forget_loss_last_epoch": round(float(last["forget_loss"].mean()), 6),
        "retain_loss_first_epoch": round(float(first["retain_loss"].mean()), 6),
        "retain_loss_last_epoch": round(float(last["retain_loss"].mean()), 6),
    }
    out["converged"] = changed >= MIN_CHANGED_SHARE
    if out["converged"]:
        return out
    steps = len(history)
    out["reason"] = f"only {changed:.1%} of its pruned weights differ from its initial ({s['score_init']}) pruning"
    out["message"] = (
        f"BalancedSubnet did not converge after {steps} steps ({s['epochs']} epochs of {steps_per_epoch} at "
        f"batch_size {s['batch_size']}; SGD lr {s['lr']:g}, momentum {s['momentum']:g}): {out['reason']} "
        f"(needed: {MIN_CHANGED_SHARE:.0%}), so the edit is that initial pruning, not a trained one; forget loss "
        f"{out['forget_loss_first_epoch']:.4f} (first epoch) -> {out['forget_loss_last_epoch']:.4f} (last). The "
        f"scores moved too little to reorder them (their gradients are smallest where the forget loss is "
        f"already low, as on a well-memorized set): raise pruning.balanced_subnet.lr (now {s['lr']:g}) or "
        f"epochs (now {s['epochs']}).\n"
        "Or run the job with on_unconverged: flag to write this mask anyway, marked 'did not converge' in its "
        "delta and in every masks table and plot."
    )
    return out
