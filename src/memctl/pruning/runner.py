"""Run a pruning baseline over a whole model: calibration statistics, sequential or one-pass.

Sequential (the reference form of Wanda and SparseGPT): the calibration batches' inputs to the
first transformer block are captured once; then block by block, the statistics of the block's
matrices are gathered from a forward pass of that block, its matrices are pruned in place, and the
block is run again (now pruned) to produce the next block's inputs. Within a block every matrix sees
the unpruned block's activations, as in the reference implementations.

One-pass: the statistics of every matrix come from one forward pass of the unpruned model (or from
the curvature stage's K-FAC A factors, which are the same second moments up to scale). Cheaper, and
labelled as such in the tables.

Statistics per layer input (matrices that read the same activation share them): Wanda needs the
per-feature sum of squares, SparseGPT the full ``X^T X``; both are accumulated in fp32 from
``(tokens, d_in)`` inputs handed over by :class:`memctl.capture.Capture`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from memctl.progress import tqdm

from memctl import architectures as arch
from memctl.architectures import LinearTarget
from memctl.capture import Capture, call_arguments
from memctl.edit_methods import baseline
from memctl.pruning.methods import magnitude_mask, sparsegpt_prune, wanda_mask

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  #: storage layout, True = keep
    replace: dict[str, torch.Tensor] = field(default_factory=dict)  #: storage layout (SparseGPT)
    stats: dict[str, Any] = field(default_factory=dict)


class InputMoments:
    """Per-input-key sums of ``x^2`` (diagonal) or ``x x^T`` (full) and token counts."""

    def __init__(self, full: bool):
        self.full = full
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def add(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        value = x.T @ x if self.full else x.pow(2).sum(0)
        if key in self.sums:
            self.sums[key] += value
        else:
            self.sums[key] = value
        self.tokens[key] = self.tokens.get(key, 0) + int(x.shape[0])

    def capture(self, model: nn.Module, targets: list[LinearTarget]) -> Capture:
        """A context that adds the inputs of ``targets`` (once per distinct input) while it is open."""
        return Capture(model, targets, on_input=lambda t, x: self.add(t.input_key, x))

    def diag(self, key: str) -> torch.Tensor:
        s = self.sums[key]
        return torch.diagonal(s) if self.full else s


def moments_from_factors(factors: Mapping[str, torch.Tensor], full: bool) -> InputMoments:
    """Second moments from K-FAC A factors keyed by input key (``layer3.mlp_in``); a trailing
    homogeneous (bias) coordinate, when present, is dropped by the caller's shape check."""
    moments = InputMoments(full)
    for key, a in factors.items():
        a = a.float()
        moments.sums[key] = a if full else torch.diagonal(a).clone()
        moments.tokens[key] = 1
    return moments


def _batches(windows: torch.Tensor, batch_size: int):
    for start in range(0, len(windows), batch_size):
        yield windows[start : start + batch_size]


def _block_path(target: LinearTarget) -> str:
    match = re.match(r"^(.*?\.(?:layers|h|blocks|layer)\.\d+)\.", target.name + ".")
    if not match:
        raise ValueError(f"cannot tell the transformer block of {target.name}")
    return match.group(1)


def _blocks(model: nn.Module, targets: list[LinearTarget]) -> list[tuple[str, list[LinearTarget]]]:
    """Every block of the model's layer list, in order, with the targets inside it."""
    paths = {_block_path(t) for t in targets}
    containers = {p.rsplit(".", 1)[0] for p in paths}
    if len(containers) != 1:
        raise ValueError(f"targets live in several layer lists: {sorted(containers)}")
    (container,) = containers
    out = []
    for index, _ in enumerate(model.get_submodule(container)):
        path = f"{container}.{index}"
        out.append((path, [t for t in targets if _block_path(t) == path]))
    return out


