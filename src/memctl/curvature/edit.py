"""Curvature edits of weight matrices, from stored eigenbases, and the SVD baseline.

Three methods (the first two from the loss-curvature paper and its public code):

- ``kfac`` (paper, projector form): per factor, keep the top eigen-directions holding a fraction
  ``strength`` (= energy) of the eigenvalue sum, then ``W' = P_G P_G^T W P_A P_A^T``.
- ``kfac_pairwise`` (public code): rotate ``C = U_G^T W U_A``, keep the pairs (i, j) with the
  largest Fisher eigenvalues ``mu_i * lambda_j`` until their sum reaches ``rho * tr(G) tr(A)``
  (``strength`` = rho), zero the rest and rotate back. Products decay in both indices, so each G
  direction keeps a prefix of A directions: a threshold bisection over the two sorted spectra finds
  the kept set in O(d log d) per step instead of sorting d_out * d_in products.
- ``svd``: keep the top ``ceil(strength * rank)`` singular values of W.

All arithmetic is fp64; the edited matrix is returned in the ``(d_out, d_in)`` view.
"""

from __future__ import annotations

import math

import torch

METHODS = ("kfac", "kfac_pairwise", "svd")
#: Defaults where an edit leaves ``strength`` unset: paper energy, public-code rho, paper SVD keep.
DEFAULT_STRENGTH = {"kfac": 0.9, "kfac_pairwise": 0.6, "svd": 0.2}
FORMS = {"kfac": "projector", "kfac_pairwise": "pairwise", "svd": "svd"}
LABELS = {"kfac": "K-FAC", "kfac_pairwise": "K-FAC (pairwise)", "svd": "SVD"}


def energy_rank(values: torch.Tensor, energy: float) -> int:
    """Fewest leading directions whose eigenvalues sum to at least ``energy`` of the total.

    ``energy >= 1`` keeps every direction (zero-eigenvalue ones too), so full energy is the identity.
    """
    n = int(values.numel())
    if energy >= 1.0:
        return n
    cum = values.double().cumsum(0)
    total = float(cum[-1]) if n else 0.0
    if total <= 0:
        return n
    return min(int(torch.searchsorted(cum, torch.tensor([energy * total], dtype=cum.dtype)).item()) + 1, n)


def projector_edit(W: torch.Tensor, UG: torch.Tensor, kG: int, UA: torch.Tensor, kA: int) -> torch.Tensor:
    PG = UG[:, :kG].double()
    PA = UA[:, :kA].double()
    return PG @ ((PG.T @ W.double()) @ PA) @ PA.T


def _prefix_counts(mu: torch.Tensor, lam_asc: torch.Tensor, t: float) -> torch.Tensor:
    """For each G direction i, how many A directions j have ``mu_i * lambda_j >= t``."""
    d_in = lam_asc.numel()
    k = torch.zeros(mu.numel(), dtype=torch.long)
    pos = mu > 0
    if pos.any():
        k[pos] = d_in - torch.searchsorted(lam_asc, t / mu[pos], right=False)
    return k


