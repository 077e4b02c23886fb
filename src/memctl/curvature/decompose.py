"""Eigendecomposition of K-FAC factors, done once and reused by every edit strength.

Each factor is checked for finite values first (NaNs make LAPACK fail with a message that names
no layer), symmetrized, divided by its token count, decomposed in fp64, clamped at zero (rounding
makes tiny eigenvalues of a PSD matrix negative) and sorted descending. Eigenvector signs are fixed
(largest-magnitude entry positive) so a stored basis does not depend on the LAPACK build.

Where: on the GPU when one is visible (``device="auto"``), else the CPU; ``precision="fp32"``
decomposes in fp32 and accepts the result only when it reconstructs the factor to
:data:`FP32_RECONSTRUCTION_TOL` (relative Frobenius error, checked in fp64), falling back to fp64
otherwise. :func:`decompose_directory` works one layer file at a time (load, decompose, write,
free), so a 7B model's factors are never all in memory at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from memctl.curvature.collect import Factors
from memctl.curvature.store import Eigen, Eigenbases, factor_summary

log = logging.getLogger(__name__)

TOP_K = 5
PRECISIONS = ("fp64", "fp32")
#: Largest relative Frobenius error ||V diag(w) V^T - M|| / ||M|| accepted from an fp32 eigh.
FP32_RECONSTRUCTION_TOL = 1e-5


def decompose_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when one is visible, else the CPU; a named CUDA device must be there
    (:func:`memctl.models.resolve_device`)."""
    from memctl.models import resolve_device

    return resolve_device(name, what="kfac-decompose --device", types=("cpu", "cuda"),
                          hint="Use --device auto or cpu.")


def reconstruction_error(m: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor) -> float:
    """``||V diag(w) V^T - M||_F / ||M||_F`` in fp64 (on ``m``'s device)."""
    V = vectors.to(m.device, torch.float64)
    m = m.double()
    norm = float(m.norm())
    return float(((V * values.to(m.device, torch.float64)) @ V.T - m).norm()) / (norm or 1.0)


def _eigh(m: torch.Tensor, what: str, device: torch.device, precision: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(values, vectors, jitter) of the fp64 symmetric ``m`` (CPU), computed on ``device``."""
    x = m.to(device)
    if precision == "fp32":
        values, vectors = torch.linalg.eigh(x.float())
        err = reconstruction_error(x, values, vectors)
        if err <= FP32_RECONSTRUCTION_TOL:
            return values.double(), vectors.double(), 0.0
        log.warning("fp32 eigh of %s reconstructs it to %.2g (> %.0g): decomposing in fp64", what, err,
                    FP32_RECONSTRUCTION_TOL)
    jitter = 0.0
    for attempt in range(4):
        try:
            values, vectors = torch.linalg.eigh(x + jitter * torch.eye(x.shape[0], dtype=x.dtype, device=device))
            return values - jitter, vectors, jitter
        except torch.linalg.LinAlgError as err:
            # LAPACK can fail to converge on huge rank-deficient inputs: retry with a tiny ridge.
            scale = float(x.diagonal().abs().mean()) or 1.0
            jitter = scale * 10.0 ** (-12 + 2 * attempt)
            log.warning("eigh of %s failed (%s); retrying with jitter %.3g", what, err, jitter)
    raise ValueError(f"eigendecomposition of K-FAC factor {what} did not converge")


def check_finite(mat: torch.Tensor, what: str) -> None:
    from memctl.data import DataError

    if not torch.isfinite(mat).all():
        bad = int((~torch.isfinite(mat)).sum())
        raise DataError(f"K-FAC factor {what} has {bad} non-finite entries (NaN/inf); recollect it "
                         "(check the model's dtype and the calibration windows)")


def eigh_descending(mat: torch.Tensor, what: str, tokens: int, device: torch.device | str | None = None,
                    precision: str = "fp64") -> tuple[Eigen, float]:
    """Eigenbasis of ``mat / tokens`` and the diagonal jitter that was needed (0 if none).

    ``device`` (default: the CPU) runs the decomposition; the result is on the CPU either way.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"eigh precision {precision!r} is not one of {PRECISIONS}")
    check_finite(mat, what)
    m = mat.double() / max(int(tokens), 1)
    m = (m + m.T) / 2
    values, vectors, jitter = _eigh(m, what, torch.device(device or "cpu"), precision)
    values = values.clamp(min=0).flip(0)
    vectors = vectors.flip(1)
    pivot = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[pivot, torch.arange(vectors.shape[1], device=vectors.device)])
    signs[signs == 0] = 1
    vectors = vectors * signs
    return Eigen(values.cpu().contiguous(), vectors.float().cpu().contiguous()), jitter


