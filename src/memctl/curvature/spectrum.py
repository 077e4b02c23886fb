"""Paper Fig. 2: do memorized and non-memorized inputs load on different curvature bands?

For a matrix W with K-FAC eigenpairs (lambda_j, v_j) of A and (mu_i, u_i) of G, the Fisher
eigenvectors are ``Z_ij = u_i v_j^T`` with eigenvalue ``mu_i * lambda_j``. For a hidden state x
(the matrix's input), ``||Z_ij x|| = |v_j . x|`` because u_i has unit norm. Pairs are ranked by
``mu_i * lambda_j`` and cut into bands (top 10%, 10-25%, 25-50%, bottom 50% of all pairs); the band
score of x is the mean of ``||Z_ij x||`` over the band's pairs. The paper samples pairs; here every
pair counts exactly: with ``n_b(j)`` = number of G directions i such that (i, j) falls in band b,
the band mean is ``sum_j n_b(j) |v_j . x| / |band|``, and n_b(j) comes from threshold counts on the
sorted spectra (no d_out * d_in sort). The SVD baseline ranks the rank-one components
``u_k s_k v_k^T`` of W by s_k, with ``||u_k v_k^T x|| = |v_k . x|``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from memctl.architectures import LinearTarget
from memctl.capture import Capture

DEFAULT_BANDS = (0.1, 0.25, 0.5)
SPECTRUM_COLUMNS = ["module", "short", "layer", "role", "basis", "band", "band_index", "mean_norm_memorized",
                    "mean_norm_nonmemorized", "ratio_memorized_over_nonmemorized", "n_states_memorized",
                    "n_states_nonmemorized"]
log = logging.getLogger(__name__)


def band_labels(edges: Sequence[float]) -> list[str]:
    cuts = [0.0, *edges, 1.0]
    labels = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        if lo == 0:
            labels.append(f"top {hi:.0%}")
        elif hi == 1:
            labels.append(f"bottom {1 - lo:.0%}")
        else:
            labels.append(f"{lo:.0%}-{hi:.0%}")
    return labels


def _count_at_least(values_asc: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """For each entry o of ``other``: how many v in ``values_asc`` have ``o * v >= t``."""
    n = values_asc.numel()
    out = torch.zeros(other.numel(), dtype=torch.long)
    pos = other > 0
    if t <= 0:
        return torch.full((other.numel(),), n, dtype=torch.long)
    if pos.any():
        out[pos] = n - torch.searchsorted(values_asc, t / other[pos], right=False)
    return out


def _threshold_for_count(mu: torch.Tensor, lam: torch.Tensor, k: int, iters: int = 200) -> float:
    """A threshold t with #{(i, j): mu_i lambda_j >= t} as close to k as ties allow (from above)."""
    mu_asc = mu.sort().values
    if k <= 0:
        return math.inf
    if k >= mu.numel() * lam.numel():
        return 0.0
    pos_mu, pos_lam = mu[mu > 0], lam[lam > 0]
    if pos_mu.numel() * pos_lam.numel() < k:
        return 0.0  # fewer positive pairs than the band needs: the zero pairs fill it
    lo, hi = float(pos_mu.min() * pos_lam.min()), float(pos_mu.max() * pos_lam.max()) * 2
    for _ in range(iters):
        mid = math.exp((math.log(lo) + math.log(hi)) / 2)
        if not lo < mid < hi:
            break
        if int(_count_at_least(mu_asc, lam, mid).sum()) >= k:
            lo = mid
        else:
            hi = mid
        if int(_count_at_least(mu_asc, lam, lo).sum()) == k:
            break
    return lo


