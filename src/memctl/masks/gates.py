"""Per-weight binary gates with straight-through gradients (the weight-pruning paper, Sec. 3.2, App. A).

Every gated weight ``w`` has a logit ``l``; the training forward pass uses ``w * h`` with a hard
0/1 gate ``h`` and the backward pass treats ``h`` as the soft gate ``s`` (straight-through
estimator, STE), so ``dL/dl = dL/d(w h) * w * ds/dl``. Gate kinds:

- ``gumbel`` (the paper's main choice): ``s = sigmoid((l + offset + g) / tau)`` with Gumbel noise
  ``g = -log(-log u)``, ``u ~ U(0, 1)``; ``h = round(s)``, i.e. ``l + offset + g > 0``.
- ``bernoulli`` (appendix): ``p = sigmoid((l + offset) / tau)``, ``h ~ Bernoulli(p)``, gradient
  through ``p``.
- ``deterministic`` (appendix, eq. 9): ``h = [l + offset > 0]``, gradient through
  ``sigmoid((l + offset) / tau)``.

The evaluation mask of every kind is deterministic: keep where ``l + offset > 0``.

Memory: the noise is never stored. Each sample is identified by an integer seed and regenerated in
the backward pass, so a gated weight costs only its logit (plus the optimizer's state) between
steps, and the masked weight ``w * h`` while a step runs.
"""

from __future__ import annotations

import torch

GATE_KINDS = ("gumbel", "bernoulli", "deterministic")
#: ``u`` is clamped to ``[EPS, 1 - EPS]`` so that ``-log(-log u)`` stays finite.
EPS = 1e-6


def _uniform(shape, seed: int, device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device, dtype=torch.float32).clamp_(EPS, 1.0 - EPS)


def _pre_activation(logits: torch.Tensor, seed: int, kind: str, offset: float) -> torch.Tensor:
    """``l + offset (+ noise)`` as a new fp32 tensor: the gate is open where it is > 0 (gumbel, deterministic)."""
    if kind == "gumbel":
        z = _uniform(logits.shape, seed, logits.device).log_().neg_().log_().neg_()  # Gumbel(0, 1)
        return z.add_(logits.detach().float()).add_(offset)
    if kind in ("bernoulli", "deterministic"):
        return logits.detach().float() + offset
    raise ValueError(f"unknown gate kind {kind!r}; known: {GATE_KINDS}")


def hard_gate(logits: torch.Tensor, seed: int, kind: str, tau: float, offset: float) -> torch.Tensor:
    """The sampled 0/1 gate (bool tensor, shaped like ``logits``) for one seed."""
    z = _pre_activation(logits, seed, kind, offset)
    if kind == "bernoulli":
        p = torch.sigmoid(z.div_(tau))
        return _uniform(logits.shape, seed, logits.device) < p
    return z > 0


def ste_slope(logits: torch.Tensor, seed: int, kind: str, tau: float, offset: float) -> torch.Tensor:
    """``ds/dl`` of the soft gate the STE differentiates through: ``s (1 - s) / tau``."""
    s = torch.sigmoid(_pre_activation(logits, seed, kind, offset).div_(tau))
    return s.mul_(1.0 - s).div_(tau)


def soft_gate(logits: torch.Tensor, seed: int, kind: str, tau: float, offset: float) -> torch.Tensor:
    """The soft gate ``s`` itself (for inspection and tests; training never materialises it)."""
    return torch.sigmoid(_pre_activation(logits, seed, kind, offset).div_(tau))


def eval_mask(logits: torch.Tensor, offset: float) -> torch.Tensor:
    """Deterministic mask used after training, for every gate kind: keep where ``l + offset > 0``."""
    return (logits.detach().float() + offset) > 0


class _GatedWeight(torch.autograd.Function):
    """``(w * h, sum(h))`` with STE gradients for the logits; ``w`` is frozen (no gradient)."""

    @staticmethod
    def forward(ctx, logits, weight, seed, kind, tau, offset):
        hard = hard_gate(logits, seed, kind, tau, offset)
        ctx.save_for_backward(logits, weight)
        ctx.gate = (seed, kind, tau, offset)
        kept = hard.sum().to(torch.float64)
        return weight * hard, kept

    @staticmethod
    def backward(ctx, grad_weight, grad_kept):
        logits, weight = ctx.saved_tensors
        grad = torch.mul(grad_weight, weight).float()  # dL/dh through w * h
        grad.add_(grad_kept.float())  # dL/dh through the kept count (sparsity regularizer)
        grad.mul_(ste_slope(logits, *ctx.gate))
        return grad.to(logits.dtype), None, None, None, None, None


def gated_weight(
    logits: torch.Tensor, weight: torch.Tensor, seed: int, kind: str = "gumbel", tau: float = 0.4, offset: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked weight ``w * h`` and the number of open gates ``sum(h)`` (float64 scalar), both with STE gradients."""
    if kind not in GATE_KINDS:
        raise ValueError(f"unknown gate kind {kind!r}; known: {GATE_KINDS}")
    if tuple(logits.shape) != tuple(weight.shape):
        raise ValueError(f"logits shape {tuple(logits.shape)} != weight shape {tuple(weight.shape)}")
    return _GatedWeight.apply(logits, weight.detach(), int(seed), kind, float(tau), float(offset))
