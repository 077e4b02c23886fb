"""Paper-style tables (the weight-pruning paper's Tables 1-2) and ablation plots from the metrics.

Every number comes from the ``evaluate`` stage's ``metrics.parquet`` of each edit. The paper's
Tables 1-2 evaluate on an unfiltered held-out split (1,000 sequences, whatever the model extracts:
its Origin rows score Exact ER 0.17-0.50), so the tables' Exact ER / Fractional ER columns, their
counts, intervals and paired tests, and the ablation plots are the extraction-rate track (the
metrics' ``er_`` columns, scores of track ``extraction_rate``: ``er_test``). The memorized track
(``memorized_test``: the held-out sequences the unedited model extracts exactly, Origin 1 by
construction) has columns of its own, "Exact ER (memorized)" and "Fractional ER (memorized)";
:func:`columns_note` says under each table which set every column is computed on. Sparsity is
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

from memctl import metric_records, stats
from memctl.stats import ALPHA

#: Row order of the main table (labels not listed here follow, in spec order).
def row_order() -> list[str]:
    """The main table's row order, from the edit methods' records (:mod:`memctl.edit_methods`, so a
    method registered later has its place): Origin, the pruning baselines by label (each followed by
    its one-pass form), BalancedSubnet, CSP, then the masks' modes; any other row after them."""
    from memctl.edit_methods import family

    rows = ["Origin"]
    for label in sorted(m.label for m in family("baseline").values()):
        rows += [label, f"{label} (one-pass)"]
    for name in ("balanced_subnet", "csp", "mask"):
        rows += [m.label for m in family(name).values()]
    return rows


ROW_ORDER = row_order()  #: the built-in methods' order (:func:`row_order` at import)
#: (metrics column, table header, format). The metrics' naming is kept: ``er_`` = the extraction-rate
#: track (the paper's split: the unlabelled Exact / Fractional ER columns), unprefixed = the memorized
#: track (labelled "(memorized)"); Mem. loss / PPL are teacher-forced on the memorized track's suffixes.
#: (track, metric key, format) of the paper's columns; headers from the metrics' records
#: (memctl.metric_records), labelled with the set they are computed on (:data:`TRACK_LABELS`).
#: Mem. PPL keeps three decimals here (the paper's table).
PAPER_METRICS = (
    (None, "heldout_loss", None), (None, "heldout_ppl", None),
    ("extraction_rate", "fractional_er", None), ("extraction_rate", "exact_er", None),
    ("forget", "fractional_er", None), ("forget", "exact_er", None),
    ("memorized", "fractional_er", None), ("memorized", "exact_er", None),
    (None, "mem_loss", None), (None, "mem_ppl", "{:.3f}"), (None, "sparsity", None),
)
#: What each track's columns are labelled with (the extraction-rate track: none, the paper's split).
TRACK_LABELS = {"extraction_rate": "", "memorized": "memorized", "forget": "own training memories"}
#: The tests' columns shown after a value (:func:`with_test_columns`): (track, metric key) -> parts of
#: its record (``against``: the verdict against the reference row); memorized: count and interval only.
TEST_PARTS = {
    ("extraction_rate", "exact_er"): ("count", "ci", "verdict", "against"),
    ("extraction_rate", "fractional_er"): ("ci", "verdict", "against"),
    ("memorized", "exact_er"): ("count", "ci"),
    ("forget", "exact_er"): ("count", "ci", "verdict", "against"),
}


def _paper_column(track: str | None, key: str, fmt: str | None) -> tuple[str, str, str]:
    prefix = metric_records.PREFIXES[track] if track else ""
    return metric_records.by_key(key).column(prefix=prefix, label=TRACK_LABELS.get(track, ""), fmt=fmt)