def kfac_band_weights(mu: torch.Tensor, lam: torch.Tensor, edges: Sequence[float] = DEFAULT_BANDS) -> torch.Tensor:
    """(n_bands, d_in): weight of |v_j . x| in each band's mean (rows sum to 1)."""
    mu = mu.double().clamp(min=0)
    lam = lam.double().clamp(min=0)
    mu_asc = mu.sort().values
    total = mu.numel() * lam.numel()
    counts = [torch.zeros(lam.numel(), dtype=torch.long)]
    for q in edges:
        t = _threshold_for_count(mu, lam, int(round(q * total)))
        counts.append(_count_at_least(mu_asc, lam, t) if math.isfinite(t) else torch.zeros(lam.numel(), dtype=torch.long))
    counts.append(torch.full((lam.numel(),), mu.numel(), dtype=torch.long))
    rows = []
    for lo, hi in zip(counts[:-1], counts[1:]):
        n = (hi - lo).double()
        rows.append(n / n.sum() if n.sum() > 0 else n)
    return torch.stack(rows)


def svd_band_weights(n_components: int, edges: Sequence[float] = DEFAULT_BANDS) -> torch.Tensor:
    """(n_bands, n_components): uniform weights over the components of each band (by rank)."""
    cuts = [0, *[int(round(q * n_components)) for q in edges], n_components]
    rows = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        w = torch.zeros(n_components, dtype=torch.float64)
        if hi > lo:
            w[lo:hi] = 1.0 / (hi - lo)
        rows.append(w)
    return torch.stack(rows)


def band_scores(states: torch.Tensor, directions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(n_states, n_bands): for each state, the weighted mean of |direction . x| per band."""
    proj = (states.double() @ directions.double()).abs()
    return proj @ weights.T


@torch.no_grad()
def capture_inputs(model, targets: Sequence[LinearTarget], sequences: np.ndarray, positions: slice,
                   batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Input activations of each target at the given positions of equal-length token sequences.

    Targets that read one tensor (q/k/v, gate/up) share one captured copy."""
    device = next(model.parameters()).device
    store: dict[str, list[torch.Tensor]] = {t.input_key: [] for t in targets}
    with Capture(model, targets, on_input=lambda t, x: store[t.input_key].append(x.float().cpu()), positions=positions):
        for start in range(0, len(sequences), batch_size):
            ids = torch.as_tensor(sequences[start : start + batch_size], dtype=torch.long, device=device)
            model(input_ids=ids, use_cache=False)
    states = {k: torch.cat(v) if v else torch.zeros(0) for k, v in store.items()}
    return {t.name: states[t.input_key] for t in targets}


def sequences_and_positions(df: pd.DataFrame, mode: str, max_sequences: int) -> tuple[np.ndarray, slice]:
    """Prefix+suffix token rows and the positions scored: those that predict a suffix token, or all."""
    df = df.head(max_sequences)
    if df.empty:
        return np.zeros((0, 0), dtype=np.int64), slice(0, 0)
    rows = [list(map(int, p)) + list(map(int, s)) for p, s in zip(df["prefix_ids"], df["suffix_ids"])]
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"spectrum analysis needs equal-length prefix+suffix rows, got lengths {sorted(lengths)}")
    p_len, s_len = len(df["prefix_ids"].iloc[0]), len(df["suffix_ids"].iloc[0])
    pos = slice(p_len - 1, p_len + s_len - 1) if mode == "suffix" else slice(0, p_len + s_len)
    return np.asarray(rows, dtype=np.int64), pos


def spectrum_table(model, eig, targets: Sequence[LinearTarget], memorized: pd.DataFrame,
                   nonmemorized: pd.DataFrame, settings) -> pd.DataFrame:
    """One row per (module, basis, band): mean band score of memorized and non-memorized states."""

    edges = tuple(settings.get("bands", DEFAULT_BANDS))
    mode, n_max, batch = settings.get("positions", "suffix"), int(settings.get("max_sequences", 256)), int(settings.get("batch_size", 16))
    states = {}
    for name, df in (("memorized", memorized), ("nonmemorized", nonmemorized)):
        seqs, pos = sequences_and_positions(df, mode, n_max)
        if len(seqs) == 0:
            # A model that memorized nothing (or everything) has no contrast: an empty table, not a
            # failed DAG.
            log.warning("spectrum analysis: the %s set is empty; writing an empty table", name)
            return pd.DataFrame(columns=SPECTRUM_COLUMNS)
        states[name] = capture_inputs(model, targets, seqs, pos, batch)
    return band_table(model, eig, targets, states["memorized"], states["nonmemorized"], edges)