def _hidden(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def one_pass_moments(model, targets, windows, batch_size, full: bool, progress: bool = True) -> InputMoments:
    moments = InputMoments(full)
    device = next(model.parameters()).device
    with moments.capture(model, targets):
        for batch in tqdm(list(_batches(windows, batch_size)), desc="calibration pass", disable=not progress):
            model(input_ids=batch.to(device), use_cache=False)
    return moments


@torch.no_grad()
def sequential(
    model: nn.Module,
    targets: list[LinearTarget],
    windows: torch.Tensor,
    batch_size: int,
    full: bool,
    prune_block: Callable[[list[LinearTarget], InputMoments], None],
    progress: bool = True,
) -> None:
    """Block-by-block statistics and pruning; ``prune_block`` must modify the block's weights in place."""
    blocks = _blocks(model, targets)
    device = next(model.parameters()).device
    first = model.get_submodule(blocks[0][0])
    cache: list[tuple[torch.Tensor, tuple, dict]] = []
    for batch in _batches(windows, batch_size):
        args, kwargs = call_arguments(first, partial(model, input_ids=batch.to(device), use_cache=False))
        hidden = args[0] if args else kwargs.pop("hidden_states")
        cache.append((hidden, tuple(args[1:]), kwargs))
    for path, block_targets in tqdm(blocks, desc="blocks", disable=not progress):
        block = model.get_submodule(path)
        if block_targets:
            moments = InputMoments(full)
            with moments.capture(model, block_targets):
                for hidden, args, kwargs in cache:
                    block(hidden, *args, **kwargs)
            prune_block(block_targets, moments)
        cache = [(_hidden(block(hidden, *args, **kwargs)), args, kwargs) for hidden, args, kwargs in cache]


def prune_model(
    model: nn.Module,
    settings: Mapping[str, Any],
    calibration: torch.Tensor | None = None,
    factors: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> PruneResult:
    """Prune ``model`` in place with one baseline and return the edit (masks or replaced weights).

    ``settings``: a resolved pruning job (method, form, sparsity, calibration_windows, batch_size,
    damp, block_size, groups). ``factors``: K-FAC A factors by input key for ``second_moments: kfac``.
    """
    method, form, sparsity = settings["method"], settings.get("form", "sequential"), float(settings["sparsity"])
    record = baseline(method)  # its statistics and per-matrix rule (memctl.edit_methods)
    rule = record.rule()
    model.eval()
    targets = arch.linear_targets(model, groups=settings["groups"])
    result = PruneResult()

    def prune_one(t: LinearTarget, statistic: torch.Tensor | None) -> None:
        w = arch.weight(model, t)
        keep, new = rule(w, statistic, sparsity, settings)
        if new is None:
            _apply_mask(model, t, keep, result)
            return
        arch.set_weight(model, t, new)
        result.replace[t.param_name] = arch.to_storage(t, new.detach().to("cpu", w.dtype))
        result.stats.setdefault("per_matrix_sparsity", {})[t.short] = round(1.0 - float(keep.float().mean()), 6)

    if record.statistics is None:
        for t in targets:
            prune_one(t, None)
        return _finish(model, targets, result, settings)

    if calibration is None and factors is None:
        raise ValueError(f"{method} needs calibration windows (or K-FAC A factors)")
    full = record.statistics == "full"

    def prune_targets(block_targets: list[LinearTarget], moments: InputMoments) -> None:
        for t in block_targets:
            if t.input_key not in moments.sums:
                raise ValueError(f"no input statistics for {t.name} (input {t.input_key})")
            if full:
                prune_one(t, moments.sums[t.input_key][: t.d_in, : t.d_in])
            else:
                prune_one(t, moments.diag(t.input_key)[: t.d_in])

    windows = None
    if calibration is not None:
        windows = torch.as_tensor(calibration, dtype=torch.long)[: settings["calibration_windows"]]
        result.stats["calibration_windows"] = len(windows)
        result.stats["calibration_tokens"] = int(windows.numel())
    if form == "sequential":
        if windows is None:
            raise ValueError("the sequential form needs calibration windows")
        sequential(model, targets, windows, settings["batch_size"], full, prune_targets, progress)
    elif factors is not None:
        prune_targets(targets, moments_from_factors(factors, full))
        result.stats["second_moments"] = "kfac A factors"
    else:
        prune_targets(targets, one_pass_moments(model, targets, windows, settings["batch_size"], full, progress))
    return _finish(model, targets, result, settings)


# ------------------------------------------------- the baselines' per-matrix rules (their records name them)


def magnitude_rule(weight, statistic, sparsity, settings):
    """Magnitude pruning of one matrix (no statistics): ``(keep, None)``."""
    return magnitude_mask(weight, sparsity), None


def wanda_rule(weight, statistic, sparsity, settings):
    """Wanda on one matrix from its inputs' summed squares: ``(keep, None)``."""
    return wanda_mask(weight, statistic, sparsity), None


def sparsegpt_rule(weight, statistic, sparsity, settings):
    """SparseGPT on one matrix from ``X^T X``: ``(keep, new weight)``."""
    new, keep = sparsegpt_prune(weight, statistic, sparsity, settings["block_size"], settings["damp"])
    return keep, new


@torch.no_grad()
def _apply_mask(model, target: LinearTarget, keep: torch.Tensor, result: PruneResult) -> None:
    """Zero the pruned weights in the model (so later blocks see them pruned) and record the mask."""
    w = arch.weight(model, target)
    arch.set_weight(model, target, w * keep.to(w.dtype))
    result.masks[target.param_name] = arch.to_storage(target, keep.cpu())
    result.stats.setdefault("per_matrix_sparsity", {})[target.short] = round(1.0 - float(keep.float().mean()), 6)


def _finish(model, targets, result: PruneResult, settings) -> PruneResult:
    total = sum(t.d_in * t.d_out for t in targets)
    if result.masks:
        pruned = sum(int(m.numel() - m.sum()) for m in result.masks.values())
    else:
        pruned = sum(int((v == 0).sum()) for v in result.replace.values())
    result.stats.update(
        method=settings["method"],
        form=settings.get("form", "sequential") if baseline(settings["method"]).reads_data else "none",
        target_sparsity=float(settings["sparsity"]),
        sparsity=pruned / total,
        matrix_weights=int(total),
    )
    return result
