"""The layer-wise pruning rules, on one ``(d_out, d_in)`` matrix at a time.

- Magnitude (Han et al. 2015): drop the ``round(r * numel)`` smallest ``|W|`` of each matrix.
- Wanda (Sun et al. 2023): score ``|W_ij| * ||X_j||_2`` (``X_j``: input feature ``j`` over all
  calibration tokens); drop the ``round(r * d_in)`` lowest scores of every output row.
- SparseGPT (Frantar & Alistarh 2023): with ``H = X^T X`` (+ ``damp * mean(diag H)`` on the
  diagonal), walk the columns in blocks of ``block_size``; per block choose the ``round(r * rows *
  cols)`` weights with the lowest ``w^2 / [H^-1]_jj^2`` and prune them one column at a time while
  the optimal-brain-surgeon update moves their error onto the not-yet-visited columns.

Ties are broken by position (stable sorts), so every rule is deterministic.
"""

from __future__ import annotations

import torch


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask that drops the ``k`` lowest entries of a flat score vector (stable: earlier index first)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.sort(scores.flatten(), stable=True).indices
        keep[order[:k]] = False
    return keep.view(scores.shape)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask (bool, shaped like ``weight``) of per-matrix magnitude pruning."""
    return _prune_lowest(weight.detach().abs().float(), round(sparsity * weight.numel()))


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` from the per-feature sum of squared inputs (shape ``d_in``)."""
    return weight.detach().abs().float() * input_sq_sum.float().clamp(min=0).sqrt()[None, :]


def wanda_mask(weight: torch.Tensor, input_sq_sum: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of Wanda: per output row (``weight`` is ``(d_out, d_in)``), drop the lowest scores."""
    scores = wanda_scores(weight, input_sq_sum)
    k = round(sparsity * scores.shape[1])
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        order = torch.sort(scores, dim=1, stable=True).indices
        keep.scatter_(1, order[:, :k], False)
    return keep


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one matrix: ``(new weight with zeros, keep-mask)``, both ``(d_out, d_in)``.

    ``hessian`` is ``X^T X`` over the calibration inputs (any positive scale). Columns whose input
    never fires (zero diagonal) are pruned outright, as in the reference implementation.
    """
    w = weight.detach().float().clone()
    _rows, cols = w.shape
    h = hessian.detach().to(device=w.device, dtype=torch.float64).clone()
    if tuple(h.shape) != (cols, cols):
        raise ValueError(f"Hessian of shape {tuple(h.shape)} for a matrix with {cols} input columns")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype, device=h.device)
    # Upper Cholesky factor of H^-1: row j holds the OBS update coefficients of column j given j..end.
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    h_inv = torch.linalg.cholesky(h_inv, upper=True).to(torch.float32)
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        hinv1 = h_inv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        scores = w1.pow(2) / torch.diag(hinv1).pow(2)[None, :]
        keep1 = _prune_lowest(scores, round(sparsity * scores.numel()))
        for i in range(i2 - i1):
            col = w1[:, i]
            d = hinv1[i, i]
            q = torch.where(keep1[:, i], col, torch.zeros_like(col))
            err = (col - q) / d
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        keep[:, i1:i2] = keep1
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]
    keep &= ~dead[None, :]
    w[~keep] = 0.0
    return w.to(weight.dtype), keep