def decompose(factors: Factors, device: torch.device | str | None = None,
              precision: str = "fp64") -> tuple[Eigenbases, dict[str, float]]:
    """Eigenbases of every A (once per shared input) and G; returns (bases, jitter per factor)."""
    A, G, jitter = {}, {}, {}
    for t in factors.targets:
        if t.input_key not in A:
            what = f"A of {t.input_key} (input of {t.name})"
            A[t.input_key], jitter[f"A/{t.input_key}"] = eigh_descending(factors.A[t.input_key], what, factors.tokens,
                                                                         device, precision)
        G[t.name], jitter[f"G/{t.name}"] = eigh_descending(factors.G[t.name], f"G of {t.name}", factors.tokens,
                                                           device, precision)
    return Eigenbases(list(factors.targets), A, G, factors.tokens), jitter


def factor_layers(directory: str | os.PathLike) -> list[int]:
    """The layers a factors (or eigen) directory holds, from its ``layer-NNN.safetensors`` files."""
    files = sorted(Path(directory).glob("layer-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no layer-*.safetensors files (not a K-FAC factors directory)")
    return [int(p.name[len("layer-"):-len(".safetensors")]) for p in files]


def decompose_directory(
    factors_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    device: torch.device | str | None = None,
    precision: str = "fp64",
    on_layer: Callable[[int, Factors], None] | None = None,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Decompose a factors directory into ``out_dir`` one layer file at a time: load the layer's
    factors, decompose them, write its eigenbasis file, free both. Returns the summary table
    (:func:`eigen_summary` of every layer) and the jitter per factor. ``on_layer(layer, factors)``
    is called with each loaded layer (tests check that one layer is loaded at a time)."""
    from memctl.curvature.store import load_factors, save_eigen

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables, jitter, tokens = [], {}, None
    for layer in factor_layers(factors_dir):
        factors = load_factors(factors_dir, layers=[layer])
        if tokens is not None and factors.tokens != tokens:
            raise ValueError(f"{factors_dir}: layer {layer} has {factors.tokens} tokens, the others {tokens}")
        tokens = factors.tokens
        if on_layer is not None:
            on_layer(layer, factors)
        eig, layer_jitter = decompose(factors, device, precision)
        save_eigen(eig, out_dir)
        tables.append(eigen_summary(factors, eig, layer_jitter))
        jitter.update(layer_jitter)
        del factors, eig
        if torch.device(device or "cpu").type == "cuda":
            torch.cuda.empty_cache()
    return pd.concat(tables, ignore_index=True), jitter


def _effective_rank(values: torch.Tensor) -> float:
    """exp(entropy) of the normalised spectrum: how many directions carry the energy."""
    v = values.double().numpy()
    total = v.sum()
    if total <= 0:
        return 0.0
    p = v[v > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def eigen_summary(factors: Factors, eig: Eigenbases, jitter: dict[str, float]) -> pd.DataFrame:
    """The factor summary plus top eigenvalues, effective ranks and any jitter used."""
    df = factor_summary(factors)
    extra = []
    for t in factors.targets:
        a, g = eig.A[t.input_key].values, eig.G[t.name].values
        extra.append({
            "top_lambda_A": a[:TOP_K].tolist(), "top_mu_G": g[:TOP_K].tolist(),
            "effective_rank_A": _effective_rank(a), "effective_rank_G": _effective_rank(g),
            "jitter_A": jitter.get(f"A/{t.input_key}", 0.0), "jitter_G": jitter.get(f"G/{t.name}", 0.0),
        })
    return pd.concat([df, pd.DataFrame(extra)], axis=1)
