"""Loss terms of mask training (the weight-pruning paper, Sec. 3.3-3.5 and App. C)."""

from __future__ import annotations

import torch

from memctl.masks.settings import MODES  # one list of modes, in a torch-free module


def sparsity_regularizer(kept: torch.Tensor, total: int, sparsity: float) -> torch.Tensor:
    """``R_s = log(|P_a / P - (1 - r)| + 1)``, global over all gated weights.

    ``kept`` is ``P_a``, the number of open hard gates (with its STE gradient), ``total`` is ``P``
    and ``sparsity`` the target ``r``. A ratio, not a count, so the coefficient does not depend on
    the model size; the log keeps the pull bounded once the target is near.
    """
    if total <= 0:
        raise ValueError("sparsity regularizer over zero gated weights")
    return torch.log(torch.abs(kept / total - (1.0 - sparsity)) + 1.0)


def memorization_term(mode: str, mem_loss: torch.Tensor, lambda_m: float, threshold: float | None = None) -> torch.Tensor:
    """The memorization part of the objective for one mode.

    - ``up``: ``lambda_m * L_mem`` (eq. 6: recite more).
    - ``down``: ``|lambda_m * L_mem - t|`` (eq. 8, the second of the two steps per iteration: gradient
      ascent on the memorized loss while it is below the learning threshold ``t``, descent above).
    - ``reciprocal``: ``lambda_m / L_mem`` (eq. 10, a bounded way of raising the memorized loss).
    """
    if mode == "up":
        return lambda_m * mem_loss
    if mode == "down":
        if threshold is None:
            raise ValueError("mode 'down' needs a learning threshold t")
        return torch.abs(lambda_m * mem_loss - threshold)
    if mode == "reciprocal":
        return lambda_m / mem_loss
    raise ValueError(f"mode {mode!r} has no memorization term; modes: {MODES}")
