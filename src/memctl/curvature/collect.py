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
The uniforms that pick sampled labels are a counter-based hash of ``(seed, window index, position)``
computed on the model's device (:func:`window_uniforms`): a window gets the same labels whichever
shard, batch or device it lands in, and no random state crosses the host-device boundary.

Precision of the Gram products (``curvature.data.precision``, :data:`PRECISIONS`): ``fp32`` rounds
nothing (exact up to fp32 summation); ``tf32`` rounds the product inputs to TF32 (10-bit mantissa)
and ``bf16`` to bfloat16 (7-bit mantissa), the inputs of GPU tensor cores, with every product and
the sum across batches in fp32. On CUDA they run on tensor cores (TF32 matmul / ``mm(...,
out_dtype=float32)``); on the CPU the same rounding is applied to fp32 inputs (same numbers, no
speed-up), so their error is testable anywhere. ``auto`` is ``bf16`` on CUDA, ``fp32`` elsewhere.
The activations and gradients of a bf16 model are bf16 already: ``bf16`` products lose nothing there.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from memctl.architectures import LinearTarget, module
from memctl.capture import Capture

log = logging.getLogger(__name__)

LABEL_MODES = ("sampled", "empirical")
#: Gram product precisions (``curvature.data.precision``); ``auto`` resolves by device.
PRECISIONS = ("auto", "fp32", "tf32", "bf16")


def resolve_precision(precision: str, device) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere; an explicit precision is kept."""
    if precision not in PRECISIONS:
        raise ValueError(f"curvature.data.precision: {precision!r} is not one of {PRECISIONS}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


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


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash of int64 values in [0, 2^32) (no intermediate exceeds 2^59,
    so int64 arithmetic gives the same bits on every device)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


@functools.lru_cache(maxsize=64)
def _seed_words(seed: int) -> tuple[int, int]:
    """Two 32-bit keys from sha256 of the seed (any size of seed gives independent streams)."""
    digest = hashlib.sha256(f"memctl-labels:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def window_uniforms(seed: int, windows: torch.Tensor, length: int) -> torch.Tensor:
    """Uniforms in (0, 1), shape ``(len(windows), length)``, on ``windows``' device: entry (i, p)
    depends only on ``(seed, windows[i], p)`` (global window index, position), so any split of the
    windows into shards and batches draws the same labels. 24 random bits each (a float32's
    resolution), from a counter-based hash: nothing is drawn on, or copied from, the host."""
    s0, s1 = _seed_words(seed)
    w = windows.to(torch.int64)
    key = _mix32(_mix32((w & _M32) ^ s0) ^ ((w >> 32) & _M32))
    pos = _mix32((torch.arange(length, device=w.device, dtype=torch.int64) + s1) & _M32)
    h = _mix32(key[:, None] ^ pos[None, :])
    return ((h >> 8).to(torch.float32) + 0.5) * 2.0**-24


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


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to TF32 (10 mantissa bits, to nearest, ties away from zero) as tensor
    cores round their inputs; non-finite values are kept."""
    x = x.float().contiguous()
    bits = (x.view(torch.int32) + 0x1000) & -0x2000
    return torch.where(torch.isfinite(x), bits.view(torch.float32), x)


def _gram_input(x: torch.Tensor, precision: str) -> torch.Tensor:
    """The product's input at ``precision``: what tensor cores see (rounded copies on the CPU)."""
    cuda = x.device.type == "cuda"
    if precision == "bf16":
        return x.bfloat16() if cuda else x.bfloat16().float()
    if precision == "tf32" and not cuda:
        return round_to_tf32(x)
    return x.float()  # fp32, and tf32 on CUDA (the matmul precision setting rounds there)


#: Backends (device types) without ``torch.mm(..., out_dtype=float32)`` for bf16 inputs, found on first use.
_NO_OUT_DTYPE: set[str] = set()


def _add_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with an fp32 result whatever the inputs' dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.device.type not in _NO_OUT_DTYPE:
        try:  # bf16 inputs, fp32 products and output (CUDA tensor cores)
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _NO_OUT_DTYPE.add(a.device.type)
    acc.addmm_(a.float(), b.float())  # no mm(out_dtype=...) here: fp32 product of the rounded inputs


