"""Curvature edits of weight matrices, from stored eigenbases, and the SVD baseline.

The Fisher block of ``W`` (``d_out x d_in``) is ``G (x) A``: eigenvalues ``mu_i * lambda_j`` (``mu``
of G, ``lambda`` of A, both sorted descending) with eigen-directions ``u_i v_j^T``. Four methods
(the first three from the loss-curvature paper and its public code):

- ``kfac`` (paper §4, projector form): take the Kronecker eigenpairs in descending
  ``mu_i * lambda_j`` until their sum reaches a share ``strength`` of ``tr(G) tr(A)`` (the fewest
  pairs that do), then ``W' = P_G P_G^T W P_A P_A^T`` with ``P_G = U_G[:, :kG]``,
  ``P_A = U_A[:, :kA]``, ``kG`` / ``kA`` = 1 + the largest G / A index among the kept pairs.
- ``kfac_factor`` (an earlier reading, kept for comparison): per factor, keep the fewest top
  eigen-directions holding a share ``strength`` of that factor's eigenvalue sum, then the same
  projection; it keeps only about ``strength**2`` of the product energy on power-law spectra.
- ``kfac_pairwise`` (public code): rotate ``C = U_G^T W U_A``, keep the pairs (i, j) with the
  largest Fisher eigenvalues ``mu_i * lambda_j`` until their sum reaches ``rho * tr(G) tr(A)``
  (``strength`` = rho), zero the rest and rotate back.
- ``svd``: keep the top ``ceil(strength * rank)`` singular values of W.

A set {pairs with ``mu_i * lambda_j >= t``} is a staircase: each G direction keeps a prefix of the A
directions, shorter for smaller ``mu_i``. ``kfac`` and ``kfac_pairwise`` find their pairs by a
threshold bisection over the two sorted spectra, O(d_out log d_in) per step, instead of sorting
``d_out * d_in`` products.

All arithmetic is fp64; the edited matrix is returned in the ``(d_out, d_in)`` view.
"""

from __future__ import annotations

import math

import torch

# the edit families' names, defaults and labels live with the settings (torch-free: the planner reads them)
from memctl.curvature.settings import METHODS


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
    # every positive pair kept: sum = total >= target. Half the smallest product, not the product
    # itself: the count tests lambda_j >= t / mu_i, and rounding of t / mu_i can drop that pair.
    lo = float(pos_mu.min()) * float(pos_lam.min()) / 2.0
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


def _first_at_most(mu: torch.Tensor, lam: torch.Tensor, rows: torch.Tensor, hi: torch.Tensor, p: float) -> torch.Tensor:
    """Per row i of ``rows``: the smallest j <= hi_i with ``mu_i * lam_j <= p``, given that
    ``mu_i * lam[hi_i] <= p`` (products fall with j). Bisection on the exact fp64 products."""
    lo, hi = torch.zeros_like(hi), hi.clone()
    m = mu[rows]
    while bool((lo < hi).any()):
        mid = (lo + hi) // 2
        at_most = m * lam[mid] <= p
        hi = torch.where(at_most, mid, hi)
        lo = torch.where(at_most, lo, mid + 1)
    return lo


def product_energy_counts(mu: torch.Tensor, lam: torch.Tensor, energy: float) -> tuple[torch.Tensor, float]:
    """Per G direction i, how many leading A directions the paper's product-energy rule keeps; and
    the smallest kept product.

    The kept pairs are the shortest prefix of all pairs sorted by ``mu_i * lambda_j`` (descending)
    whose sum reaches ``energy * sum(mu) * sum(lambda)``. Exactly tied products at the boundary are
    split: only as many as needed are kept, taken in row-major order (G index, then A index) as a
    stable sort of the flattened products would. ``energy >= 1`` (or an all-zero spectrum) keeps
    every pair, zero products too. Both spectra must be sorted descending. Nothing of size
    ``d_out * d_in`` is built: :func:`pairwise_counts` finds the staircase {product >= t} holding
    the crossing pair, then the boundary's ties are counted by bisection on exact products.
    """
    mu = mu.double().clamp(min=0)
    lam = lam.double().clamp(min=0)
    d_out, d_in = mu.numel(), lam.numel()
    if bool((mu[1:] > mu[:-1]).any()) or bool((lam[1:] > lam[:-1]).any()):
        raise ValueError("product-energy selection needs eigenvalues sorted descending")
    total = float(mu.sum()) * float(lam.sum())
    if energy >= 1.0 or total <= 0:
        return torch.full((d_out,), d_in, dtype=torch.long), 0.0
    target = energy * total
    lam_cum = torch.cat([torch.zeros(1, dtype=torch.float64), lam.cumsum(0)])

    def kept_sum(k: torch.Tensor) -> float:
        return float((mu * lam_cum[k]).sum())

    counts, _ = pairwise_counts(mu, lam, energy)  # {product >= t}: sum >= target, ties kept together
    while True:
        rows = torch.nonzero(counts > 0).flatten()
        last = mu[rows] * lam[counts[rows] - 1]  # each row's smallest kept product
        p = float(last.min())
        # the threshold test divides (lambda_j >= t / mu_i); make the set exactly {product >= p}
        grow = torch.nonzero(counts < d_in).flatten()
        grow = grow[mu[grow] * lam[counts[grow]] >= p]
        if grow.numel():
            counts[grow] += 1
            continue
        tie_rows = rows[last == p]
        first = _first_at_most(mu, lam, tie_rows, counts[tie_rows] - 1, p)
        strict = counts.clone()
        strict[tie_rows] = first  # now {product > p}
        above = kept_sum(strict)
        if above >= target:  # p is below the crossing value (a tie-break of the bisection): drop it
            counts = strict
            continue
        ties = counts[tie_rows] - first  # per tie row, its run of tied A indices
        n_ties = int(ties.sum())
        need = min(max(1, math.ceil((target - above) / p)), n_ties)  # fewest ties that reach the target
        while need > 1 and above + (need - 1) * p >= target:
            need -= 1
        while need < n_ties and above + need * p < target:
            need += 1
        before = ties.cumsum(0) - ties  # row-major: earlier G directions take their ties first
        strict[tie_rows] += (need - before).clamp(min=0).minimum(ties)
        return strict, p