def pairwise_counts(mu: torch.Tensor, lam: torch.Tensor, rho: float, max_iter: int = 400) -> tuple[torch.Tensor, float]:
    """Per G direction i, the length k_i of the kept prefix of A directions; and the threshold.

    The kept set is the greedy one: pairs in descending ``mu_i * lambda_j`` until their sum reaches
    ``rho * sum(mu) * sum(lambda)`` (the pair that crosses is kept). Bisection (in log space) finds
    a threshold t whose set {product >= t} is exactly that set. Exactly tied products at the
    boundary cannot be split by a threshold and are kept together.
    """
    mu = mu.double().clamp(min=0)
    lam = lam.double().clamp(min=0)
    d_out, d_in = mu.numel(), lam.numel()
    if rho >= 1.0:
        return torch.full((d_out,), d_in, dtype=torch.long), 0.0
    lam_asc = lam.sort().values
    lam_cum = torch.cat([torch.zeros(1, dtype=torch.float64), lam.sort(descending=True).values.cumsum(0)])
    target = rho * float(mu.sum()) * float(lam.sum())
    if target <= 0:
        return torch.zeros(d_out, dtype=torch.long), math.inf

    def kept_sum(k: torch.Tensor) -> float:
        return float((mu * lam_cum[k]).sum())

    pos_mu, pos_lam = mu[mu > 0], lam[lam > 0]
    lo = float(pos_mu.min()) * float(pos_lam.min())  # every positive pair kept: sum = total >= target
    hi = float(pos_mu.max()) * float(pos_lam.max()) * 2.0  # nothing kept: sum = 0 < target
    k_lo, k_hi = _prefix_counts(mu, lam_asc, lo), _prefix_counts(mu, lam_asc, hi)
    for _ in range(max_iter):
        if int(k_lo.sum()) - int(k_hi.sum()) <= 1:
            break
        mid = math.exp((math.log(lo) + math.log(hi)) / 2)
        if not lo < mid < hi:  # adjacent floats: the boundary is a tie
            break
        k_mid = _prefix_counts(mu, lam_asc, mid)
        if kept_sum(k_mid) >= target:
            lo, k_lo = mid, k_mid
        else:
            hi, k_hi = mid, k_mid
    return k_lo, lo


def prefix_mask(counts: torch.Tensor, d_in: int) -> torch.Tensor:
    return torch.arange(d_in)[None, :] < counts[:, None]


def pairwise_edit(W, UG, mu, UA, lam, rho: float) -> tuple[torch.Tensor, dict]:
    counts, threshold = pairwise_counts(mu, lam, rho)
    UG, UA = UG.double(), UA.double()
    C = UG.T @ W.double() @ UA
    mask = prefix_mask(counts, UA.shape[1])
    W_hat = UG @ (C * mask) @ UA.T
    mu64, lam64 = mu.double().clamp(min=0), lam.double().clamp(min=0)
    kept = float((mu64[:, None] * lam64[None, :] * mask).sum())
    total = float(mu64.sum() * lam64.sum())
    return W_hat, {
        "kept_pairs": int(counts.sum()), "pairs": int(mask.numel()), "threshold": threshold,
        "kept_curvature": kept / total if total > 0 else 1.0,
    }


def svd_edit(W: torch.Tensor, keep: float) -> tuple[torch.Tensor, dict]:
    U, S, Vh = torch.linalg.svd(W.detach().double(), full_matrices=False)
    r = S.numel()
    k = r if keep >= 1.0 else min(r, max(1, math.ceil(keep * r)))
    W_hat = (U[:, :k] * S[:k]) @ Vh[:k]
    energy = float((S[:k] ** 2).sum() / (S**2).sum()) if float(S.sum()) > 0 else 1.0
    return W_hat, {"kept_singular_values": k, "rank": r, "kept_frobenius_energy": energy}


def edit_matrix(method: str, W: torch.Tensor, strength: float, eigA=None, eigG=None) -> tuple[torch.Tensor, dict]:
    """The edited ``(d_out, d_in)`` matrix (fp64) and statistics of what was kept."""
    if method == "svd":
        return svd_edit(W, strength)
    if eigA is None or eigG is None:
        raise ValueError(f"method {method!r} needs the eigenbases of A and G")
    if method == "kfac":
        kA, kG = energy_rank(eigA.values, strength), energy_rank(eigG.values, strength)
        return projector_edit(W, eigG.vectors, kG, eigA.vectors, kA), {
            "kept_A": kA, "d_in": int(eigA.values.numel()), "kept_G": kG, "d_out": int(eigG.values.numel()),
        }
    if method == "kfac_pairwise":
        return pairwise_edit(W, eigG.vectors, eigG.values, eigA.vectors, eigA.values, strength)
    raise ValueError(f"unknown edit method {method!r}; known: {METHODS}")
