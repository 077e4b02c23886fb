"""K-FAC factors in one data pass: A = sum a a^T and G = sum g g^T for every target matrix.

For a matrix ``y = W a`` (uniform ``(d_out, d_in)`` view, see :mod:`memctl.architectures`), A sums
the outer products of its input activations and G those of the loss gradient w.r.t. its output,
over the same token positions: every position of a window that predicts a next token (the last
position predicts nothing and is left out of both). The loss is the per-token cross-entropy with
**sum** reduction (mean reduction would rescale G by 1/batch^2). Labels are sampled from the model's
own predictive distribution (true Fisher, unsupervised) or, optionally, the real next tokens.

Why it is cheap:

- parameters are frozen and only the targets' inputs are made to require grad (by
  :class:`memctl.capture.Capture`, whose hooks hand over inputs and output gradients), so backward
  computes activation gradients only (no weight gradients) and stops at the lowest target;
- matrices that read the same tensor (q/k/v, gate/up) share one A, computed once;
- covariances accumulate only the upper triangle in column blocks (a blocked symmetric rank-k
  update), about 5/8 of a full ``X^T X`` product for 1024-wide factors;
- labels come from inverse-CDF sampling (softmax, cumsum, searchsorted), ~10x faster than
  ``torch.distributions.Categorical``.

Sums are kept in fp32 with token counts, so collections over disjoint windows merge by addition.
The uniforms that pick sampled labels are drawn per window from a generator seeded from
``(seed, window index)``: a window gets the same labels whichever shard or batch it lands in.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from memctl.architectures import LinearTarget
from memctl.capture import Capture

log = logging.getLogger(__name__)

LABEL_MODES = ("sampled", "empirical")


@dataclass
class Factors:
    """Summed K-FAC factors of one collection (fp32, symmetric) and the token count they cover."""

    targets: list[LinearTarget]
    A: dict[str, torch.Tensor]  #: input_key -> (d_in, d_in)
    G: dict[str, torch.Tensor]  #: target name -> (d_out, d_out)
    tokens: int
    meta: dict = field(default_factory=dict)

    def merged(self, other: Factors) -> Factors:
        """Factors of the union of two disjoint collections (sums and counts add)."""
        if [t.name for t in self.targets] != [t.name for t in other.targets]:
            raise ValueError("cannot merge factors of different modules")
        return Factors(
            self.targets,
            {k: self.A[k] + other.A[k] for k in self.A},
            {k: self.G[k] + other.G[k] for k in self.G},
            self.tokens + other.tokens,
            dict(self.meta),
        )


def window_generator(seed: int, window: int) -> torch.Generator:
    """The CPU generator whose uniforms pick window ``window``'s sampled labels.

    Its seed is 32 bits of sha256("seed:window"): torch's CPU generator only uses the low 32 bits of
    a seed, so packing (seed, window) into one integer would repeat streams across seeds.
    """
    digest = hashlib.sha256(f"{int(seed)}:{int(window)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))


def sample_labels(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from softmax(logits) along the last axis, one uniform per row.

    Picks the first index whose cumulative probability reaches ``u * total``; scaling by the total
    keeps rounding in the cumulative sum from ever running past the vocabulary.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = (uniforms.to(cdf.device, cdf.dtype) * cdf[..., -1]).unsqueeze(-1)
    labels = torch.searchsorted(cdf, target, right=False).squeeze(-1)
    return labels.clamp_(max=logits.shape[-1] - 1)


def _block_edges(d: int, block: int) -> list[tuple[int, int]]:
    n = max(1, math.ceil(d / block))
    size = math.ceil(d / n)
    return [(i, min(i + size, d)) for i in range(0, d, size)]


def add_gram_(acc: torch.Tensor, x: torch.Tensor, block: int = 256) -> None:
    """``acc += x^T x`` on the upper block triangle only (finish with :func:`symmetrize_upper`).

    Blocks on the diagonal are computed whole; blocks below it are never touched.
    """
    d = x.shape[1]
    if d <= block:
        acc.addmm_(x.T, x)
        return
    for r0, r1 in _block_edges(d, block):
        acc[r0:r1, r0:].addmm_(x[:, r0:r1].T, x[:, r0:])


def symmetrize_upper(acc: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from an upper-triangle accumulator."""
    upper = torch.triu(acc)
    return upper + torch.triu(acc, diagonal=1).T


def _zeros(n: int, device) -> torch.Tensor:
    return torch.zeros(n, n, dtype=torch.float32, device=device)


def _batch_loss(model, ids: torch.Tensor, labels: str, seed: int, first_window: int) -> torch.Tensor:
    """Summed next-token cross-entropy of a batch of windows, against sampled or real labels."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    flat = logits.reshape(-1, logits.shape[-1])
    if labels == "empirical":
        y = ids[:, 1:].reshape(-1)
    else:
        with torch.no_grad():
            u = torch.stack([
                torch.rand(ids.shape[1] - 1, generator=window_generator(seed, first_window + i))
                for i in range(ids.shape[0])
            ])
            y = sample_labels(flat.detach(), u.reshape(-1))
    return torch.nn.functional.cross_entropy(flat.float(), y, reduction="sum")


def collect_factors(
    model,
    windows: np.ndarray | torch.Tensor,
    targets: Sequence[LinearTarget],
    labels: str = "sampled",
    seed: int = 0,
    batch_size: int = 8,
    window_offset: int = 0,
    block: int = 256,
    progress: bool = False,
) -> Factors:
    """Sum K-FAC factors over full token windows (rows of ids) in one pass for all ``targets``.

    ``window_offset`` is the global index of ``windows[0]`` (it seeds sampled labels), so shards of
    one window file collect exactly what one run over the whole file would.
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"labels: {labels!r} is not one of {LABEL_MODES}")
    windows = torch.as_tensor(np.asarray(windows), dtype=torch.long)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a 2-D array of at least 2 tokens per row, got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    # A per shared input (the capture hands each input key over once), G per matrix; upper triangles.
    A = {t.input_key: _zeros(t.d_in, device) for t in targets}
    G = {t.name: _zeros(t.d_out, device) for t in targets}
    capture = Capture(
        model, targets,
        on_input=lambda t, a: add_gram_(A[t.input_key], a.float(), block),
        on_output_grad=lambda t, g: add_gram_(G[t.name], g.float(), block),
        positions=slice(0, -1),  # the last position predicts nothing
    )
    try:
        from tqdm.auto import tqdm

        with capture, torch.enable_grad():
            for start in tqdm(range(0, len(windows), batch_size), desc="K-FAC factors", unit="batch",
                              disable=not progress):
                ids = windows[start : start + batch_size].to(device)
                _batch_loss(model, ids, labels, seed, window_offset + start).backward()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    A = {k: symmetrize_upper(v).cpu() for k, v in A.items()}
    G = {k: symmetrize_upper(v).cpu() for k, v in G.items()}
    tokens = int(windows.shape[0] * (windows.shape[1] - 1))
    return Factors(list(targets), A, G, tokens, {"labels": labels, "seed": int(seed)})