def band_table(model, eig, targets, memorized: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
               edges: Sequence[float]) -> pd.DataFrame:
    """One row per (matrix, basis, band) from captured input states per matrix name: the mean
    ``||Z x||`` of the memorized states and of the other (non-memorized / clean) states, in the
    K-FAC eigenbasis and in the weight's SVD basis (:data:`SPECTRUM_COLUMNS`)."""
    from memctl.architectures import weight

    labels = band_labels(tuple(edges))
    rows = []
    for t in targets:
        W = weight(model, t).detach().double().cpu()
        _, S, Vh = torch.linalg.svd(W, full_matrices=False)
        bases = {
            "K-FAC": (eig.A[t.input_key].vectors, kfac_band_weights(eig.G[t.name].values, eig.A[t.input_key].values, edges)),
            "SVD": (Vh.T, svd_band_weights(S.numel(), edges)),
        }
        for basis, (dirs, w) in bases.items():
            mem = band_scores(memorized[t.name], dirs, w).mean(0)
            non = band_scores(other[t.name], dirs, w).mean(0)
            for b, label in enumerate(labels):
                rows.append({
                    "module": t.name, "short": t.short, "layer": t.layer, "role": t.role, "basis": basis,
                    "band": label, "band_index": b, "mean_norm_memorized": float(mem[b]),
                    "mean_norm_nonmemorized": float(non[b]),
                    "ratio_memorized_over_nonmemorized": float(mem[b] / non[b]) if float(non[b]) > 0 else math.nan,
                    "n_states_memorized": int(memorized[t.name].shape[0]),
                    "n_states_nonmemorized": int(other[t.name].shape[0]),
                })
    return pd.DataFrame(rows, columns=SPECTRUM_COLUMNS)


def plot_spectrum(df: pd.DataFrame, path, provenance=None) -> None:
    """Paper Fig. 2: per matrix, the memorized / non-memorized ratio of mean projection norms in each
    band of K-FAC and of SVD eigen-directions (bars in the two methods' colours of
    :mod:`memctl.plots`, hatched for SVD). Writes ``path`` (PNG) and the SVG beside it."""
    from memctl import plots

    modules = list(dict.fromkeys(df["short"]))
    cols = min(4, max(1, len(modules)))
    nrows = math.ceil(len(modules) / cols) if modules else 1
    bases = (("K-FAC", plots.FAMILIES["kfac"].color, ""), ("SVD", plots.FAMILIES["svd"].color, "//"))
    with plots.style():
        fig, axes = plots.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False)
        for ax in axes.flat[len(modules):]:
            ax.axis("off")
        if not modules:
            axes.flat[0].text(0.5, 0.5, "no memorized / non-memorized contrast to analyse", ha="center", va="center")
        for ax, short in zip(axes.flat, modules):
            part = df[df["short"] == short]
            labels = list(dict.fromkeys(part.sort_values("band_index")["band"]))
            x = np.arange(len(labels))
            for k, (basis, color, hatch) in enumerate(bases):
                sub = part[part["basis"] == basis].sort_values("band_index")
                ax.bar(x + (k - 0.5) * 0.38, sub["ratio_memorized_over_nonmemorized"], width=0.38, color=color,
                       hatch=hatch, edgecolor="white" if hatch else color, linewidth=0, label=basis)
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_yscale("log")
            ax.set_xticks(x, labels, fontsize=7)
            ax.set_title(short, fontsize=9)
            ax.set_ylabel("mean ||Zx||: memorized / non-memorized", fontsize=7)
            ax.grid(alpha=0.3, axis="y")
            ax.grid(False, axis="x")
        if modules:
            axes.flat[0].legend(fontsize=7)
        fig.suptitle("Memorized vs non-memorized inputs per curvature band (paper Fig. 2)", fontsize=10)
        fig.tight_layout()
        plots.save(fig, path, provenance)