def add_gram_(acc: torch.Tensor, x: torch.Tensor, block: int = 256, precision: str = "fp32") -> None:
    """``acc += x^T x`` on the upper block triangle only (finish with :func:`symmetrize_upper`).

    Blocks on the diagonal are computed whole; blocks below it are never touched. ``precision``
    (``fp32`` / ``tf32`` / ``bf16``) rounds the product's inputs; ``acc`` stays fp32.
    """
    x = _gram_input(x, precision)
    d = x.shape[1]
    if d <= block:
        _add_product_(acc, x.T, x)
        return
    for r0, r1 in _block_edges(d, block):
        _add_product_(acc[r0:r1, r0:], x[:, r0:r1].T, x[:, r0:])


@contextlib.contextmanager
def matmul_precision(device, precision: str):
    """On CUDA, fp32 matmuls use TF32 tensor cores for ``tf32`` and full fp32 for ``fp32`` inside
    the block (the model's own fp32 matmuls too); restored afterwards. Nothing changes elsewhere."""
    if torch.device(device).type != "cuda" or precision not in ("fp32", "tf32"):
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


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
            index = torch.arange(ids.shape[0], device=ids.device) + first_window
            u = window_uniforms(seed, index, ids.shape[1] - 1)
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
    block: int | None = None,
    progress: bool = False,
    precision: str = "auto",
    *,
    batch_loss: Callable | None = None,
    positions: slice | int | None = slice(0, -1),
    tokens_per_window: int | None = None,
) -> Factors:
    """Sum K-FAC factors over full token windows (rows of ids) in one pass for all ``targets``.

    ``window_offset`` is the global index of ``windows[0]`` (it seeds sampled labels), so shards of
    one window file collect exactly what one run over the whole file would. ``precision`` names the
    Gram products' input precision (:data:`PRECISIONS`; sums are fp32 in every case). A model
    spread over devices (``device_map``) keeps each factor on its matrix's device.

    Other models and losses (:mod:`memctl.vision`): ``batch_loss(model, batch, labels, seed,
    first_window)`` returns the summed loss of ``windows[first_window - window_offset:][:len(batch)]``
    (any tensor rows, e.g. images), ``positions`` picks the sequence positions whose inputs and
    output gradients count (``None``: all), and ``tokens_per_window`` is how many positions each row
    contributes. The defaults are the causal LM's next-token loss on rows of token ids.
    """
    if labels not in LABEL_MODES:
        raise ValueError(f"labels: {labels!r} is not one of {LABEL_MODES}")
    if batch_loss is None:
        windows = torch.as_tensor(np.asarray(windows), dtype=torch.long)
        if windows.ndim != 2 or windows.shape[1] < 2:
            raise ValueError(f"windows must be a 2-D array of at least 2 tokens per row, got {tuple(windows.shape)}")
        device = model.get_input_embeddings().weight.device
    else:
        windows = torch.as_tensor(windows)
        device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    if block is None:  # the triangle saves ~(1 - 1/n) / 2 of the products in n block rows; on a GPU
        block = 1024 if device.type == "cuda" else 256  # fewer, larger launches
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    # A per shared input (the capture hands each input key over once), G per matrix; upper triangles.
    A = {t.input_key: _zeros(t.d_in, module(model, t).weight.device) for t in targets}
    G = {t.name: _zeros(t.d_out, module(model, t).weight.device) for t in targets}
    capture = Capture(
        model, targets,
        on_input=lambda t, a: add_gram_(A[t.input_key], a, block, precision),
        on_output_grad=lambda t, g: add_gram_(G[t.name], g, block, precision),
        positions=positions,  # LM default slice(0, -1): the last position predicts nothing
    )
    try:
        from tqdm.auto import tqdm

        on_device = windows.to(device)  # once: no host-to-device copy per batch
        with capture, torch.enable_grad(), matmul_precision(device, precision):
            for start in tqdm(range(0, len(windows), batch_size), desc="K-FAC factors", unit="batch",
                              disable=not progress):
                ids = on_device[start : start + batch_size]
                (batch_loss or _batch_loss)(model, ids, labels, seed, window_offset + start).backward()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    A = {k: symmetrize_upper(v).cpu() for k, v in A.items()}
    G = {k: symmetrize_upper(v).cpu() for k, v in G.items()}
    per_window = int(windows.shape[1] - 1) if tokens_per_window is None else int(tokens_per_window)
    tokens = int(windows.shape[0] * per_window)
    return Factors(list(targets), A, G, tokens, {"labels": labels, "seed": int(seed), "precision": precision})
