"""Paper-style tables (the weight-pruning paper's Tables 1-2) and ablation plots from the metrics.

Every number comes from the ``evaluate`` stage's ``metrics.parquet`` of each edit; sparsity is
measured on the edit itself (share of zero weights among the matrices the edit touches: masked-out
weights, or zeros of SparseGPT's replaced weights). The Origin row is the unedited model (no
pruning: sparsity 0). A trained edit whose delta says ``converged: false`` (written with
``on_unconverged: flag``) is marked "did not converge" in every table (method cell, a note with the
reason, the ``converged`` column of the parquet) and plot (a red cross over its point).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: Row order of the main table (labels not listed here follow, in spec order).
ROW_ORDER = [
    "Origin", "Magnitude", "SparseGPT", "SparseGPT (one-pass)", "Wanda", "Wanda (one-pass)", "BalancedSubnet",
    "Ours (none)", "Ours (up)", "Ours (down)", "Ours (reciprocal)",
]
#: (metrics column, table header, format)
COLUMNS = [
    ("heldout_loss", "Held-out loss", "{:.3f}"),
    ("heldout_ppl", "Held-out PPL", "{:.2f}"),
    ("fractional_er", "Fractional ER", "{:.3f}"),
    ("exact_er", "Exact ER", "{:.3f}"),
    ("mem_loss", "Mem. loss", "{:.3f}"),
    ("mem_ppl", "Mem. PPL", "{:.3f}"),
    ("sparsity", "Sparsity", "{:.3f}"),
]


def delta_info(path: str | Path | None) -> tuple[float, dict[str, Any]]:
    """(share of zero weights among the parameters a delta edits, the delta's metadata).

    The unedited model (no delta) has sparsity 0.
    """
    if not path:
        return 0.0, {}
    from memctl.edits import load_delta

    delta = load_delta(path)
    total = zeros = 0
    for mask in delta.masks.values():
        total += mask.numel()
        zeros += int(mask.numel() - int(mask.sum()))
    for value in delta.replace.values():
        total += value.numel()
        zeros += int((value == 0).sum())
    return (zeros / total if total else 0.0), delta.metadata


def _rows(metrics: pd.DataFrame, spec: Sequence[Mapping[str, Any]], table: str) -> pd.DataFrame:
    by_edit = metrics.set_index("edit")
    rows = []
    for entry in spec:
        if table not in entry.get("tables", []):
            continue
        edit = entry["edit"]
        if edit not in by_edit.index:
            raise ValueError(f"no metrics for edit {edit!r} ({entry.get('label')})")
        m = by_edit.loc[edit]
        rows.append({
            "method": entry["series"],
            "edit": edit,
            "family": entry.get("family"),
            "mode": entry.get("mode"),
            "form": entry.get("form"),
            "target_sparsity": entry.get("sparsity"),
            "threshold": entry.get("threshold"),
            **{col: float(m[col]) for col, _, _ in COLUMNS if col != "sparsity"},
            "sparsity": entry["measured_sparsity"],
            "mask_rule": entry.get("mask_rule"),
            # None: not a trained edit (Origin, pruning baselines) or a delta from before the check
            "converged": entry.get("converged"),
            "unconverged_reason": entry.get("unconverged_reason"),
        })
    return pd.DataFrame(rows)


#: Appended to the method cell of an edit that did not converge.
UNCONVERGED = "did not converge"


def unconverged(value) -> bool:
    """True for a ``converged`` cell that says False (None / NaN: not a trained edit, or not recorded)."""
    return isinstance(value, (bool, np.bool_)) and not bool(value)


def _method_cell(row) -> str:
    method = str(row.get("method"))
    return f"{method} ({UNCONVERGED})" if unconverged(row.get("converged")) else method


def main_table(metrics: pd.DataFrame, spec: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    df = _rows(metrics, spec, "main")
    rank = {label: i for i, label in enumerate(ROW_ORDER)}
    df["_order"] = [rank.get(m, len(rank) + i) for i, m in enumerate(df["method"])]
    return df.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


def ablation_table(metrics: pd.DataFrame, spec: Sequence[Mapping[str, Any]], table: str) -> pd.DataFrame:
    df = _rows(metrics, spec, table)
    if df.empty:
        return df
    key = "target_sparsity" if table == "sparsity" else "threshold"
    return df.sort_values(["method", key], kind="stable").reset_index(drop=True)


def _fmt(value, fmt: str) -> str:
    from memctl.report import md_cell

    if not _given(value):
        return "-"
    return md_cell(fmt.format(value))  # a | in a label stays inside its cell


def markdown(df: pd.DataFrame, title: str, lead: Sequence[tuple[str, str, str]] = ()) -> str:
    """A markdown table: ``lead`` columns, then the paper's columns."""
    cols = [("method", "Method", "{}"), *lead, *COLUMNS]
    lines = [f"## {title}", "", "| " + " | ".join(h for _, h, _ in cols) + " |",
             "|---|" + "---:|" * (len(cols) - 1)]
    for _, row in df.iterrows():
        cells = [_method_cell(row), *(_fmt(row.get(c), f) for c, _, f in cols[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _given(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def notes(df: pd.DataFrame) -> str:
    """What each row used: baseline form, final mask rule, target sparsity."""
    out = []
    for _, row in df.iterrows():
        bits = []
        if unconverged(row.get("converged")):
            reason = row.get("unconverged_reason")
            bits.append(f"**{UNCONVERGED}**" + (f" ({reason})" if _given(reason) else "")
                        + ": not a result of the method; see its train_mask / balanced_subnet log")
        if _given(row.get("form")) and row["form"] != "none":
            bits.append(f"form: {str(row['form']).replace('_', '-')}")
        if _given(row.get("mask_rule")):
            bits.append(f"final mask: {row['mask_rule']}")
        if _given(row.get("target_sparsity")):
            bits.append(f"target sparsity {row['target_sparsity']:.3f}")
        if row["method"] == "BalancedSubnet":
            bits.append("sparsity of the MLP matrices only (its own ratio); the other rows count every "
                        "attention and MLP matrix")
        if bits:
            out.append(f"- {_method_cell(row)}: " + "; ".join(bits))
    return "\n".join(out) + ("\n" if out else "")


def plot_ablation(df: pd.DataFrame, x: str, panels: Sequence[tuple[str, str]], path, title: str,
                  origin: Mapping[str, float] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    flagged = df["converged"].map(unconverged) if "converged" in df.columns else pd.Series(False, index=df.index)
    for ax, (col, label) in zip(axes, panels, strict=True):
        crossed = False
        for method, group in df.groupby("method", sort=True):
            group = group.sort_values(x)
            bad = flagged.loc[group.index]
            ax.plot(group[x], group[col], marker="o", label=f"{method} ({UNCONVERGED}: x)" if bad.any() else method)
            if bad.any():  # a red cross over every point that did not converge
                ax.scatter(group[x][bad], group[col][bad], marker="x", s=90, color="red", zorder=5,
                           label=None if crossed else UNCONVERGED)
                crossed = True
        if origin and col in origin:
            ax.axhline(origin[col], color="grey", linestyle="--", linewidth=1, label="Origin")
        ax.set_xlabel("target sparsity" if x == "target_sparsity" else "learning threshold t")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


SPARSITY_PANELS = [("exact_er", "Exact ER"), ("fractional_er", "Fractional ER"), ("heldout_ppl", "held-out PPL")]
THRESHOLD_PANELS = [("exact_er", "Exact ER"), ("fractional_er", "Fractional ER"), ("mem_loss", "memorized-suffix loss"),
                    ("heldout_loss", "held-out loss")]
