"""Eigendecomposition of K-FAC factors, done once and reused by every edit strength.

Each factor is checked for finite values first (NaNs make LAPACK fail with a message that names
no layer), symmetrized, divided by its token count, decomposed in fp64, clamped at zero (rounding
makes tiny eigenvalues of a PSD matrix negative) and sorted descending. Eigenvector signs are fixed
(largest-magnitude entry positive) so a stored basis does not depend on the LAPACK build.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from memctl.curvature.collect import Factors
from memctl.curvature.store import Eigen, Eigenbases, factor_summary

log = logging.getLogger(__name__)

TOP_K = 5


def check_finite(mat: torch.Tensor, what: str) -> None:
    from memctl.data import DataError

    if not torch.isfinite(mat).all():
        bad = int((~torch.isfinite(mat)).sum())
        raise DataError(f"K-FAC factor {what} has {bad} non-finite entries (NaN/inf); recollect it "
                         "(check the model's dtype and the calibration windows)")


def eigh_descending(mat: torch.Tensor, what: str, tokens: int) -> tuple[Eigen, float]:
    """Eigenbasis of ``mat / tokens`` and the diagonal jitter that was needed (0 if none)."""
    check_finite(mat, what)
    m = mat.double() / max(int(tokens), 1)
    m = (m + m.T) / 2
    jitter = 0.0
    for attempt in range(4):
        try:
            values, vectors = torch.linalg.eigh(m + jitter * torch.eye(m.shape[0], dtype=m.dtype))
            break
        except torch.linalg.LinAlgError as err:
            # LAPACK can fail to converge on huge rank-deficient inputs: retry with a tiny ridge.
            scale = float(m.diagonal().abs().mean()) or 1.0
            jitter = scale * 10.0 ** (-12 + 2 * attempt)
            log.warning("eigh of %s failed (%s); retrying with jitter %.3g", what, err, jitter)
    else:
        raise ValueError(f"eigendecomposition of K-FAC factor {what} did not converge")
    values = (values - jitter).clamp(min=0).flip(0)
    vectors = vectors.flip(1)
    pivot = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[pivot, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    vectors = vectors * signs
    return Eigen(values.contiguous(), vectors.float().contiguous()), jitter


def decompose(factors: Factors) -> tuple[Eigenbases, dict[str, float]]:
    """Eigenbases of every A (once per shared input) and G; returns (bases, jitter per factor)."""
    A, G, jitter = {}, {}, {}
    for t in factors.targets:
        if t.input_key not in A:
            what = f"A of {t.input_key} (input of {t.name})"
            A[t.input_key], jitter[f"A/{t.input_key}"] = eigh_descending(factors.A[t.input_key], what, factors.tokens)
        G[t.name], jitter[f"G/{t.name}"] = eigh_descending(factors.G[t.name], f"G of {t.name}", factors.tokens)
    return Eigenbases(list(factors.targets), A, G, factors.tokens), jitter


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