COLUMNS = [_paper_column(*entry) for entry in PAPER_METRICS]
#: The examples each track scored (from the metrics; the same for every row of a run): the notes' N.
N_COLUMNS = ("er_n_examples", "n_examples", "forget_n_examples")


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
            # a metrics file without a track's columns (written before it existed) shows "-" there
            **{col: float(m.get(col, math.nan)) for col, _, _ in COLUMNS if col != "sparsity"},
            **{col: m.get(col) for col in N_COLUMNS},
            "sparsity": entry["measured_sparsity"],
            "mask_rule": entry.get("mask_rule"),
            **{col: entry.get(col) for col, _, _ in COST_COLUMNS},  # the edit's training cost (its sidecar)
            "seed": entry.get("seed"),  # None: not a seeded edit (Origin, the pruning baselines)
            "lambda_s": entry.get("lambda_s"),  # masks: the paired design's check (none_reference)
            # the unpruned model's L_mem on the mask's training memories, measured by its job (mode down:
            # t below it amplifies; the threshold plot's line)
            "unpruned_mem_loss": entry.get("unpruned_mem_loss"),
            "mem_loss_tokens": entry.get("mem_loss_tokens"),
            # None: not a trained edit (Origin, pruning baselines) or a delta from before the check
            "converged": entry.get("converged"),
            "unconverged_reason": entry.get("unconverged_reason"),
        })
    return pd.DataFrame(rows)


#: Appended to the method cell of an edit that did not converge.
UNCONVERGED = "did not converge"
#: A row whose own training memories did not move the way its objective intends (issue 23):
#: the method cell says so with the paired test's p-value, like "did not converge".
OWN_FLAG = "own training memories not {direction} than Origin's"


def unconverged(value) -> bool:
    """True for a ``converged`` cell that says False (None / NaN: not a trained edit, or not recorded)."""
    return isinstance(value, (bool, np.bool_)) and not bool(value)


def _method_cell(row) -> str:
    method = str(row.get("method"))
    if unconverged(row.get("converged")):
        method = f"{method} ({UNCONVERGED})"
    if own_flagged(row):
        method = f"{method} ({OWN_FLAG.format(direction=row.get('own_direction'))}, {stats.format_p(float(row['own_p']))})"
    return method