def product_energy_edit(W, UG, mu, UA, lam, energy: float) -> tuple[torch.Tensor, dict]:
    """The paper's projector edit: pairs chosen by product energy, then ``P_G W P_A`` with the
    leading G and A directions up to the largest index any kept pair uses."""
    counts, threshold = product_energy_counts(mu, lam, energy)
    used = torch.nonzero(counts > 0).flatten()
    kG = int(used.max()) + 1 if used.numel() else 0
    kA = int(counts.max()) if counts.numel() else 0
    mu64, lam64 = mu.double().clamp(min=0), lam.double().clamp(min=0)
    total = float(mu64.sum()) * float(lam64.sum())
    lam_cum = torch.cat([torch.zeros(1, dtype=torch.float64), lam64.cumsum(0)])
    kept = float((mu64 * lam_cum[counts]).sum())
    return projector_edit(W, UG, kG, UA, kA), {
        "selection": "product", "kept_A": kA, "d_in": int(lam.numel()), "kept_G": kG, "d_out": int(mu.numel()),
        "kept_pairs": int(counts.sum()), "pairs": int(mu.numel() * lam.numel()), "threshold": threshold,
        "kept_curvature": kept / total if total > 0 else 1.0,
        "projector_curvature": _rectangle_share(mu64, kG, lam64, kA),
    }


def _rectangle_share(mu: torch.Tensor, kG: int, lam: torch.Tensor, kA: int) -> float:
    """Share of ``tr(G) tr(A)`` in the pairs that ``P_G W P_A`` keeps: all (i < kG, j < kA)."""
    total = float(mu.sum()) * float(lam.sum())
    return float(mu[:kG].sum()) * float(lam[:kA].sum()) / total if total > 0 else 1.0


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
        return product_energy_edit(W, eigG.vectors, eigG.values, eigA.vectors, eigA.values, strength)
    if method == "kfac_factor":
        kA, kG = energy_rank(eigA.values, strength), energy_rank(eigG.values, strength)
        mu, lam = eigG.values.double().clamp(min=0), eigA.values.double().clamp(min=0)
        return projector_edit(W, eigG.vectors, kG, eigA.vectors, kA), {
            "selection": "factor", "kept_A": kA, "d_in": int(eigA.values.numel()), "kept_G": kG,
            "d_out": int(eigG.values.numel()), "projector_curvature": _rectangle_share(mu, kG, lam, kA),
        }
    if method == "kfac_pairwise":
        return pairwise_edit(W, eigG.vectors, eigG.values, eigA.vectors, eigA.values, strength)
    raise ValueError(f"unknown edit method {method!r}; known: {METHODS}")


def edit_targets(model, spec, eig=None):
    """The matrices an edit spec touches: collected ones for K-FAC, any of the groups for SVD."""
    from memctl import architectures as arch
    from memctl.config import ConfigError

    if spec["method"] == "svd":
        try:
            return arch.linear_targets(model, groups=spec["groups"], layers=spec["layers"], roles=spec["roles"])
        except ValueError as err:
            raise ConfigError(f"edit {spec}: {err}") from err
    chosen = [t for t in eig.targets if t.layer in spec["layers"] and (spec["roles"] is None or t.role in spec["roles"])]
    if not chosen:
        raise ConfigError(f"edit {spec}: no collected matrix matches layers {spec['layers']} / roles {spec['roles']}")
    return chosen


def make_edit(model, spec, eig=None):
    """One edit of ``model`` (a validated spec, memctl.curvature.settings; ``eig`` the eigenbases for
    K-FAC): (delta replace dict in storage layout, per-matrix stats). The language-model and vision
    tracks both build their deltas here."""
    from memctl import architectures as arch

    replace, stats = {}, []
    for t in edit_targets(model, spec, eig):
        W = arch.weight(model, t).detach().to("cpu", dtype=torch.float64)
        eigA = eig.A[t.input_key] if eig is not None else None
        eigG = eig.G[t.name] if eig is not None else None
        W_hat, info = edit_matrix(spec["method"], W, float(spec["strength"]), eigA, eigG)
        param = arch.module(model, t).weight
        replace[t.param_name] = arch.to_storage(t, W_hat).to(param.dtype)
        change = float((W_hat - W).norm() / W.norm()) if float(W.norm()) > 0 else 0.0
        stats.append({"module": t.name, "short": t.short, "relative_change": change, **info})
    return replace, stats
