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
    "CSP (down)", "CSP (up)",
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


#: The training cost of each edit (paper Sec. 4.2), from its delta's provenance sidecar: the run's wall
#: time (model loading included), the device it ran on, the tokens its forward passes processed.
COST_COLUMNS = [
    ("wall_time_s", "Wall time (s)", "{:.1f}"),
    ("device", "Device", "{}"),
    ("tokens_processed", "Tokens", "{:,.0f}"),
]


#: Said under the threshold ablation when it has CSP rows (csp.sweep.thetas).
CSP_THRESHOLD_NOTE = ("CSP (down) rows: t is CSP's theta, a threshold on the mean loss of the suffix tokens; "
                      "the masks' t is on their memorization loss (masks.mem_loss_tokens: the whole sequence by "
                      "default). A soft prompt edits no weight (sparsity 0).\n")

#: Said under the main table: what the cost columns measure.
COST_NOTE = ("Cost (paper Sec. 4.2): wall time of the job that wrote the edit (model loading included), its device, "
             "and the tokens it processed (non-padding input tokens of every forward pass of a trained edit; the "
             "calibration tokens of a layer-wise pruning baseline); '-' = nothing trained.\n\n")


def delta_cost(path: str | Path | None) -> dict[str, Any]:
    """The cost columns of an edit from its delta's sidecar (all None for Origin, no delta). Tokens
    processed: recorded by the masks, BalancedSubnet and CSP commands (non-padding input tokens of every
    forward pass) and the pruning baselines (their calibration tokens; magnitude pruning reads none)."""
    if not path:
        return {col: None for col, _, _ in COST_COLUMNS}
    from memctl.store import read_sidecar

    try:
        side = read_sidecar(path)
    except FileNotFoundError:  # a delta written outside the pipeline: its cost is unknown
        return {col: None for col, _, _ in COST_COLUMNS}
    return {"wall_time_s": side.get("wall_time_s"), "device": (side.get("model_loaded") or {}).get("device"),
            "tokens_processed": (side.get("cost") or {}).get("tokens_processed")}


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
            **{col: entry.get(col) for col, _, _ in COST_COLUMNS},  # the edit's training cost (its sidecar)
            "seed": entry.get("seed"),  # None: not a seeded edit (Origin, the pruning baselines)
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
    df = aggregate_seeds(_rows(metrics, spec, "main"))
    rank = {label: i for i, label in enumerate(ROW_ORDER)}
    df["_order"] = [rank.get(m, len(rank) + i) for i, m in enumerate(df["method"])]
    return df.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


#: Columns averaged over the seeds of a mask (each also gets ``_sd``, ``_min`` and ``_max``).
SEED_COLUMNS = [col for col, _, _ in COLUMNS]


def aggregate_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """One row per method: the masks of one mode trained with several seeds (``masks.seeds``) become
    their mean, with the sample standard deviation (``<col>_sd``, ddof 1), minimum and maximum of each
    metric and ``n_seeds`` / ``seeds``. A method with one row keeps it (``n_seeds`` 1, no spread). The
    aggregate converged only if every seed did; the reasons name the seeds that did not."""
    if df.empty:
        return df
    out = []
    for _, group in df.groupby("method", sort=False):
        first = group.iloc[0].to_dict()
        first["n_seeds"] = len(group)
        first["seeds"] = ",".join(str(int(s)) for s in group["seed"] if _given(s)) or None
        if len(group) > 1:
            for col in SEED_COLUMNS:
                values = group[col].astype(float)
                first[col] = float(values.mean())
                first[f"{col}_sd"] = float(values.std(ddof=1))
                first[f"{col}_min"], first[f"{col}_max"] = float(values.min()), float(values.max())
            first["edit"] = ",".join(group["edit"])
            rules = [r for r in dict.fromkeys(group["mask_rule"]) if _given(r)]
            first["mask_rule"] = "; ".join(rules) if rules else None
            flags = [c for c in group["converged"] if c is not None and _given(c)]
            if flags:
                first["converged"] = all(bool(c) for c in flags)
                first["unconverged_reason"] = "; ".join(
                    f"seed {int(r['seed'])}: {r['unconverged_reason']}" for _, r in group.iterrows()
                    if unconverged(r["converged"])) or None
        out.append(first)
    return pd.DataFrame(out)


#: Said under the ablations table: what each row varies.
ABLATIONS_NOTE = (
    "Each row is a mask of the named mode at the first seed that differs from the mode's main-table mask "
    "(the row marked both / its gate kind / full-rank logits) in one setting. regularizers (paper Table 5): "
    "sparsity only = calibration loss + lambda_s R_s (the mode's lambda_s, no memorization term); memorization "
    "only = the mode's objective with lambda_s 0 (no target sparsity: the final mask keeps logit + offset > 0). "
    "gate (appendix A): deterministic (eq. 9), Bernoulli + STE, Gumbel-sigmoid + STE. logit rank (appendix D): "
    "the gate logits of each matrix as logit_init + U V of rank k.\n\n"
)


def ablations_table(metrics: pd.DataFrame, spec: Sequence[Mapping[str, Any]],
                    rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The ``masks.ablations`` rows (paper Table 5, appendices A and D), in plan order: one row per
    (mode, ablation, setting), the reference setting being the mode's main-table mask (first seed)."""
    by_edit = {e["edit"]: e for e in spec}
    entries = []
    for row in rows:
        if row["edit"] not in by_edit:
            raise ValueError(f"ablation row {row.get('label')!r}: edit {row['edit']!r} is not in the masks spec")
        entries.append({**by_edit[row["edit"]], "series": row["label"], "tables": ["ablations"],
                        "sparsity": row.get("target_sparsity")})
    df = _rows(metrics, entries, "ablations")
    if df.empty:
        return df
    for key in ("ablation", "setting", "reference"):
        df[key] = [row.get(key) for row in rows]
    return df


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


def markdown(df: pd.DataFrame, title: str, lead: Sequence[tuple[str, str, str]] = (),
             trail: Sequence[tuple[str, str, str]] = ()) -> str:
    """A markdown table: ``lead`` columns, then the paper's columns, then ``trail`` (the cost columns)."""
    cols = [("method", "Method", "{}"), *lead, *COLUMNS, *trail]
    lines = [f"## {title}", "", "| " + " | ".join(h for _, h, _ in cols) + " |",
             "|---|" + "---:|" * (len(cols) - 1)]
    for _, row in df.iterrows():
        cells = [_method_cell(row), *(_spread_cell(row, c, f) for c, _, f in cols[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _spread_cell(row, col: str, fmt: str) -> str:
    """``mean ± sd`` where the row aggregates seeds (``<col>_sd`` given), else the value."""
    cell = _fmt(row.get(col), fmt)
    sd = row.get(f"{col}_sd")
    return f"{cell} ± {_fmt(sd, fmt)}" if _given(sd) and cell != "-" else cell


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
        n_seeds = row.get("n_seeds")
        if _given(n_seeds) and int(n_seeds) > 1:
            bits.append(f"mean ± sample standard deviation over {int(n_seeds)} seeds ({row.get('seeds')}); "
                        "the masks were trained with the same settings")
        if row.get("family") == "csp":
            theta = f"; threshold theta {row['threshold']:g} (suffix loss, nats)" if _given(row.get("threshold")) else ""
            bits.append(f"soft prompt, no weight edited (sparsity 0){theta}")
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