def main_table(metrics: pd.DataFrame, spec: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    df = aggregate_seeds(_rows(metrics, spec, "main"))
    rank = {label: i for i, label in enumerate(row_order())}
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


#: (column prefix, track) of the per-example scores the tests read: ``er_`` the extraction-rate track
#: (the Exact / Fractional ER columns, with their counts, intervals and verdicts in the tables),
#: unprefixed the memorized track (its count and interval beside its "(memorized)" columns; its
#: verdicts, ``vs_origin``, ``vs_ref``, ``frac_*``, in the parquet).
TEST_TRACKS = (("er_", "extraction_rate"), ("", "memorized"), ("forget_", "forget"))
#: Tracks whose comparison with Origin needs Origin scored on every row of the edit (the forget track:
#: each edit's own training memories; Origin's are the masks' sample, BalancedSubnet's are its own set).
SAME_ROWS_TRACKS = ("forget",)
#: Said under each table that carries the paired tests.
TESTS_NOTE = (
    "Tests are on the extraction-rate track (the Exact ER / Fractional ER columns). "
    "k/N, 95% CI: exact Clopper-Pearson interval of Exact ER with its count; Fractional ER: percentile bootstrap "
    "over examples. vs Origin: the row against the unedited model on the same examples (exact McNemar test for "
    "Exact ER, paired bootstrap for Fractional ER and held-out perplexity over the same windows); vs `none` mask: "
    "each trained mask (`up`, `down`, `reciprocal`) against the mask of the `none` objective at the same sparsity "
    "(the main table's, or the sweep's at the same target); vs reference: each ablation row against its mode's "
    "main-table mask. A row of several seeds pools them per example (each example's outcome averaged over the "
    "seeds; k is then the averaged count) and is compared with the exact sign-flip permutation test "
    f"(memctl.stats). Verdicts at significance level {ALPHA:g}. The memorized track's count and interval are "
    "beside Exact ER (memorized); its verdicts, computed the same way, are in the parquet (`vs_origin`, `vs_ref`, "
    "`frac_vs_origin`, `frac_vs_ref` and their `_p`; the extraction-rate track's carry the `er_` prefix).\n\n"
    "Own training memories: the same tests on the forget track, only where Origin (and the `none` mask) scored "
    "every row the edit did. A mask or CSP prompt whose Exact ER there did not move the way its objective intends "
    "(`up`: higher than Origin's; `down`, `reciprocal`: lower, except a `down` mask whose t lies below the "
    "unpruned L_mem on its training memories, which intends higher, paper Fig. 4) by this two-sided test at "
    f"level {ALPHA:g} is flagged \"{OWN_FLAG.format(direction='higher/lower')}\" with its p-value in every table "
    "(parquet: `own_direction`, `own_moved`, `own_p`). The `none` comparison is paired: same sparsity, seeds, "
    "steps and lambda_s (one masks.lambda_s for every mode); a per-mode lambda_s mapping makes it \"unpaired\", "
    "said in its verdict cells.\n"
)


def _n_text(df: pd.DataFrame, col: str) -> str:
    """``N=81`` from a table's ``er_n_examples`` / ``n_examples`` (every row's, where they differ;
    empty where the metrics did not record it)."""
    if col not in df:
        return ""
    values = [int(v) for v in dict.fromkeys(df[col]) if _given(v)]
    return f"N={'/'.join(str(v) for v in values)}" if values else ""


def columns_note(df: pd.DataFrame) -> str:
    """Said under each masks table: the set each column is computed on, with the examples' N."""
    er_n, mem_n, own_n = _n_text(df, "er_n_examples"), _n_text(df, "n_examples"), _n_text(df, "forget_n_examples")
    return (
        "Columns: Exact ER and Fractional ER are the extraction-rate track: greedy extraction on the held-out "
        f"extraction-rate split (`er_test`{', ' + er_n if er_n else ''}), sampled from every candidate whatever the "
        "unedited model extracts, as the weight-pruning paper's 1,000-sequence test split of its Tables 1-2 (where "
        "Origin scores Exact ER 0.17-0.50): Origin is the unedited model's rate there. Exact ER (memorized) and "
        f"Fractional ER (memorized): the memorized test split (`memorized_test`{', ' + mem_n if mem_n else ''}), the "
        "held-out sequences the unedited model extracts exactly, so Origin is 1 there by construction (the "
        "loss-curvature paper's set). Mem. loss / Mem. PPL: teacher-forced loss and perplexity on the suffix tokens "
        "of the memorized test split. Held-out loss / PPL: the held-out text's non-overlapping windows (the "
        "`heldout` stage's, the same for every row). Exact ER / Fractional ER (own training memories): the forget "
        f"track{', ' + own_n if own_n else ''}: each trained edit scored on the memories it trained on (the masks "
        "and CSP: one seeded sample of the extraction-rate train side `er_train`, masks.own_memories; the `none` "
        "masks and Origin on the same rows; BalancedSubnet: its own forget set `memorized_train`, where Origin was not "
        "scored, so it has no test against Origin there): the papers' forget / held-out contrast, whether the "
        "objective moved the memories where it trained. In the parquet the extraction-rate track's columns carry the "
        "`er_` prefix, the own training memories' `forget_`, and the memorized track's none (as in `metrics.parquet`).\n"
    )


def scores_beside(metrics_paths: Sequence[str | Path]) -> dict[str, pd.DataFrame]:
    """edit -> per-example scores, read from the ``scores.parquet`` that the evaluate stage writes
    beside each ``metrics.parquet`` (the same job's output); edits without one are left out."""
    out = {}
    for path in metrics_paths:
        path = Path(path)
        side = path.with_name("scores.parquet")
        if path.name != "metrics.parquet" or not side.exists():
            continue
        edits = pd.read_parquet(path, columns=["edit"])["edit"]
        if len(edits) == 1:
            out[str(edits.iloc[0])] = pd.read_parquet(side)
    return out


def _edit_ids(cell) -> list[str]:
    """The edits behind a table row (several, comma-joined, where it aggregates seeds)."""
    return [e for e in str(cell).split(",") if e] if _given(cell) else []


def _row_seeds(row: Mapping[str, Any]) -> set[int]:
    """The seeds behind a table row: its ``seeds`` (a row aggregating seeds) or its ``seed``."""
    if _given(row.get("seeds")):
        return {int(x) for x in str(row["seeds"]).split(",") if x.strip()}
    return {int(row["seed"])} if _given(row.get("seed")) else set()


def none_reference(df: pd.DataFrame, spec: Sequence[Mapping[str, Any]] = ()) -> list[list[str]]:
    """Per row: the edits of the ``none`` mask a trained mask (``up``, ``down``, ``reciprocal``) is
    compared with, at the same sparsity and with the same seeds (the paired design: the same gate
    noise and data order): the ``Ours (none)`` row of the same table at the row's target sparsity
    with the row's seeds, else the main table's ``none`` masks of those seeds when the target is
    theirs. Empty for every other row, and where no ``none`` mask has the row's seeds.
    :func:`pairing` says where the two differ in lambda_s."""
    main_none = [e for e in spec if e.get("mode") == "none" and "main" in e.get("tables", [])]
    records = df.to_dict("records")
    out = []
    for row in records:
        if row.get("family") != "ours" or row.get("mode") not in ("up", "down", "reciprocal"):
            out.append([])
            continue
        target, seeds = row.get("target_sparsity"), _row_seeds(row)
        same = [r for r in records if r.get("mode") == "none" and r.get("family") == "ours"
                and _close(r.get("target_sparsity"), target) and r.get("method", "").startswith("Ours (none)")
                and _row_seeds(r) == seeds]
        if same:
            out.append([e for r in same for e in _edit_ids(r["edit"])])
        else:
            out.append([e["edit"] for e in main_none if _close(e.get("sparsity"), target)
                        and (not seeds or (_given(e.get("seed")) and int(e["seed"]) in seeds))])
    return out


def pairing(df: pd.DataFrame, references: Sequence[Sequence[str]], spec: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per row: "" where the row and its ``none`` reference share lambda_s (the paired design), else
    why the comparison is unpaired (a per-mode ``masks.lambda_s`` mapping, e.g. the paper's presets)."""
    by_edit = {e["edit"]: e for e in spec}
    out = []
    for row, refs in zip(df.to_dict("records"), references, strict=True):
        own = row.get("lambda_s")
        theirs = sorted({float(by_edit[e]["lambda_s"]) for e in refs
                         if e in by_edit and _given(by_edit[e].get("lambda_s"))})
        if refs and _given(own) and theirs and theirs != [float(own)]:
            out.append(f"unpaired: lambda_s {float(own):g} vs `none` {'/'.join(f'{v:g}' for v in theirs)}")
        else:
            out.append("")
    return out


#: The verdict columns against the ``none`` mask that :func:`mark_unpaired` prefixes.
REF_VERDICTS = ("er_vs_ref", "er_frac_vs_ref", "vs_ref", "frac_vs_ref", "forget_vs_ref", "forget_frac_vs_ref")


def mark_unpaired(df: pd.DataFrame, reasons: Sequence[str]) -> pd.DataFrame:
    """``df`` with an ``unpaired`` column (the reason, or None) and each verdict against the ``none``
    mask prefixed with it, so an unpaired comparison never reads as a paired one."""
    if df.empty:
        return df
    df = df.copy()
    df["unpaired"] = [r or None for r in reasons]
    for col in REF_VERDICTS:
        if col in df:
            df[col] = [f"{r}; {v}" if r and _given(v) and v != "-" else v for r, v in zip(reasons, df[col], strict=True)]
    return df


def intended_direction(row: Mapping[str, Any]) -> str | None:
    """Which way an edit's objective moves Exact ER on its own training memories: ``higher`` (masks
    ``up``; CSP ``up``; a ``down`` mask whose t lies below the unpruned model's L_mem on them, which
    its job measured: the paper's amplification by threshold, Fig. 4), ``lower`` (``down``,
    ``reciprocal``, CSP ``down``), None (``none``, Origin, the baselines, BalancedSubnet: no
    direction to check here)."""
    family, mode = row.get("family"), row.get("mode")
    if family == "csp":
        return {"up": "higher", "down": "lower"}.get(mode)
    if family != "ours":
        return None
    if mode == "up":
        return "higher"
    if mode == "reciprocal":
        return "lower"
    if mode == "down":
        t, base = row.get("threshold"), row.get("unpruned_mem_loss")
        return "higher" if _given(t) and _given(base) and float(t) < float(base) else "lower"
    return None


def with_own_flags(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` (after :func:`with_tests`) with, per row, the direction its objective intends on its own
    training memories (``own_direction``), whether they moved that way by the paired test against
    Origin on the same rows (``own_moved``: the exact McNemar / seed-pooled sign-flip test at
    :data:`memctl.stats.ALPHA`, the difference's sign in that direction; None where there is no
    direction or no test) and that test's p-value (``own_p``). A False ``own_moved`` is the flag."""
    if df.empty:
        return df
    df = df.copy()
    directions, moved, pvalues = [], [], []
    for row in df.to_dict("records"):
        direction = intended_direction(row)
        p, diff = row.get("forget_vs_origin_p"), row.get("forget_vs_origin_diff")
        directions.append(direction)
        if direction is None or not _given(p) or not _given(diff):
            moved.append(None)
            pvalues.append(p if _given(p) else math.nan)
            continue
        sign_ok = diff > 0 if direction == "higher" else diff < 0
        moved.append(bool(sign_ok and float(p) < ALPHA))
        pvalues.append(float(p))
    df["own_direction"], df["own_moved"], df["own_p"] = directions, moved, pvalues
    return df


def own_flagged(row) -> bool:
    """True where :func:`with_own_flags` found the own training memories not moved as intended."""
    value = row.get("own_moved")
    return isinstance(value, (bool, np.bool_)) and not bool(value)


def ablation_reference(df: pd.DataFrame) -> list[list[str]]:
    """Per ablations row: the edits of its mode's reference row in the same ablation (the main-table
    mask); empty for the reference rows themselves."""
    out = []
    rows = df.to_dict("records")
    for row in rows:
        if row.get("reference"):
            out.append([])
            continue
        refs = [r for r in rows if r.get("reference") and r.get("ablation") == row.get("ablation")
                and str(r.get("method", "")).split(",")[0] == str(row.get("method", "")).split(",")[0]]
        out.append([e for r in refs for e in _edit_ids(r["edit"])])
    return out


def _close(a, b) -> bool:
    return _given(a) and _given(b) and abs(float(a) - float(b)) < 1e-9


def with_tests(df: pd.DataFrame, scores: Mapping[str, pd.DataFrame] | None,
               references: Sequence[Sequence[str]] | None = None) -> pd.DataFrame:
    """``df`` (a masks table) with, per track of :data:`TEST_TRACKS`, each row's Exact ER count and
    exact interval, Fractional ER bootstrap interval, and paired tests against Origin (edit
    ``none``) and against ``references[i]`` (edits; several seeds pooled per example); the held-out
    perplexity ratio's paired test against Origin. Without ``scores`` the table is unchanged."""
    if not scores or df.empty:
        return df
    from memctl import report as shared

    df = df.copy()
    references = references if references is not None else [[] for _ in range(len(df))]
    origin = scores.get("none")
    for prefix, track in TEST_TRACKS:
        cols: dict[str, list] = {c: [] for c in (
            "exact_count", "exact_ci", "fractional_ci", "vs_origin", "vs_origin_p", "vs_origin_diff", "frac_vs_origin",
            "frac_vs_origin_p", "vs_ref", "vs_ref_p", "frac_vs_ref", "frac_vs_ref_p")}
        ref_origin = shared.track_part(origin, track)
        for row, ref_edits in zip(df.to_dict("records"), references):
            edits = _edit_ids(row["edit"])
            parts = [shared.track_part(scores.get(e), track) for e in edits]
            parts = [] if any(p is None for p in parts) else parts
            own = shared.unit_summary(parts) if parts else {}
            cols["exact_count"].append(shared._count_text(own.get("exact_k", 0), own.get("n", 0)))
            cols["exact_ci"].append(shared._ci_text(own.get("exact_er_lo", math.nan), own.get("exact_er_hi", math.nan)))
            cols["fractional_ci"].append(shared._ci_text(own.get("fractional_lo", math.nan),
                                                         own.get("fractional_hi", math.nan)))
            vs_origin = {} if not parts or edits == ["none"] or ref_origin is None else shared.paired_tests(
                parts, [ref_origin])
            ref_parts = [shared.track_part(scores.get(e), track) for e in ref_edits]
            vs_ref = {} if not parts or not ref_parts or any(p is None for p in ref_parts) else shared.paired_tests(
                parts, ref_parts)
            if track in SAME_ROWS_TRACKS:  # only on the same rows: never on a partial overlap
                vs_origin = vs_origin if ref_origin is not None and _covers([ref_origin], parts) else {}
                vs_ref = vs_ref if _covers(ref_parts, parts) else {}
            for col, tests in (("vs_origin", vs_origin), ("vs_ref", vs_ref)):
                for name, key in (("exact", col), ("fractional", f"frac_{col}")):
                    cols[key].append(stats.verdict(tests.get(name)) if ref_edits or col == "vs_origin" else "-")
                    cols[f"{key}_p"].append(tests[name].pvalue if name in tests else math.nan)
            # Exact ER of the row minus Origin's on the same examples (the sign the own-memories flag reads)
            cols["vs_origin_diff"].append(vs_origin["exact"].estimate if "exact" in vs_origin else math.nan)
        for col, values in cols.items():
            df[f"{prefix}{col}"] = values
    verdicts, pvalues = [], []
    for row in df.to_dict("records"):
        edits = _edit_ids(row["edit"])
        test = None
        if edits and edits != ["none"] and origin is not None:
            held = [shared.track_part(scores.get(e), "heldout") for e in edits]
            base = shared.track_part(origin, "heldout")
            if base is not None and all(h is not None and len(h) == len(base) for h in held):
                base = base.sort_values("window")
                nll = np.vstack([h.sort_values("window")["nll_sum"].to_numpy() for h in held])
                test = stats.compare_perplexity(nll, base["nll_sum"].to_numpy(), int(base["n_tokens"].iloc[0]))
        verdicts.append(stats.verdict(test))
        pvalues.append(test.pvalue if test is not None else math.nan)
    df["ppl_vs_origin"], df["ppl_vs_origin_p"] = verdicts, pvalues
    return df


def _covers(tables: Sequence[pd.DataFrame | None], parts: Sequence[pd.DataFrame], key: str = "candidate_id") -> bool:
    """Whether every table of ``tables`` scored every row of ``parts`` (matched on ``key``)."""
    if not tables or not parts or any(t is None for t in tables):
        return False
    if not all(key in t for t in [*tables, *parts]):
        return all(len(t) == len(parts[0]) for t in [*tables, *parts])
    rows = set().union(*(set(p[key]) for p in parts))
    return all(rows <= set(t[key]) for t in tables)


def with_test_columns(df: pd.DataFrame, columns: Sequence[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """``columns`` with the tests' columns (where :func:`with_tests` added them) after the value each
    belongs to. Extraction-rate track (the Exact / Fractional ER columns): count, interval and verdicts
    after Exact ER, interval and verdicts after Fractional ER. Memorized track: its count and interval
    after Exact ER (memorized) (its verdicts stay in the parquet). The perplexity verdict after
    held-out PPL."""
    against = "vs reference" if "reference" in df else "vs `none` mask"
    where = {_paper_column(*entry)[0]: entry[:2] for entry in PAPER_METRICS}
    out = []
    for col, head, fmt in columns:
        out.append((col, head, fmt))
        track, key = where.get(col, (None, None))
        extra: list[tuple[str, str, str]] = []
        if (track, key) in TEST_PARTS:
            extra = metric_records.by_key(key).columns(TEST_PARTS[track, key], metric_records.PREFIXES[track],
                                                       label=TRACK_LABELS[track], against=against)
        elif col == "heldout_ppl":
            extra = [metric_records.PPL_RATIO.column("verdict")]
        out += [c for c in extra if c[0] in df]
    return out


def _fmt(value, fmt: str) -> str:
    from memctl.report import md_cell

    if not _given(value):
        return "-"
    return md_cell(fmt.format(value))  # a | in a label stays inside its cell


def markdown(df: pd.DataFrame, title: str, lead: Sequence[tuple[str, str, str]] = (),
             trail: Sequence[tuple[str, str, str]] = ()) -> str:
    """A markdown table: ``lead`` columns, then the paper's columns, then ``trail`` (the cost columns)."""
    # the own-training-memories columns where some row was scored there (metrics of older runs were not)
    own = "forget_exact_er" in df and df["forget_exact_er"].map(_given).any()
    shown = [c for c in with_test_columns(df, COLUMNS) if own or not c[0].startswith("forget_")]
    cols = [("method", "Method", "{}"), *lead, *shown, *trail]
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
        if own_flagged(row):
            bits.append(f"**{OWN_FLAG.format(direction=row.get('own_direction'))}** (paired test on the same rows, "
                        f"{stats.format_p(float(row['own_p']))}): its objective did not move its own training memories "
                        f"{row.get('own_direction')} where it trained")
        if _given(row.get("unpaired")):
            bits.append(f"{row['unpaired']}: its comparison with the `none` mask is not the paired design")
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


#: (scores track, how the power note names it)
POWER_TRACKS = (("extraction_rate", "extraction-rate test split (`er_test`)"),
                ("forget", "own training memories (the masks' sample of `er_train`)"))


def _fractional(part: pd.DataFrame) -> np.ndarray:
    return part["n_match"].to_numpy(dtype=np.float64) / np.maximum(part["n_suffix"].to_numpy(dtype=np.float64), 1)


def power_rows(scores: Mapping[str, pd.DataFrame] | None, spec: Sequence[Mapping[str, Any]] = ()) -> list[dict]:
    """Per track of :data:`POWER_TRACKS` that Origin scored: N, Origin's exact count, the near-threshold
    pool (:func:`memctl.power.near_threshold`: fractional ER in [0.2, 0.9] without exact extraction) and
    the smallest Exact ER difference against Origin detectable at alpha 0.05 with 80% power by the exact
    McNemar test (:func:`memctl.power.minimum_detectable_difference`): with flips one way only (the
    floor), and with flips the other way at the rate the main table's first-seed `none` mask shows
    against Origin on the same rows (pruning's churn at this sparsity), where it was scored."""
    from memctl import power
    from memctl import report as shared

    origin = (scores or {}).get("none")
    nones = sorted((e for e in spec if e.get("family") == "ours" and e.get("mode") == "none"
                    and "main" in e.get("tables", [])), key=lambda e: (e.get("seed") is None, e.get("seed") or 0))
    out = []
    for track, name in POWER_TRACKS:
        part = shared.track_part(origin, track)
        if part is None or not {"exact_match", "n_match", "n_suffix"} <= set(part.columns):
            continue
        n = int(len(part))
        exact = part["exact_match"].to_numpy(dtype=bool)
        row = {"track": track, "name": name, "n": n, "origin_exact": int(exact.sum()),
               "near_threshold": power.near_threshold(_fractional(part), exact),
               "mdd_one_way": power.minimum_detectable_difference(n).delta,
               "background": math.nan, "mdd_with_background": math.nan, "background_edit": None}
        none_part = shared.track_part((scores or {}).get(nones[0]["edit"]), track) if nones else None
        if none_part is not None and _covers([none_part], [part]):
            a, b = shared.aligned_units([[none_part], [part]]) or (None, None)
            if a is not None and len(a) == n:
                flips = stats.mcnemar(a["exact_match"].to_numpy(dtype=bool), b["exact_match"].to_numpy(dtype=bool))
                background = min((flips.row_only + flips.ref_only) / (2 * n), 0.499)
                row.update(background=background, background_edit=nones[0]["edit"],
                           mdd_with_background=power.minimum_detectable_difference(n, background).delta)
        out.append(row)
    return out


def power_note(rows: Sequence[Mapping[str, Any]]) -> str:
    """The power paragraph under the main table (:func:`power_rows`)."""
    if not rows:
        return ""

    def delta(v) -> str:
        return "none reaches 80% power" if not _given(v) else f"{v:.3f}"

    lines = ["Power (memctl.power; one mask against Origin, the exact McNemar test at alpha 0.05, 80% power, "
             "exact over the binomial number of discordant examples):"]
    for r in rows:
        text = (f"- {r['name']}: N={r['n']}, Origin extracts {r['origin_exact']} exactly; near-threshold pool "
                f"(Origin's fractional ER in [0.2, 0.9] without exact extraction) {r['near_threshold']}; smallest "
                f"detectable Exact ER difference {delta(r['mdd_one_way'])} if the edit flips examples one way only "
                f"(the floor)")
        if _given(r.get("background")):
            text += (f", {delta(r['mdd_with_background'])} if it also flips the other way at the rate the `none` "
                     f"mask shows against Origin ({r['background']:.3f} per direction)")
        up_room = (r["n"] - r["origin_exact"]) / r["n"] if r["n"] else math.nan
        text += f"; amplification can reach at most {up_room:.3f} (the examples Origin does not extract)."
        lines.append(text)
    return "\n".join(lines) + "\n"


def unpruned_loss(df: pd.DataFrame) -> tuple[float, str] | None:
    """(median, text) of the unpruned model's L_mem on the masks' training memories that the rows'
    train_mask jobs measured (the ``unpruned_mem_loss`` of their deltas), or None where none did."""
    if df.empty or "unpruned_mem_loss" not in df:
        return None
    rows = df[(df["family"] == "ours") & df["unpruned_mem_loss"].map(_given)]
    if rows.empty:
        return None
    values = rows["unpruned_mem_loss"].astype(float)
    tokens = sorted({str(t) for t in rows.get("mem_loss_tokens", pd.Series(dtype=object)) if _given(t)})
    spread = "" if values.max() - values.min() < 5e-4 else f" (range {values.min():.3f}-{values.max():.3f})"
    return float(values.median()), (
        f"The unpruned model's L_mem on the masks' training memories ({'/'.join(tokens) or 'full'} tokens of `er_train`, "
        f"measured by each mask job before training): {values.median():.3f} nats{spread}, the dashed vertical line "
        "of the plot. A `down` mask with t above it suppresses; with t below it, the same objective lowers L_mem "
        "(the paper's amplification by threshold, Fig. 4), and its flag direction is `higher`.\n")


def _panel_label(df: pd.DataFrame, col: str, label: str) -> str:
    """An axis label with the N of the track a rate column belongs to (``er_`` / memorized)."""
    n = _n_text(df, "er_n_examples" if col.startswith("er_") else "n_examples")
    return f"{label}, {n}" if n and col.endswith(("exact_er", "fractional_er")) else label


def plot_ablation(df: pd.DataFrame, x: str, panels: Sequence[tuple[str, str]], path, title: str,
                  origin: Mapping[str, float] | None = None,
                  vlines: Sequence[tuple[float, str]] = (), provenance=None) -> None:
    """One panel per ``(column, label)`` of ``panels`` against ``x``, one line per method in its
    family's colour and marker (:mod:`memctl.plots`; the methods of one family told apart by the
    dash); the default panels (:data:`SPARSITY_PANELS`, :data:`THRESHOLD_PANELS`) plot the
    extraction-rate track's rates, as the paper's Figs. 3-4 do. Writes ``path`` (PNG) and the SVG
    beside it (with ``provenance``: their sidecars)."""
    from memctl import plots

    flagged = df["converged"].map(unconverged) if "converged" in df.columns else pd.Series(False, index=df.index)
    dashes = ["-", "--", ":", "-."]
    with plots.style():
        fig, axes = plots.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (col, label) in zip(axes[0], panels, strict=True):
            crossed = False
            seen: dict[str, int] = {}
            for method, group in df.groupby("method", sort=True):
                group = group.sort_values(x)
                family = plots.family_of(df.loc[group.index[0]].to_dict(), str(method))
                style = plots.family_style(family)
                k = seen[family] = seen.get(family, -1) + 1
                bad = flagged.loc[group.index]
                ax.plot(group[x], group[col], linestyle=dashes[k % len(dashes)], **style.line_kwargs(),
                        label=f"{method} ({UNCONVERGED}: x)" if bad.any() else method)
                if bad.any():  # a cross over every point that did not converge
                    ax.scatter(group[x][bad], group[col][bad], marker="x", s=90, color=plots.PALETTE["vermillion"],
                               zorder=5, label=None if crossed else UNCONVERGED)
                    crossed = True
            if origin and col in origin and _given(origin[col]):
                ax.axhline(origin[col], color=plots.REFERENCE, linestyle="--", linewidth=1, label="Origin")
            for value, text in vlines:  # e.g. the unpruned L_mem on the threshold axis
                ax.axvline(value, color="black", linestyle=":", linewidth=1.2, label=text)
            ax.set_xlabel("target sparsity" if x == "target_sparsity" else "learning threshold t")
            ax.set_ylabel(_panel_label(df, col, label), fontsize=8)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        plots.save(fig, path, provenance)


#: The ablation plots' panels: the extraction-rate track's rates (the paper's Figs. 3-4 split), then
#: the utility (and, for the threshold, the memorized-suffix loss t bounds).
SPARSITY_PANELS = [("er_exact_er", "Exact ER (extraction-rate split)"),
                   ("er_fractional_er", "Fractional ER (extraction-rate split)"), ("heldout_ppl", "held-out PPL")]
THRESHOLD_PANELS = [("er_exact_er", "Exact ER (extraction-rate split)"),
                    ("er_fractional_er", "Fractional ER (extraction-rate split)"),
                    ("mem_loss", "memorized-suffix loss (memorized split)"), ("heldout_loss", "held-out loss")]
