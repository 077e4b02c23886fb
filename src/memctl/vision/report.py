"""The vision track's tables and plots: paper Fig. 4 (per-block edits, best pair) and Fig. 2 (bands).

Every edit was scored on five accuracies (:func:`memctl.vision.model.accuracies`). For each method
and unit (one MLP block, or a pair of blocks) the strength is chosen on the **selection** slice of
the held-out images (highest accuracy; ties go to the gentler edit, i.e. the larger kept share),
never on the reported validation slice and never with the noise bookkeeping; the best pair is the
pair with the highest selection accuracy among the chosen ones. The tables then report that edit's
memorization, recovery, clean-train and validation accuracies next to the unedited model's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from memctl import metric_records, stats
from memctl.report import markdown_table
from memctl.stats import ALPHA

#: The accuracies the tables show: record (memctl.metric_records), then the parts of it shown (value,
#: count k/N, exact interval, McNemar verdict against Origin).
ACCURACIES = (
    (metric_records.MEMORIZATION_ACC, ("value", "count", "ci", "verdict")),
    (metric_records.RECOVERY, ("value", "count", "verdict")),
    (metric_records.CLEAN_TRAIN, ("value", "count")),
    (metric_records.SELECTION, ("value", "count")),
    (metric_records.VALIDATION, ("value", "count", "ci", "verdict")),
)
COLUMNS = [
    ("unit", "Unit", "{}"),
    ("blocks", "MLP blocks", "{}"),
    ("label", "Method", "{}"),
    ("strength", "Strength", "{:g}"),
    *(col for metric, parts in ACCURACIES for col in metric.columns(parts)),
]
#: Said under the tables: what the counts, intervals and verdicts are.
TESTS_NOTE = (
    "k/N: images of the group the edit gets right (memorization: predicted as the noised label); 95% CI: exact "
    "Clopper-Pearson. 'vs Origin': the edit against the unedited model on the same images, exact McNemar test "
    "(two-sided binomial test on the images only one of them gets right; memctl.stats), verdicts at significance "
    f"level {ALPHA:g}; '-' where the metrics carry no per-image outcomes."
)


def _outcomes(row: Mapping, metric: str) -> np.ndarray | None:
    """The per-image 0/1 outcomes of one accuracy (``hits_<metric>``, written by the evaluate stage)."""
    value = row.get(f"hits_{metric}")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return np.asarray(value, dtype=np.float64)


def _count(row: Mapping, metric: str) -> tuple[float, int] | None:
    """(k, N) of one accuracy: from its per-image outcomes, else from the rate and ``n_<metric>``."""
    hits = _outcomes(row, metric)
    if hits is not None:
        return float(hits.sum()), len(hits)
    n, value = row.get(f"n_{metric}"), row.get(metric)
    if n is None or value is None or (isinstance(n, float) and math.isnan(n)) or math.isnan(float(value)):
        return None
    return float(round(float(value) * int(n))), int(n)


def compare(row: Mapping, ref: Mapping, metric: str) -> stats.Comparison | None:
    """Exact McNemar test of one accuracy of ``row`` against ``ref`` on the same images (None where
    either lacks per-image outcomes or they differ in number)."""
    a, b = _outcomes(row, metric), _outcomes(ref, metric)
    if a is None or b is None or len(a) != len(b) or not len(a):
        return None
    return stats.compare_rates(a, b)


def add_tests(df: pd.DataFrame) -> pd.DataFrame:
    """Counts ``k/N`` of every accuracy, exact intervals and the paired test against the unedited
    model (``edit == "none"``) of each."""
    df = df.copy()
    base = df[df["edit"] == "none"]
    base = base.iloc[0].to_dict() if len(base) else None
    for metric in METRIC_NAMES:
        counts, cis, verdicts, pvalues = [], [], [], []
        for row in df.to_dict("records"):
            kn = _count(row, metric)
            counts.append("-" if kn is None else f"{int(kn[0])}/{kn[1]}")
            lo, hi = stats.rate_interval(*kn) if kn is not None else (math.nan, math.nan)
            cis.append("-" if math.isnan(lo) else f"[{lo:.3f}, {hi:.3f}]")
            test = None if base is None or row["edit"] == "none" else compare(row, base, metric)
            verdicts.append(stats.verdict(test))
            pvalues.append(test.pvalue if test is not None else math.nan)
        df[f"{metric}_count"], df[f"{metric}_ci"] = counts, cis
        df[f"{metric}_vs_origin"], df[f"{metric}_vs_origin_p"] = verdicts, pvalues
    return df
PLOT_METRICS = (("memorization", "memorization"), ("recovery", "recovered GT"), ("validation", "validation"))
#: The five accuracies (memctl.vision.model.METRICS), from their records.
METRIC_NAMES = tuple(metric.key for metric, _ in ACCURACIES)


def _blocks(layers) -> str:
    return "+".join(str(int(i)) for i in layers)


def edit_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """All scored edits with a ``blocks`` column (the unedited model first), their counts, exact
    intervals and paired tests against the unedited model (:func:`add_tests`)."""
    df = metrics.copy()
    df["blocks"] = [_blocks(x) if isinstance(x, (list, tuple, np.ndarray)) and len(x) else "-" for x in df["layers"]]
    df["order"] = (df["edit"] != "none").astype(int)
    df = df.sort_values(["order", "method", "unit", "blocks", "strength"], kind="stable").drop(columns="order")
    return add_tests(df)


def best_per_unit(table: pd.DataFrame) -> pd.DataFrame:
    """Per (method, unit): the strength with the highest selection accuracy (ties: larger strength)."""
    edits = table[table["edit"] != "none"]
    if edits.empty:
        return edits
    ranked = edits.sort_values(["selection", "strength"], ascending=[False, False], kind="stable")
    return ranked.groupby(["method", "blocks"], sort=False).head(1).sort_values(["unit", "blocks", "method"])


def best_pairs(best: pd.DataFrame) -> pd.DataFrame:
    """Per method: the pair (chosen strength) with the highest selection accuracy."""
    pairs = best[best["unit"] == "pair"]
    if pairs.empty:
        return pairs
    ranked = pairs.sort_values(["selection", "strength"], ascending=[False, False], kind="stable")
    return ranked.groupby("method", sort=False).head(1)


def tradeoff(table: pd.DataFrame, tolerance: float) -> pd.DataFrame:
    """Per (method, unit): the edit with the lowest memorization among those whose selection-slice
    accuracy is at least the unedited model's minus ``tolerance`` (ties: higher selection accuracy,
    then the gentler edit). It ranks with the noise bookkeeping: how far each method can go at
    (nearly) no held-out cost, an analysis next to the unsupervised choice of :func:`best_per_unit`."""
    base = table[table["edit"] == "none"]
    edits = table[table["edit"] != "none"]
    if edits.empty or base.empty:
        return edits.iloc[0:0]
    floor = float(base["selection"].iloc[0]) - float(tolerance)
    kept = edits[edits["selection"] >= floor - 1e-12]
    ranked = kept.sort_values(["memorization", "selection", "strength"], ascending=[True, False, False], kind="stable")
    return ranked.groupby(["method", "blocks"], sort=False).head(1).sort_values(["unit", "blocks", "method"])


def _row(df: pd.DataFrame, method: str) -> dict | None:
    part = df[df["method"] == method]
    return part.iloc[0].to_dict() if len(part) else None


def _with_count(row: Mapping, metric: str) -> str:
    kn = _count(row, metric)
    return f"{row[metric]:.3f}" + ("" if kn is None else f" ({int(kn[0])}/{kn[1]})")


def _tested(row: Mapping, ref: Mapping, metric: str) -> str:
    test = compare(row, ref, metric)
    return "no per-image outcomes: no paired test" if test is None else stats.verdict(test)


def claim_lines(base: dict, pairs: pd.DataFrame) -> list[str]:
    """The paper's claim, checked on the best pairs with counts and paired tests (exact McNemar on
    the same images): against the unedited model, and K-FAC's memorization against SVD's."""
    lines = []
    k, s = _row(pairs, "kfac"), _row(pairs, "svd")
    for name, row in (("K-FAC", k), ("SVD", s)):
        if row is None:
            continue
        lines.append(
            f"- {name} best pair (blocks {row['blocks']}, strength {row['strength']:g}) against the unedited "
            f"model: memorization {_with_count(base, 'memorization')} -> {_with_count(row, 'memorization')}, "
            f"{_tested(row, base, 'memorization')}; recovered true labels {_with_count(base, 'recovery')} -> "
            f"{_with_count(row, 'recovery')}, {_tested(row, base, 'recovery')}; validation "
            f"{_with_count(base, 'validation')} -> {_with_count(row, 'validation')}, {_tested(row, base, 'validation')}."
        )
    if k is not None and s is not None:
        lines.append(
            "- Claim (paper §4.2.2: K-FAC removes memorization while validation accuracy rises, more than SVD), "
            f"each part a paired test: K-FAC's memorization against the unedited model's: "
            f"{_tested(k, base, 'memorization')}; K-FAC's validation accuracy against the unedited model's: "
            f"{_tested(k, base, 'validation')}; K-FAC's memorization against SVD's (same noised images): "
            f"{_tested(k, s, 'memorization')}."
        )
    return lines


def vision_markdown(table: pd.DataFrame, best: pd.DataFrame, pairs: pd.DataFrame, spectrum: pd.DataFrame | None,
                    info: dict, tolerance: float = 0.01) -> str:
    base = table[table["edit"] == "none"].iloc[0].to_dict()
    base_view = pd.DataFrame([{**base, "unit": "unedited", "blocks": "-", "label": "Origin", "strength": math.nan}])
    out = [
        "# Vision track: label-noise memorization in a ViT (loss-curvature paper §2.2, §4.2.2)", "",
        f"Data: {info.get('data', '')}. Model: {info.get('model', '')}. Training ended at "
        f"{info.get('train', '')}. K-FAC: {info.get('kfac', '')}.", "",
        "Strengths are chosen per method and unit on the selection slice of the held-out images "
        "(highest accuracy); the validation slice is reported only. K-FAC strength = share of the "
        "Fisher eigenvalue products kept (paper form); SVD strength = share of singular values kept.", "",
        TESTS_NOTE, "",
        "## Unedited model", "", markdown_table(base_view, COLUMNS), "",
        "## Per MLP block (paper Fig. 4, top)", "", markdown_table(best[best["unit"] == "block"], COLUMNS), "",
        "## Best pair of blocks (paper Fig. 4, bottom)", "", markdown_table(pairs, COLUMNS), "",
        *claim_lines(base, pairs), "",
        f"## Trade-off: lowest memorization within {tolerance:g} of the unedited selection accuracy", "",
        "Per method and unit, among all strengths whose selection-slice accuracy is at least "
        f"{base['selection']:.3f} - {tolerance:g}: the one with the lowest memorization. This ranks with the "
        "noise bookkeeping (an analysis of what each basis can remove at no held-out cost, not the "
        "unsupervised choice above).", "",
        markdown_table(tradeoff(table, tolerance), COLUMNS), "",
    ]
    if spectrum is not None and len(spectrum):
        out += ["## Curvature bands of the MLP down-projections (paper Fig. 2)", "",
                "Mean ||Z x|| over every token position of memorized images (noised, predicted as the noised "
                "label) divided by that of clean training images, per band of the K-FAC and of the SVD basis.", "",
                markdown_table(spectrum.assign(ratio=spectrum["ratio_memorized_over_nonmemorized"]),
                               [("short", "Matrix", "{}"), ("basis", "Basis", "{}"), ("band", "Band", "{}"),
                                ("mean_norm_memorized", "Memorized", "{:.4g}"),
                                ("mean_norm_nonmemorized", "Clean", "{:.4g}"), ("ratio", "Ratio", "{:.3f}")]), ""]
    out += ["## Every edit", "", markdown_table(table[table["edit"] != "none"], COLUMNS), ""]
    return "\n".join(out)


def plot_blocks(best: pd.DataFrame, pairs: pd.DataFrame, base: dict, path, provenance=None) -> None:
    """Fig. 4 style: per block (top) and best pair (bottom), K-FAC vs SVD in their colours of
    :mod:`memctl.plots`, the three accuracies told apart by hatching; lines mark the unedited model.
    Writes ``path`` (PNG) and the SVG beside it (with ``provenance``: their sidecars)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from memctl import plots

    blocks = best[best["unit"] == "block"]
    colors = {"kfac": plots.FAMILIES["kfac"].color, "svd": plots.FAMILIES["svd"].color}
    names = {"kfac": "K-FAC", "svd": "SVD"}
    hatches = ["", "///", "..."]
    styles = [":", "--", "-"]
    with plots.style():
        fig, axes = plots.subplots(2, 1, figsize=(8, 6.8))
        for ax, part, title in ((axes[0], blocks, "per MLP block (strength chosen on the selection slice)"),
                                (axes[1], pairs, "best pair of blocks")):
            units = list(dict.fromkeys(part["blocks"])) if len(part) else []
            groups = [(u, m) for u in units for m in ("kfac", "svd")
                      if len(part[(part["blocks"] == u) & (part["method"] == m)])]
            if not groups:
                ax.text(0.5, 0.5, "no edits", ha="center", va="center")
                ax.axis("off")
                continue
            width = 0.8 / len(PLOT_METRICS)
            for k, (metric, _) in enumerate(PLOT_METRICS):
                x = np.arange(len(groups)) + (k - (len(PLOT_METRICS) - 1) / 2) * width
                vals = [float(part[(part["blocks"] == u) & (part["method"] == m)][metric].iloc[0]) for u, m in groups]
                ax.bar(x, vals, width=width, color=[colors[m] for _, m in groups], hatch=hatches[k % len(hatches)],
                       edgecolor="white", linewidth=0.4)
                ax.axhline(base[metric], color="black", lw=0.8, ls=styles[k % len(styles)])
            ax.set_xticks(np.arange(len(groups)), [f"{names[m]}\nblocks {u}" for u, m in groups], fontsize=7)
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("accuracy")
            ax.set_title(title, fontsize=9)
            ax.grid(False, axis="x")
        handles = [Patch(facecolor=colors[m], label=names[m]) for m in ("kfac", "svd")]
        handles += [Patch(facecolor=plots.PALETTE["grey"], edgecolor="white", hatch=hatches[k], label=lab)
                    for k, (_, lab) in enumerate(PLOT_METRICS)]
        handles += [Line2D([0], [0], color="black", lw=0.8, ls=styles[k], label=f"unedited {lab}")
                    for k, (_, lab) in enumerate(PLOT_METRICS)]
        fig.legend(handles=handles, fontsize=7, loc="lower center", ncol=4, frameon=False)
        fig.suptitle("ViT edits: K-FAC vs SVD per block and best pair (paper Fig. 4)", fontsize=10)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        plots.save(fig, path, provenance)
