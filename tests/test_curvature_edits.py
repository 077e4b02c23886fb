"""Curvature edits checked against exhaustive computations: sorted products (pairwise and product-
energy selection), explicit projectors, Eckart-Young for SVD, and every Fisher eigenpair enumerated
for the spectrum bands."""

import json
import math

import numpy as np
import pytest
import torch

from memctl.curvature.edit import (
    edit_matrix,
    energy_rank,
    pairwise_counts,
    pairwise_edit,
    prefix_mask,
    product_energy_counts,
    projector_edit,
    svd_edit,
)
from memctl.curvature.spectrum import band_scores, kfac_band_weights, svd_band_weights
from memctl.curvature.store import Eigen


def _spectrum(rng, n, kind):
    if kind == "lognormal":
        v = np.exp(rng.normal(0, 2, n))
    elif kind == "power":
        v = (np.arange(1, n + 1) ** -1.5) * rng.uniform(0.5, 1.5, n)
    else:  # rank-deficient: trailing zeros, as clamped eigenvalues of a low-rank factor
        v = np.exp(rng.normal(0, 1, n))
        v[n // 2 :] = 0
    return torch.from_numpy(np.sort(v)[::-1].copy())


def _greedy_mask(mu, lam, rho):
    """Exhaustive reference: sort all products, keep until the kept sum reaches rho * total."""
    prod = (mu[:, None] * lam[None, :]).numpy()
    order = np.argsort(-prod.ravel(), kind="stable")
    cum = np.cumsum(prod.ravel()[order])
    k = int(np.searchsorted(cum, rho * prod.sum(), side="left")) + 1
    mask = np.zeros(prod.size, dtype=bool)
    mask[order[:k]] = True
    return torch.from_numpy(mask.reshape(prod.shape))


@pytest.mark.parametrize("kind", ["lognormal", "power", "deficient"])
@pytest.mark.parametrize("seed", range(4))
def test_bisection_keeps_the_same_pairs_as_an_exhaustive_sort(kind, seed):
    rng = np.random.default_rng(seed)
    mu, lam = _spectrum(rng, 37, kind), _spectrum(rng, 23, "lognormal" if kind == "deficient" else kind)
    for rho in (0.05, 0.3, 0.6, 0.9, 0.999):
        counts, _ = pairwise_counts(mu, lam, rho)
        mask = prefix_mask(counts, lam.numel())
        ref = _greedy_mask(mu, lam, rho)
        assert torch.equal(mask, ref), (kind, seed, rho, int(mask.sum()), int(ref.sum()))


def test_pairwise_full_rho_keeps_everything_and_each_row_is_a_prefix():
    rng = np.random.default_rng(1)
    mu, lam = _spectrum(rng, 9, "deficient"), _spectrum(rng, 5, "lognormal")
    counts, _ = pairwise_counts(mu, lam, 1.0)
    assert counts.tolist() == [5] * 9
    counts, _ = pairwise_counts(mu, lam, 0.7)
    assert all(a >= b for a, b in zip(counts.tolist(), counts.tolist()[1:]))


def _basis(rng, d):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return torch.from_numpy(q)


def test_projector_edit_with_full_energy_returns_W():
    rng = np.random.default_rng(2)
    W = torch.from_numpy(rng.normal(size=(6, 4)))
    eigG = Eigen(_spectrum(rng, 6, "deficient"), _basis(rng, 6).float())
    eigA = Eigen(_spectrum(rng, 4, "power"), _basis(rng, 4).float())
    for method in ("kfac", "kfac_factor"):
        W_hat, info = edit_matrix(method, W, 1.0, eigA, eigG)
        assert info["kept_A"] == 4 and info["kept_G"] == 6  # zero-eigenvalue directions kept too
        torch.testing.assert_close(W_hat, W, rtol=1e-6, atol=1e-6)
    assert info["projector_curvature"] == pytest.approx(1.0)
    W_hat, _ = edit_matrix("kfac_pairwise", W, 1.0, eigA, eigG)
    torch.testing.assert_close(W_hat, W, rtol=1e-6, atol=1e-6)
    W_hat, info = edit_matrix("svd", W, 1.0)
    torch.testing.assert_close(W_hat, W)
    assert info["kept_singular_values"] == 4


def test_per_factor_projector_edit_equals_explicit_projectors():
    rng = np.random.default_rng(3)
    W = torch.from_numpy(rng.normal(size=(8, 5)))
    UG, UA = _basis(rng, 8), _basis(rng, 5)
    mu, lam = _spectrum(rng, 8, "power"), _spectrum(rng, 5, "power")
    for energy in (0.3, 0.8, 0.95):
        # fewest directions whose share of the eigenvalue sum reaches the energy, by a plain loop
        def k_of(v, energy=energy):
            total, run = float(v.sum()), 0.0
            for k, x in enumerate(v.tolist(), 1):
                run += x
                if run >= energy * total:
                    return k
        kG, kA = k_of(mu), k_of(lam)
        assert (energy_rank(mu, energy), energy_rank(lam, energy)) == (kG, kA)
        PG = sum(torch.outer(UG[:, i], UG[:, i]) for i in range(kG))
        PA = sum(torch.outer(UA[:, j], UA[:, j]) for j in range(kA))
        torch.testing.assert_close(projector_edit(W, UG, kG, UA, kA), PG @ W @ PA)
        W_hat, info = edit_matrix("kfac_factor", W, energy, Eigen(lam, UA), Eigen(mu, UG))
        torch.testing.assert_close(W_hat, PG @ W @ PA)
        assert (info["kept_G"], info["kept_A"], info["selection"]) == (kG, kA, "factor")


# ------------------------------------------------------------ product-energy projector (kfac)


def _product_spectrum(rng, n, kind):
    if kind == "flat":  # every product tied: the boundary splits a tie block
        return torch.full((n,), 0.25, dtype=torch.float64)
    if kind == "nearflat":
        return torch.from_numpy(np.sort(rng.uniform(0.9, 1.1, n))[::-1].copy())
    return _spectrum(rng, n, kind)


def _brute_product_selection(mu, lam, strength):
    """Exhaustive reference: sort all d_out * d_in products (stable, row-major among ties), take the
    shortest prefix whose sum reaches strength * tr(G) tr(A); strength 1 keeps every pair."""
    prod = (mu[:, None] * lam[None, :]).numpy()
    mask = np.ones(prod.size, dtype=bool)
    if strength < 1.0:
        order = np.argsort(-prod.ravel(), kind="stable")
        cum = np.cumsum(prod.ravel()[order])
        k = int(np.searchsorted(cum, strength * (float(mu.sum()) * float(lam.sum())), side="left")) + 1
        mask[:] = False
        mask[order[:k]] = True
    mask = mask.reshape(prod.shape)
    rows, cols = np.nonzero(mask)
    return torch.from_numpy(mask), int(rows.max()) + 1, int(cols.max()) + 1


PRODUCT_CASES = [((1, 1), "power", "power"), ((1, 7), "lognormal", "power"), ((9, 1), "power", "nearflat"),
                 ((6, 5), "power", "power"), ((13, 29), "power", "lognormal"), ((37, 23), "deficient", "power"),
                 ((8, 8), "flat", "flat"), ((5, 12), "flat", "flat"), ((17, 11), "nearflat", "nearflat"),
                 ((24, 40), "nearflat", "power")]


@pytest.mark.parametrize("shape,kind_g,kind_a", PRODUCT_CASES)
@pytest.mark.parametrize("seed", range(3))
def test_product_energy_selection_matches_brute_force(shape, kind_g, kind_a, seed):
    rng = np.random.default_rng(100 + seed)
    (d_out, d_in) = shape
    mu, lam = _product_spectrum(rng, d_out, kind_g), _product_spectrum(rng, d_in, kind_a)
    W = torch.from_numpy(rng.normal(size=(d_out, d_in)))
    UG, UA = _basis(rng, d_out), _basis(rng, d_in)
    total = float(mu.sum() * lam.sum())
    for strength in (0.05, 0.3, 0.5, 0.8, 0.95, 0.999, 1.0):
        ref, kG, kA = _brute_product_selection(mu, lam, strength)
        counts, _ = product_energy_counts(mu, lam, strength)
        assert torch.equal(prefix_mask(counts, d_in), ref), (shape, kind_g, kind_a, seed, strength)
        W_hat, info = edit_matrix("kfac", W, strength, Eigen(lam, UA), Eigen(mu, UG))
        assert (info["kept_G"], info["kept_A"]) == (kG, kA)
        assert info["kept_pairs"] == int(ref.sum()) and info["selection"] == "product"
        json.dumps(info, allow_nan=False)  # stored as is in the delta's metadata (curvature-edit's stats)
        kept = float((mu[:, None] * lam[None, :] * ref).sum()) / total
        assert info["kept_curvature"] == pytest.approx(kept, rel=1e-12) and kept >= strength * (1 - 1e-12)
        # the projection by hand: P_G = sum of u_i u_i^T over i < kG, P_A likewise
        PG = sum(torch.outer(UG[:, i], UG[:, i]) for i in range(kG))
        PA = sum(torch.outer(UA[:, j], UA[:, j]) for j in range(kA))
        torch.testing.assert_close(W_hat, PG @ W @ PA, rtol=1e-9, atol=1e-12)
        rect = float(mu[:kG].sum() * lam[:kA].sum()) / total
        assert info["projector_curvature"] == pytest.approx(rect, rel=1e-12) and rect >= kept * (1 - 1e-12)


def test_product_energy_ties_keep_only_the_pairs_needed():
    # 4 x 4 products all equal: 0.5 of the energy is 8 pairs, the first two G rows (row-major)
    mu = lam = torch.ones(4, dtype=torch.float64)
    counts, p = product_energy_counts(mu, lam, 0.5)
    assert counts.tolist() == [4, 4, 0, 0] and p == 1.0
    assert product_energy_counts(mu, lam, 0.3)[0].tolist() == [4, 1, 0, 0]  # ceil(0.3 * 16) = 5 pairs
    # one G direction tied at the boundary with another: mu * lam = 2 for (0, 1) and (1, 0)
    counts, _ = product_energy_counts(torch.tensor([2.0, 1.0], dtype=torch.float64), torch.tensor([2.0, 1.0], dtype=torch.float64), 5 / 9)
    assert counts.tolist() == [2, 0]  # 4 + 2 = 6 >= 5 (of 9): the tie (1, 0) is not needed
    with pytest.raises(ValueError, match="sorted descending"):
        product_energy_counts(torch.tensor([1.0, 2.0]), lam, 0.5)


def test_product_energy_on_large_spectra_is_minimal_without_the_full_product_matrix():
    d_out, d_in = 3000, 5000
    mu = torch.arange(1, d_out + 1, dtype=torch.float64) ** -1.2
    lam = torch.arange(1, d_in + 1, dtype=torch.float64) ** -1.0
    for strength in (0.5, 0.8, 0.9):
        counts, p = product_energy_counts(mu, lam, strength)
        lam_cum = torch.cat([torch.zeros(1, dtype=torch.float64), lam.cumsum(0)])
        kept, target = float((mu * lam_cum[counts]).sum()), strength * float(mu.sum()) * float(lam.sum())
        assert kept >= target > kept - p  # reaches the target; without its smallest pair it would not
        rows = counts > 0
        assert bool((mu[rows] * lam[counts[rows] - 1] >= p).all())  # every kept product >= p
        nxt = counts < d_in
        assert bool((mu[nxt] * lam[counts[nxt]] <= p).all())  # every dropped product <= p
        assert bool((counts[1:] <= counts[:-1]).all())  # a staircase


def test_product_energy_keeps_the_strength_share_and_per_factor_keeps_less():
    rng = np.random.default_rng(7)
    d_out, d_in, strength = 48, 32, 0.8
    # i^-1.5 spectra (at i^-1 the product rule's kG, kA reach d_out, d_in here: W is kept whole)
    mu = torch.arange(1, d_out + 1, dtype=torch.float64) ** -1.5
    lam = torch.arange(1, d_in + 1, dtype=torch.float64) ** -1.5
    UG, UA = _basis(rng, d_out), _basis(rng, d_in)
    W = torch.from_numpy(rng.normal(size=(d_out, d_in)))
    C = UG.T @ W @ UA  # W's coordinates on the Kronecker eigen-directions u_i v_j^T
    fisher = mu[:, None] * lam[None, :]

    def kept_share(W_hat):  # product energy of the eigen-directions the edit leaves in place
        kept = ((UG.T @ W_hat @ UA) - C).abs() < 1e-9
        return float((fisher * kept).sum() / fisher.sum())

    W_prod, info_prod = edit_matrix("kfac", W, strength, Eigen(lam, UA), Eigen(mu, UG))
    W_fac, info_fac = edit_matrix("kfac_factor", W, strength, Eigen(lam, UA), Eigen(mu, UG))
    assert kept_share(W_prod) >= strength and info_prod["kept_curvature"] >= strength
    assert (info_prod["kept_G"], info_prod["kept_A"]) == (23, 24)  # a real edit, not the identity
    assert kept_share(W_prod) == pytest.approx(info_prod["projector_curvature"])
    assert kept_share(W_fac) == pytest.approx(info_fac["projector_curvature"])
    assert kept_share(W_fac) < strength  # ~ strength**2: each factor keeps ~ strength of its energy
    assert kept_share(W_fac) == pytest.approx(
        float(mu[: info_fac["kept_G"]].sum() / mu.sum() * lam[: info_fac["kept_A"]].sum() / lam.sum()))


def test_pairwise_edit_zeroes_exactly_the_dropped_fisher_coordinates():
    rng = np.random.default_rng(4)
    W = torch.from_numpy(rng.normal(size=(7, 6)))
    UG, UA = _basis(rng, 7), _basis(rng, 6)
    mu, lam = _spectrum(rng, 7, "lognormal"), _spectrum(rng, 6, "lognormal")
    W_hat, info = pairwise_edit(W, UG, mu, UA, lam, 0.6)
    mask = _greedy_mask(mu, lam, 0.6)
    # coordinates of W along Z_ij = u_i v_j^T: <Z_ij, W> = u_i^T W v_j
    coords = torch.tensor([[float(UG[:, i] @ W @ UA[:, j]) for j in range(6)] for i in range(7)])
    new = torch.tensor([[float(UG[:, i] @ W_hat @ UA[:, j]) for j in range(6)] for i in range(7)])
    torch.testing.assert_close(new, torch.where(mask, coords, torch.zeros(())), atol=1e-10, rtol=0)
    assert info["kept_pairs"] == int(mask.sum())
    kept = float((mu[:, None] * lam[None, :] * mask).sum() / (mu.sum() * lam.sum()))
    assert info["kept_curvature"] == pytest.approx(kept) and kept >= 0.6


def test_svd_edit_is_the_best_rank_k_approximation():
    rng = np.random.default_rng(5)
    W = torch.from_numpy(rng.normal(size=(10, 6)))
    s = np.linalg.svd(W.numpy(), compute_uv=False)
    for keep, k in ((0.01, 1), (0.34, 3), (0.5, 3), (1.0, 6)):
        W_hat, info = svd_edit(W, keep)
        assert info["kept_singular_values"] == k == math.ceil(keep * 6)
        s_hat = np.linalg.svd(W_hat.numpy(), compute_uv=False)
        np.testing.assert_allclose(s_hat[:k], s[:k], rtol=1e-10)
        np.testing.assert_allclose(s_hat[k:], 0, atol=1e-10)
        # Eckart-Young: the error is the energy of the dropped singular values
        assert float((W - W_hat).norm()) == pytest.approx(float(np.sqrt((s[k:] ** 2).sum())), abs=1e-9)


def test_energy_rank_edge_cases():
    v = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    assert [energy_rank(v, e) for e in (0.1, 0.4, 0.41, 0.7, 0.9, 0.999, 1.0)] == [1, 1, 2, 2, 3, 4, 5]


@pytest.mark.parametrize("seed", range(3))
def test_band_means_equal_every_eigenpair_enumerated(seed):
    rng = np.random.default_rng(seed)
    d_out, d_in, n_states = 6, 5, 9
    mu, lam = _spectrum(rng, d_out, "lognormal"), _spectrum(rng, d_in, "lognormal")
    UG, UA = _basis(rng, d_out), _basis(rng, d_in)
    x = torch.from_numpy(rng.normal(size=(n_states, d_in)))
    edges = (0.1, 0.25, 0.5)
    # brute force: every Z_ij = u_i v_j^T as a matrix, ranked by mu_i * lambda_j
    pairs = sorted(((float(mu[i] * lam[j]), i, j) for i in range(d_out) for j in range(d_in)), reverse=True)
    cuts = [0, *[round(q * len(pairs)) for q in edges], len(pairs)]
    ref = torch.zeros(n_states, 4, dtype=torch.float64)
    for b, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        for _, i, j in pairs[lo:hi]:
            Z = torch.outer(UG[:, i], UA[:, j])
            ref[:, b] += (x @ Z.T).norm(dim=1) / (hi - lo)
    got = band_scores(x, UA, kfac_band_weights(mu, lam, edges))
    torch.testing.assert_close(got, ref)
    # SVD bands: components ranked by singular value
    W = torch.from_numpy(rng.normal(size=(d_out, d_in)))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    r = S.numel()
    cuts = [0, *[round(q * r) for q in edges], r]
    ref = torch.zeros(n_states, 4, dtype=torch.float64)
    for b, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        for k in range(lo, hi):
            ref[:, b] += (x @ torch.outer(U[:, k], Vh[k]).T).norm(dim=1) / (hi - lo)
    torch.testing.assert_close(band_scores(x, Vh.T, svd_band_weights(r, edges)), ref)
