"""Tables and plots that read like the papers' tables.

``results.md`` holds one row per (model, edit); later methods add rows by adding metrics files.
The extraction curve (exact extraction by exposure count) is a table and a plot. ``results.html``
(:func:`results_html`) is the page a user opens first: one self-contained file with the summary
table, the frontier plot, the by-copies plots and the masks table and plots, every figure embedded
and captioned with the configuration; the figures are drawn in the style of :mod:`memctl.plots`.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memctl import metric_records
from memctl import stats
from memctl.splits import SPLITS, UNDERPOWERED, split_warnings  # noqa: F401 (split_warnings: re-exported)

#: The columns every results table opens with and ends on (not metrics: the row's identity). The
#: convergence marker shows only where the metrics carry it (a trained edit's delta says converged:
#: false when written with on_unconverged: flag): "no" marks a result that is not the method's.
LEAD_COLUMNS = [("method", "Method", "{}"), ("settings", "Settings", "{}"), ("converged", "Converged", "{}")]
EDIT_COLUMN = ("edit", "Edit id", "{}")  # the hash: a detail (Settings tells the rows apart)

#: The metrics of the one-value-per-metric results table, in the order the papers print them.
RESULT_METRICS = ("heldout_loss", "heldout_ppl", "fractional_er", "exact_er", "loose_accuracy", "avg_levenshtein",
                  "mem_loss", "mem_ppl", "ndcg10")
# (column, header, format): headers and formats from the metrics' records (memctl.metric_records).
RESULT_COLUMNS = [*LEAD_COLUMNS, *(metric_records.by_key(k).column() for k in RESULT_METRICS), ("n_examples", "N", "{}"),
                  EDIT_COLUMN]

def md_cell(text) -> str:
    """``text`` as one markdown table cell: a ``|`` in a label (a user's edit label, a model name)
    must not shift the columns, a newline must not end the row."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def split_row(line: str) -> list[str]:
    """The cells of a markdown table row written with :func:`md_cell` (escapes undone)."""
    cells = re.split(r"(?<!\\)\|", line.strip())
    if cells and not cells[0].strip():
        cells = cells[1:]
    if cells and not cells[-1].strip():
        cells = cells[:-1]
    return [re.sub(r"\\(.)", r"\1", c).strip() for c in cells]


def _fmt(value, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # the converged marker
        return "yes" if value else "no (did not converge)"
    try:
        return md_cell(pattern.format(value))
    except (ValueError, TypeError):
        return md_cell(value)


def markdown_table(df: pd.DataFrame, columns: Sequence[tuple[str, str, str]]) -> str:
    # the convergence marker only where some edit did not converge
    cols = [c for c in columns if c[0] in df.columns
            and not (c[0] == "converged" and df[c[0]].fillna(True).astype(bool).all())]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |"]
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|")
    for rec in df.to_dict("records"):
        lines.append("| " + " | ".join(_fmt(rec[c], f) for c, _, f in cols) + " |")
    return "\n".join(lines)


#: The order of each track table's metrics (:func:`track_columns`); a record naming the track that is
#: not listed here follows them (memctl.metric_records.on_track).
TRACK_ORDER = {
    "extraction_rate": ("exact_er", "fractional_er", "heldout_ppl", "ppl_ratio"),
    "memorized": ("heldout_loss", "heldout_ppl", "ppl_ratio", "fractional_er", "exact_er", "loose_accuracy",
                  "avg_levenshtein", "mem_loss", "mem_ppl", "ndcg10", "ndcg10_text"),
    "ood": ("exact_er", "fractional_er", "loose_accuracy"),
}


def track_columns(track: str) -> list[tuple[str, str, str]]:
    """The columns of a track's table in ``results.md``: every metric record that names the track
    (value, then its count, interval and verdict against Origin where it has them), its N, the edit."""
    prefix = metric_records.PREFIXES[track]
    cols = list(LEAD_COLUMNS)
    for metric in metric_records.on_track(track, TRACK_ORDER.get(track, ())):
        cols += metric.columns(prefix=prefix)
    return [*cols, (f"{prefix}n_examples", "N", "{}"), EDIT_COLUMN]


ER_COLUMNS = track_columns("extraction_rate")

#: (column prefix, track) of the generation tracks that :func:`with_intervals` tests.
TRACKS = (("", "memorized"), ("er_", "extraction_rate"), ("ood_", "ood"), ("ood_nonmem_", "ood_nonmemorized"))
#: Per-example score columns the paired tests read.
UNIT_COLUMNS = metric_records.unit_columns()


def _ci_text(lo: float, hi: float) -> str:
    return "-" if lo is None or hi is None or math.isnan(lo) or math.isnan(hi) else f"[{lo:.3f}, {hi:.3f}]"


def _count_text(k: float, n: int) -> str:
    """``k/N`` of a rate (a seed-averaged count keeps two decimals)."""
    if not n:
        return "-"
    return f"{int(k)}/{n}" if float(k).is_integer() else f"{k:.2f}/{n}"


def track_part(table: pd.DataFrame | None, track: str) -> pd.DataFrame | None:
    """The rows of one track of a per-example scores table (None where the table has none)."""
    if table is None or "track" not in table:
        return None
    part = table[table["track"] == track]
    return part if len(part) else None


def aligned_units(groups: Sequence[Sequence[pd.DataFrame]], key: str = "candidate_id") -> list[pd.DataFrame] | None:
    """The per-example (or per-window) rows that every table of ``groups`` shares, each table
    reduced to them in one order: joined on ``key`` where every table has it, else by position
    when all have the same length. None when they cannot be paired."""
    tables = [t for group in groups for t in group]
    if not tables or any(t is None for t in tables):
        return None
    if all(key in t for t in tables):
        common = set(tables[0][key])
        for t in tables[1:]:
            common &= set(t[key])
        if not common:
            return None
        out = []
        for t in tables:
            part = t[t[key].isin(common)].drop_duplicates(key)
            out.append(part.sort_values(key, kind="stable").reset_index(drop=True))
        return out
    if len({len(t) for t in tables}) != 1:
        return None
    return [t.reset_index(drop=True) for t in tables]


def _stack(tables: Sequence[pd.DataFrame], column: str, threshold: float | None = None) -> np.ndarray:
    """seeds x units array of one column (``>= threshold`` as 0/1 when given)."""
    rows = [t[column].to_numpy(dtype=np.float64) for t in tables]
    arr = np.vstack(rows)
    return (arr >= threshold).astype(np.float64) if threshold is not None else arr


#: Loose accuracy's Levenshtein-similarity threshold (memctl.metrics.LOOSE_THRESHOLD).
LOOSE_THRESHOLD = 0.75


def unit_summary(tables: Sequence[pd.DataFrame], loose_threshold: float = LOOSE_THRESHOLD) -> dict[str, Any]:
    """Rates with exact intervals and bootstrap intervals of one row of a table: one scores table per
    seed (one for a single run), pooled per example (:mod:`memctl.stats`)."""
    tables = [t for t in tables if t is not None]
    if not tables:
        return {}
    if len(tables) > 1:
        tables = aligned_units([tables]) or tables[:1]
    out: dict[str, Any] = {}
    exact = _stack(tables, "exact_match")
    value, lo, hi, k, n = stats.rate(exact)
    out.update(exact_er=value, exact_er_lo=lo, exact_er_hi=hi, exact_k=k, n=n)
    if "levenshtein_sim" in tables[0]:
        value, lo, hi, k, _ = stats.rate(_stack(tables, "levenshtein_sim", loose_threshold))
        out.update(loose_accuracy=value, loose_lo=lo, loose_hi=hi, loose_k=k)
    if "n_match" in tables[0] and "n_suffix" in tables[0]:
        value, lo, hi = stats.fraction_interval(_stack(tables, "n_match"), tables[0]["n_suffix"].to_numpy())
        out.update(fractional_er=value, fractional_lo=lo, fractional_hi=hi)
    if "levenshtein_norm" in tables[0]:
        value, lo, hi = stats.mean_interval(_stack(tables, "levenshtein_norm"))
        out.update(avg_levenshtein=value, levenshtein_lo=lo, levenshtein_hi=hi)
    return out


def paired_tests(row: Sequence[pd.DataFrame], ref: Sequence[pd.DataFrame]) -> dict[str, stats.Comparison]:
    """A row against its reference on the examples they share (each a list of per-seed scores of
    one track): ``exact`` and ``loose`` (loose accuracy; exact McNemar, or the seed-pooled sign-flip
    test), ``fractional`` and ``levenshtein`` (paired bootstrap). Empty where they share no example."""
    row, ref = [t for t in row if t is not None], [t for t in ref if t is not None]
    if not row or not ref:
        return {}
    parts = aligned_units([row, ref])
    if parts is None or not len(parts[0]):
        return {}
    r, f = parts[: len(row)], parts[len(row):]
    out = {"exact": stats.compare_rates(_stack(r, "exact_match"), _stack(f, "exact_match"))}
    if all("levenshtein_sim" in t for t in parts):
        out["loose"] = stats.compare_rates(_stack(r, "levenshtein_sim", LOOSE_THRESHOLD),
                                           _stack(f, "levenshtein_sim", LOOSE_THRESHOLD))
    if all("n_match" in t and "n_suffix" in t for t in parts):
        out["fractional"] = stats.compare_fractions(_stack(r, "n_match"), _stack(f, "n_match"),
                                                    f[0]["n_suffix"].to_numpy())
    if all("levenshtein_norm" in t for t in parts):
        out["levenshtein"] = stats.compare_means(_stack(r, "levenshtein_norm"), _stack(f, "levenshtein_norm"))
    return out


def perplexity_test(row: pd.DataFrame | None, ref: pd.DataFrame | None) -> stats.Comparison | None:
    """Held-out perplexity of a row over its reference's: paired bootstrap over the windows both
    scored (the ``heldout`` track of the scores)."""
    row, ref = track_part(row, "heldout"), track_part(ref, "heldout")
    if row is None or ref is None or "window" not in row or "window" not in ref:
        return None
    parts = aligned_units([[row], [ref]], key="window")
    if parts is None:
        return None
    tokens = int(parts[1]["n_tokens"].iloc[0])
    return stats.compare_perplexity(parts[0]["nll_sum"].to_numpy(), parts[1]["nll_sum"].to_numpy(), tokens)


def with_intervals(metrics: pd.DataFrame, scores: dict[str, pd.DataFrame], n_boot: int | None = None) -> pd.DataFrame:
    """``metrics`` with, per generation track (memorized, extraction-rate, out-of-domain), each
    edit's exact Clopper-Pearson interval and count of Exact ER (``exact_ci``, ``exact_count``) and
    loose accuracy, bootstrap intervals of Fractional ER and average Levenshtein, and its paired
    tests against the unedited model (edit ``none``) on the same examples: ``vs_origin`` (exact
    McNemar on Exact ER), ``frac_vs_origin``, ``lev_vs_origin`` (paired bootstrap), with their
    p-values (``*_p``); the held-out perplexity ratio with its paired bootstrap interval over the
    same windows (``ppl_ratio_lo`` / ``ppl_ratio_hi``, over ``ppl_windows`` windows) and
    ``ppl_vs_origin``; and ``paper_tests`` (JSON), the comparisons the papers draw
    (:func:`paper_pairs`). Columns carry the track's prefix (``er_``, ``ood_``; none for the
    memorized track). Methods: :mod:`memctl.stats`."""
    del n_boot  # kept for callers; every bootstrap uses memctl.stats.N_BOOT and its seed
    out = metrics.copy()
    edits = list(out["edit"])
    for prefix, track in TRACKS:
        parts = {e: track_part(scores.get(e), track) for e in edits}
        ref = parts.get("none")
        cols: dict[str, list] = {c: [] for c in (
            "exact_count", "exact_ci", "exact_er_lo", "exact_er_hi", "fractional_ci", "loose_ci", "levenshtein_ci",
            "vs_origin", "vs_origin_p", "frac_vs_origin", "frac_vs_origin_p", "lev_vs_origin", "lev_vs_origin_p")}
        for edit in edits:
            own = unit_summary([parts[edit]]) if parts[edit] is not None else {}
            cols["exact_count"].append(_count_text(own.get("exact_k", 0), own.get("n", 0)))
            cols["exact_ci"].append(_ci_text(own.get("exact_er_lo", math.nan), own.get("exact_er_hi", math.nan)))
            cols["exact_er_lo"].append(own.get("exact_er_lo", math.nan))
            cols["exact_er_hi"].append(own.get("exact_er_hi", math.nan))
            cols["fractional_ci"].append(_ci_text(own.get("fractional_lo", math.nan), own.get("fractional_hi", math.nan)))
            cols["loose_ci"].append(_ci_text(own.get("loose_lo", math.nan), own.get("loose_hi", math.nan)))
            cols["levenshtein_ci"].append(_ci_text(own.get("levenshtein_lo", math.nan),
                                                   own.get("levenshtein_hi", math.nan)))
            tests = {} if edit == "none" or ref is None or parts[edit] is None else paired_tests([parts[edit]], [ref])
            for col, name in (("vs_origin", "exact"), ("frac_vs_origin", "fractional"), ("lev_vs_origin", "levenshtein")):
                cols[col].append(stats.verdict(tests.get(name)))
                cols[f"{col}_p"].append(tests[name].pvalue if name in tests else math.nan)
        for col, values in cols.items():
            out[f"{prefix}{col}"] = values
    out["ppl_ratio"], out["ppl_ratio_ci"], out["ppl_vs_origin"], out["ppl_vs_origin_p"] = math.nan, "-", "-", math.nan
    out["ppl_ratio_lo"], out["ppl_ratio_hi"], out["ppl_windows"] = math.nan, math.nan, 0
    base = scores.get("none")
    for i, edit in enumerate(edits):
        test = perplexity_test(scores.get(edit), base)
        if test is None:
            continue
        out.loc[out.index[i], "ppl_ratio"] = test.estimate
        windows = track_part(scores.get(edit), "heldout")
        out.loc[out.index[i], "ppl_windows"] = 0 if windows is None else int(windows["window"].nunique())
        if edit != "none":
            out.loc[out.index[i], "ppl_ratio_lo"], out.loc[out.index[i], "ppl_ratio_hi"] = test.lo, test.hi
            out.loc[out.index[i], "ppl_ratio_ci"] = _ci_text(test.lo, test.hi)
            out.loc[out.index[i], "ppl_vs_origin"] = stats.verdict(test)
            out.loc[out.index[i], "ppl_vs_origin_p"] = test.pvalue
    out["paper_tests"] = [json.dumps(t) for t in paper_tests(out, scores)]
    return out


#: Labels of the curvature and BalancedSubnet rows that the loss-curvature paper compares.
PAPER_KINDS = (("K-FAC", lambda m: m.startswith("K-FAC")), ("SVD", lambda m: m.startswith("SVD")),
               ("BalancedSubnet", lambda m: m == "BalancedSubnet"))
_MASK_LABEL = re.compile(r"^Ours \((?P<mode>up|down|reciprocal)\)(?P<rest>.*)$")


def paper_pairs(metrics: pd.DataFrame) -> list[tuple[str, str, tuple[str, ...], str]]:
    """(row edit, reference edit, tracks, why) of the comparisons the papers draw, among the rows
    that exist: each trained mask ``Ours (up|down|reciprocal)[, suffix]`` against ``Ours (none)``
    with the same suffix (the same seed or swept sparsity: the same sparsity), and the main-table
    mask also against ``Ours (<mode>, sparsity only)`` (the ``none`` objective at that mode's
    lambda_s, paper Table 5), on both tracks; K-FAC, SVD and BalancedSubnet against each other on
    the memorized track, where each is one row; with several K-FAC or SVD rows (a sweep) the row of
    the paper's own setting stands for its method (labelled ``K-FAC (paper: ...)`` / ``SVD (paper:
    ...)`` by memctl.curvature.selection.paper_setting), and the curvature report also compares the
    points its declared rule chooses on the validation slice."""
    if "method" not in metrics:
        return []
    by_label: dict[str, list[str]] = {}
    for edit, label in zip(metrics["edit"], metrics["method"]):
        by_label.setdefault(str(label), []).append(edit)
    unique = {label: edits[0] for label, edits in by_label.items() if len(edits) == 1}
    pairs = []
    both = ("extraction_rate", "memorized")
    for label, edit in unique.items():
        m = _MASK_LABEL.match(label)
        if not m:
            continue
        refs = [f"Ours (none){m['rest']}"] + ([f"Ours ({m['mode']}, sparsity only)"] if not m["rest"] else [])
        for ref in refs:
            if ref in unique:
                pairs.append((edit, unique[ref], both, f"{label} vs {ref}"))
    kinds = []
    for name, match in PAPER_KINDS:
        rows = [(label, edits) for label, edits in by_label.items() if match(label)]
        if len(rows) > 1:  # a sweep: the paper's own setting stands for it (declared in the config, not chosen)
            rows = [(label, edits) for label, edits in rows if label.startswith(f"{name} (paper:")]
        if len(rows) == 1 and len(rows[0][1]) == 1:
            kinds.append((name, rows[0][0], rows[0][1][0]))
    for i, (_, label_a, edit_a) in enumerate(kinds):
        for _, label_b, edit_b in kinds[i + 1:]:
            pairs.append((edit_a, edit_b, ("memorized",), f"{label_a} vs {label_b}"))
    return pairs


def paper_tests(metrics: pd.DataFrame, scores: dict[str, pd.DataFrame]) -> list[list[dict[str, Any]]]:
    """Per row of ``metrics``: its :func:`paper_pairs` comparisons as the paired tests' verdicts."""
    labels = dict(zip(metrics["edit"], metrics["method"])) if "method" in metrics else {}
    found: dict[str, list[dict[str, Any]]] = {}
    for edit, ref, tracks, _ in paper_pairs(metrics):
        for track in tracks:
            row_part, ref_part = track_part(scores.get(edit), track), track_part(scores.get(ref), track)
            if row_part is None or ref_part is None:
                continue
            tests = paired_tests([row_part], [ref_part])
            if not tests:
                continue
            row_sum, ref_sum = unit_summary([row_part]), unit_summary([ref_part])
            found.setdefault(edit, []).append({
                "reference": str(labels.get(ref, ref)), "reference_edit": ref, "track": track,
                "exact": f"{row_sum['exact_er']:.3f} vs {ref_sum['exact_er']:.3f}",
                "exact_test": stats.verdict(tests.get("exact")),
                "fractional": (f"{row_sum['fractional_er']:.3f} vs {ref_sum['fractional_er']:.3f}"
                               if "fractional_er" in row_sum and "fractional_er" in ref_sum else "-"),
                "fractional_test": stats.verdict(tests.get("fractional")),
                "levenshtein_test": stats.verdict(tests.get("levenshtein")),
            })
    return [found.get(e, []) for e in metrics["edit"]]


TRACK_NAMES = {"extraction_rate": "extraction-rate", "memorized": "memorized", "ood": "out-of-domain"}


def paper_tests_markdown(part: pd.DataFrame) -> str:
    """The comparisons the papers draw (``paper_tests`` of :func:`with_intervals`) as one table."""
    if "paper_tests" not in part:
        return ""
    rows = []
    for rec in part.to_dict("records"):
        for t in json.loads(rec["paper_tests"] or "[]"):
            rows.append({"method": rec["method"], **t, "track": TRACK_NAMES.get(t["track"], t["track"])})
    if not rows:
        return ""
    cols = [("method", "Row", "{}"), ("reference", "Against", "{}"), ("track", "Track", "{}"),
            ("exact", "Exact ER (row vs against)", "{}"), ("exact_test", "Exact McNemar", "{}"),
            ("fractional", "Fractional ER", "{}"), ("fractional_test", "Paired bootstrap (Frac. ER)", "{}"),
            ("levenshtein_test", "Paired bootstrap (Avg. Levenshtein)", "{}")]
    return markdown_table(pd.DataFrame(rows), cols)


OOD_COLUMNS = track_columns("ood")
MEMORIZED_COLUMNS = track_columns("memorized")

#: Said under the results' title: how every interval and verdict is computed.
STATS_NOTE = (
    "Every row is scored on the same examples and held-out windows, so rows are compared with paired "
    "tests (`memctl.stats`): Exact ER and loose accuracy carry exact Clopper-Pearson 95% intervals with "
    "their count k/N; Fractional ER and Avg. Levenshtein percentile-bootstrap 95% intervals over examples; "
    "'vs Origin' tests each edit against the unedited model on the same examples: the exact McNemar test "
    "(two-sided binomial test on the discordant examples) for Exact ER, a paired bootstrap (2000 seeded "
    "resamples of the shared examples) for Fractional ER and Avg. Levenshtein; PPL / Origin: held-out "
    "perplexity over the unedited model's with a paired bootstrap interval and test over the same windows. "
    f"A verdict reads lower / higher / no evidence of a difference at significance level {stats.ALPHA:g}, "
    "with its p-value."
)


#: Verdict columns of a track (with its prefix) that :func:`mark_underpowered` marks.
VERDICT_COLUMNS = metric_records.verdict_columns()


def _layers_text(layers) -> str:
    values = sorted(int(x) for x in layers)
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}"
    return ", ".join(map(str, values))


def edit_settings(record: dict[str, Any] | None, edit: str = "") -> str:
    """What tells an edit's row apart from the others of its method, from its plan record (the
    report job's ``--spec``): strength, layers, sparsity, threshold, form, seed, calibration text.
    ``none`` for the unedited model, ``-`` where no record is known."""
    if edit == "none" or (record or {}).get("family") == "origin":
        return "none"
    if not record:
        return "-"
    parts = []
    if record.get("strength") is not None:
        parts.append(f"strength {float(record['strength']):g}")
    if record.get("layers"):
        parts.append(f"layers {_layers_text(record['layers'])}")
    if record.get("sparsity") is not None:
        parts.append(f"sparsity {float(record['sparsity']):g}")
    if record.get("threshold") is not None:
        parts.append(f"{'theta' if record.get('method') == 'csp' else 'threshold'} {float(record['threshold']):g}")
    if record.get("form") not in (None, "none", "sequential"):
        parts.append(str(record["form"]).replace("_", "-"))
    if record.get("seed") is not None:
        parts.append(f"seed {int(record['seed'])}")
    if record.get("calibration"):
        parts.append(f"calibration {record['calibration']}")
    if not parts and record.get("mode"):
        parts.append(f"mode {record['mode']}")
    return ", ".join(parts) or "-"


def with_settings(metrics: pd.DataFrame, records: Sequence[dict[str, Any]] = ()) -> pd.DataFrame:
    """``metrics`` with a ``settings`` column (:func:`edit_settings` of each row's edit record)."""
    by_edit = {str(r.get("edit")): r for r in records}
    out = metrics.copy()
    out["settings"] = [edit_settings(by_edit.get(str(e)), str(e)) for e in out["edit"]] if "edit" in out else "-"
    return out


def split_sizes(metrics: pd.DataFrame) -> dict[str, int]:
    """The sizes of :data:`SPLITS` as the evaluation saw them (the unedited model's row, else the first)."""
    if metrics.empty:
        return {}
    rows = metrics[metrics["edit"] == "none"] if "edit" in metrics else metrics
    row = (rows if len(rows) else metrics).iloc[0]
    return {table: row[col] for table, col, _, _ in SPLITS if col in row.index and pd.notna(row[col])}


def mark_underpowered(metrics: pd.DataFrame) -> pd.DataFrame:
    """``metrics`` with ``<track>underpowered`` per test track and '; underpowered' after each 'no
    evidence of a difference' verdict of a track whose N is below :func:`memctl.stats.min_n_for_width`
    (the paired tests of ``paper_tests`` too; :func:`_mark`). Idempotent."""
    out = metrics.copy()
    need = stats.min_n_for_width()
    small = {}
    for _, col, prefix, _ in SPLITS:
        if prefix is None:
            continue
        n = out[col].fillna(0).astype(float) if col in out else pd.Series(0.0, index=out.index)
        flag = (n > 0) & (n < need)
        small[prefix] = flag
        out[f"{prefix}{UNDERPOWERED}"] = flag.to_numpy()
        for verdict in VERDICT_COLUMNS:
            name = f"{prefix}{verdict}"
            if name in out:
                out[name] = [_mark(v) if f else v for v, f in zip(out[name], flag)]
    if "paper_tests" in out:
        track_prefix = {"extraction_rate": "er_", "memorized": "", "ood": "ood_"}
        marked = []
        for i, tests in enumerate(out["paper_tests"]):
            entries = json.loads(tests or "[]")
            for t in entries:
                prefix = track_prefix.get(t.get("track"))
                if prefix is not None and bool(small[prefix].iloc[i]):
                    for key in ("exact_test", "fractional_test", "levenshtein_test"):
                        if key in t:
                            t[key] = _mark(t[key])
            marked.append(json.dumps(entries))
        out["paper_tests"] = marked
    return out


def _mark(verdict) -> str:
    """A 'no evidence of a difference' verdict of a small track, marked: a significant verdict stands
    at any N (the exact and bootstrap tests hold their level), an absent difference does not."""
    text = str(verdict)
    if not text.startswith("no evidence") or text.endswith(UNDERPOWERED):
        return text
    return f"{text}; {UNDERPOWERED}"


def warnings_markdown(metrics: pd.DataFrame) -> str:
    """The split-size warnings of ``metrics`` (:func:`split_warnings`) as a section, or ''."""
    lines = split_warnings(split_sizes(metrics))
    if not lines:
        return ""
    return "\n".join(["## Warnings", "", *(f"- **{w.split(':', 1)[0]}:**{w.split(':', 1)[1]}" for w in lines)])


#: Said first under the results' title: what the two tracks are and what each metric means.
TRACKS_NOTE = (
    "Two evaluation tracks. Extraction-rate track (weight-pruning paper Sec. 4.1): greedy generation on a "
    "held-out split of all candidates, stratified by group and copy count, whatever the unedited model "
    "extracts. Memorized track (loss-curvature paper Sec. 4.2): held-out sequences the unedited model "
    "extracts exactly (so its Exact ER there is 1 by construction). Exact ER = strict accuracy; Fractional "
    "ER = matching suffix positions pooled; loose = token Levenshtein similarity >= 0.75. Held-out PPL is "
    "corpus perplexity over non-overlapping context-length windows; Mem. loss/PPL is teacher-forced on the "
    "memorized suffixes. nDCG@10 compares each position's top-10 next tokens with the unedited model's "
    "(1 = unchanged): on non-memorized held-out sequences (the loss-curvature paper's column) and on held-out "
    "text windows (text)."
)


def _prepared(metrics: pd.DataFrame) -> pd.DataFrame:
    """``metrics`` with the underpowered marks and the Settings column (each added once)."""
    if "er_" + UNDERPOWERED not in metrics:
        metrics = mark_underpowered(metrics)
    if "settings" not in metrics:
        metrics = with_settings(metrics)
    return metrics


def results_details_markdown(metrics: pd.DataFrame) -> str:
    """The body of :func:`results_markdown` after its title and warnings: the notes, then per model
    both tracks, the out-of-domain family and the papers' paired comparisons."""
    metrics = _prepared(metrics)
    parts = [TRACKS_NOTE, "", STATS_NOTE]
    for model, part in metrics.groupby("model", sort=True):
        parts += ["", f"## {model}"]
        if "er_n_examples" in part and (part["er_n_examples"].fillna(0) > 0).any():
            parts += ["", "### Extraction-rate track", "", markdown_table(part, track_columns("extraction_rate"))]
        parts += ["", "### Memorized track", "", markdown_table(part, track_columns("memorized"))]
        if "ood_n_examples" in part and (part["ood_n_examples"].fillna(0) > 0).any():
            parts += ["", "### Out-of-domain family", "",
                      "A candidate group held out of everything the edits train or are tuned on "
                      "(`extract.ood_group`; the demo's quotes), scored on a short suffix "
                      "(`extract.ood_suffix_len`, the loss-curvature paper's 8 tokens), all of its "
                      "candidates whatever the unedited model extracts.", "",
                      markdown_table(part, track_columns("ood"))]
        paper = paper_tests_markdown(part)
        if paper:
            parts += ["", "### The papers' comparisons, paired", "",
                      "Each trained mask against the `none` mask of the same seed or swept sparsity (and the "
                      "main-table mask against the `none` objective at its mode's lambda_s: the sparsity-only "
                      "ablation, paper Table 5), on both tracks; K-FAC, SVD and BalancedSubnet against each "
                      "other on the memorized track, each method by its single row or, in a sweep, by the row of "
                      "the loss-curvature paper's own setting (K-FAC keeping 80% of energy, SVD the top 20%, "
                      "MLPs 0-2; curvature.md also compares the points a declared rule chooses on the "
                      "validation slice, our addition). Verdicts are the row's against the "
                      "reference's on the examples both scored.", "", paper]
    return "\n".join(parts)


def results_markdown(metrics: pd.DataFrame, data: str = "") -> str:
    """Both evaluation tracks per model (intervals and paired tests where :func:`with_intervals`
    added them), the comparisons the papers draw, then ``data`` (:func:`data_markdown`)."""
    metrics = _prepared(metrics)
    parts = ["# memctl results", ""]
    warn = warnings_markdown(metrics)
    if warn:
        parts += [warn, ""]
    parts.append(results_details_markdown(metrics))
    return "\n".join(parts) + "\n" + data


def data_markdown(records: dict[str, dict]) -> str:
    """What the data stages kept and dropped, from their sidecars (``records``: stage -> sidecar;
    calibration ones as ``calibration (<text>)``, one row each):
    candidate rows dropped (too short, ...), training rows and calibration windows dropped for
    sharing a run of tokens with a test sequence."""
    rows = []
    cand = records.get("candidates")
    if cand:
        stats, dropped = cand.get("stats") or {}, cand.get("dropped") or {}
        why = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in dropped.items() if v) or "-"
        rows.append({"stage": "candidates", "kept": f"{stats.get('kept', '?')} of {stats.get('rows', '?')} rows",
                     "dropped": str(sum(int(v) for v in dropped.values())), "why": why})
    ext = records.get("extract")
    if ext and ext.get("dropped_for_test_overlap") is not None:
        dropped, counts = ext["dropped_for_test_overlap"], ext.get("counts") or {}
        for name in ("er_train", "memorized_train"):
            if name in dropped:
                rows.append({"stage": f"extract ({name})", "kept": f"{counts.get(name, '?')} rows",
                             "dropped": str(dropped[name]), "why": "shares a token run with a test sequence"})
    for stage, cal in records.items():  # one row per calibration text (`calibration` or `calibration (<text>)`)
        if stage.split(" ", 1)[0] != "calibration" or not cal.get("dropped_for_test_overlap"):
            continue
        d = cal["dropped_for_test_overlap"]
        rows.append({"stage": stage, "kept": f"{cal.get('windows', '?')} of {d.get('of', '?')} windows",
                     "dropped": str(d.get("windows", 0)), "why": f"shares a {d.get('ngram')}-token run with a test sequence"})
    if not rows:
        return ""
    cols = [("stage", "Stage", "{}"), ("kept", "Kept", "{}"), ("dropped", "Dropped", "{}"), ("why", "Why", "{}")]
    return "\n## Data\n\nWhat the data stages dropped (from their provenance sidecars).\n\n" + markdown_table(
        pd.DataFrame(rows), cols) + "\n"


def edits_by_copies(scores: dict[str, pd.DataFrame], labels: dict[str, str],
                    track: str = "extraction_rate") -> pd.DataFrame:
    """Every metric of every edit per copy-count bucket (powers of two, as :func:`bucket_copies`)
    on one track; candidates without counts form the bucket -1."""
    from memctl import metrics as m

    rows = []
    for edit, table in scores.items():
        part = table[table["track"] == track] if "track" in table else table.iloc[0:0]
        if part.empty or "copies" not in part:
            continue
        buckets = part["copies"].fillna(-1).map(lambda c: 1 << max(int(c) - 1, 0).bit_length() if c > 0 else -1)
        for bucket, chunk in part.groupby(buckets, sort=True):
            rows.append({"edit": edit, "method": labels.get(edit, edit), "copies": int(bucket), "n": int(len(chunk)),
                         "exact_er": m.exact_er(chunk), "fractional_er": m.fractional_er(chunk),
                         "loose_accuracy": m.loose_accuracy(chunk)})
    return pd.DataFrame(rows, columns=["edit", "method", "copies", "n", "exact_er", "fractional_er", "loose_accuracy"])


def edits_by_copies_markdown(table: pd.DataFrame) -> str:
    """Exact ER per copy-count bucket, one row per edit (the extraction-rate track)."""
    head = ["# Extraction-rate track by copy count", "",
            "Exact ER of each edit per bucket of copies in the training stream (<= bucket; -1 = unknown); "
            "N per bucket in the header."]
    if table.empty:
        return "\n".join([*head, "", "No copy counts for these candidates."]) + "\n"
    buckets = sorted(table["copies"].unique())
    n = table.groupby("copies")["n"].first()
    wide = table.pivot_table(index=["method", "edit"], columns="copies", values="exact_er", sort=False).reset_index()
    cols = [("method", "Method", "{}"), ("edit", "Edit", "{}")] + [
        (b, f"{'unknown' if b == -1 else f'<={b}'} (N={int(n[b])})", "{:.3f}") for b in buckets]
    return "\n".join([*head, "", markdown_table(wide, cols)]) + "\n"


def _kind(group: str) -> str:
    from memctl.extract import family_kind

    return family_kind(group)


def _bucket(copies) -> int:
    return 1 << max(int(copies) - 1, 0).bit_length() if copies > 0 else -1


def edits_by_stratum(scores: dict[str, pd.DataFrame], labels: dict[str, str],
                     tracks: Sequence[str] = ("extraction_rate", "forget")) -> pd.DataFrame:
    """Exact ER of every edit per memory kind (a family group pooled by its kind,
    :func:`memctl.extract.family_kind`) and per copy-count bucket (as :func:`bucket_copies`), on
    each of ``tracks``, with the exact McNemar test against Origin (``scores["none"]``) on the same
    candidates of that stratum: whether an edit moves memories of one kind or exposure, which the
    pooled rate can hide. One row per (edit, track, stratum); none where Origin did not score the
    track."""
    from memctl import stats

    cols = ["edit", "method", "track", "by", "stratum", "n", "k", "exact_er", "origin_k", "p", "verdict"]
    origin = scores.get("none")
    if origin is None or "track" not in origin:
        return pd.DataFrame(columns=cols)
    rows = []
    for track in tracks:
        ref = origin[origin["track"] == track]
        if ref.empty or "group" not in ref:
            continue
        ref = ref.set_index("candidate_id")
        for edit, table in scores.items():
            part = table[table["track"] == track] if "track" in table else table.iloc[0:0]
            if part.empty or not part["candidate_id"].isin(ref.index).all():
                continue
            outcome = part["exact_match"].to_numpy(dtype=bool)
            against = ref["exact_match"].reindex(part["candidate_id"]).to_numpy(dtype=bool)
            strata = {"kind": part["group"].map(_kind),
                      "copies": part["copies"].fillna(-1).map(_bucket) if "copies" in part else None}
            for by, key in strata.items():
                if key is None:
                    continue
                for stratum, at in sorted(key.reset_index(drop=True).groupby(key.to_numpy()).indices.items()):
                    row, base = outcome[at], against[at]
                    test = None if edit == "none" else stats.mcnemar(row, base)
                    rows.append({"edit": edit, "method": labels.get(edit, edit), "track": track, "by": by,
                                 "stratum": str(stratum), "n": int(len(at)), "k": int(row.sum()),
                                 "exact_er": float(row.mean()), "origin_k": int(base.sum()),
                                 "p": math.nan if test is None else test.pvalue,
                                 "verdict": "-" if test is None else stats.verdict(test)})
    return pd.DataFrame(rows, columns=cols)


def _short(verdict: str) -> str:
    """``lower (p=0.002)`` stays; ``no evidence of a difference (p=0.5)`` -> ``(p=0.5)``."""
    return verdict.replace("no evidence of a difference ", "")


def edits_by_stratum_markdown(table: pd.DataFrame) -> str:
    """One table per track and stratification: a row per edit, a column per stratum, each cell
    ``k/N`` of exact extraction with the verdict against Origin on the same candidates."""
    names = {"extraction_rate": "extraction-rate track, test split", "forget": "own training memories (forget track)"}
    out = ["## Exact ER by memory kind and by copy count, paired against Origin", "",
           "Each cell: exact extractions k/N of the edit on the candidates of that kind (family groups "
           "pooled by kind) or copy-count bucket (<= bucket; -1 = unknown), and its verdict against Origin "
           "on the same candidates (exact McNemar test, level 0.05, memctl.stats): `lower` / `higher` with "
           "its p-value, or the p-value alone where there is no evidence of a difference. Small strata have little "
           "power: 'no evidence' there is not evidence of no effect."]
    if table.empty:
        return "\n".join([*out, "", "No per-candidate groups or copy counts to stratify by."]) + "\n"
    for (track, by), part in table.groupby(["track", "by"], sort=False):
        values = part["stratum"].unique().tolist()
        strata = sorted(values, key=int) if by == "copies" else sorted(values)
        n = part.groupby("stratum")["n"].first()
        head = ["Method", "Edit"] + [f"{'unknown' if s == '-1' else ('<=' + s if by == 'copies' else s)} (N={n[s]})"
                                     for s in strata]
        lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(strata)]
        part = pd.concat([part[part["edit"] == "none"], part[part["edit"] != "none"]])  # Origin first
        for (method, edit), rows in part.groupby(["method", "edit"], sort=False):
            cells = {r.stratum: f"{r.k}/{r.n}" + ("" if r.verdict == "-" else f" {_short(r.verdict)}")
                     for r in rows.itertuples()}
            lines.append("| " + " | ".join([str(method), str(edit)] + [cells.get(s, "-") for s in strata]) + " |")
        out += ["", f"### {names.get(track, track)}, by {'memory kind' if by == 'kind' else 'copy count'}", "", *lines]
    return "\n".join(out) + "\n"


def edit_families(metrics: pd.DataFrame, records: Sequence[dict[str, Any]] = ()) -> dict[str, str]:
    """edit id -> method family (:func:`memctl.plots.family_of`) of each row: from its plan record
    (the report job's ``--spec``), else from its label."""
    from memctl.plots import family_of

    by_edit = {str(r.get("edit")): r for r in records}
    labels = dict(zip(metrics["edit"].astype(str), metrics["method"].astype(str))) if "method" in metrics else {}
    return {str(e): family_of(by_edit.get(str(e), {"edit": str(e)}), labels.get(str(e), "")) for e in metrics["edit"]}


def _footnote(fig, note: str) -> None:
    """The configuration under a figure (a PNG or SVG read alone still says what it shows)."""
    if note:
        import textwrap

        text = note.replace("`", "").replace("**", "")
        fig.text(0.01, 0.005, "\n".join(textwrap.wrap(text, 150)), fontsize=6, color="#555555", va="bottom")


def plot_edits_by_copies(table: pd.DataFrame, path: Path, families: Mapping[str, str] | None = None,
                         note: str = "", provenance=None) -> None:
    """Extraction rate vs copies, one line per edit: each method family in its colour and marker
    (:mod:`memctl.plots`), the edits of one family told apart by the line's dash; the unedited
    model thick and black. Writes ``path`` (PNG) and the SVG beside it."""
    from memctl import plots

    families = dict(families or {})
    with plots.style():
        fig, ax = plots.subplots(figsize=(7.5, 4.8))
        known = table[table["copies"] > 0]
        if known.empty:
            ax.text(0.5, 0.5, "no exposure counts for these candidates", ha="center", va="center")
        dashes = ["-", "--", ":", "-."]
        seen: dict[str, int] = {}
        for (edit, method), part in known.groupby(["edit", "method"], sort=False):
            part = part.sort_values("copies")
            family = families.get(str(edit)) or plots.family_of({"edit": str(edit)}, str(method))
            style = plots.family_style(family)
            k = seen[family] = seen.get(family, -1) + 1
            ax.plot(part["copies"], part["exact_er"], label=method, markersize=7 if family == "origin" else 4,
                    linewidth=2.5 if family == "origin" else 1.2, linestyle=dashes[k % len(dashes)],
                    alpha=1.0 if family == "origin" else 0.85, zorder=3 if family == "origin" else 2,
                    **style.line_kwargs())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("copies in the training stream (<= bucket)")
        ax.set_ylabel("Exact ER (extraction-rate track)")
        ax.set_ylim(-0.03, 1.03)
        if not known.empty:
            ax.legend(ncol=2, loc="upper left", fontsize=6)
        ax.set_title("Exact extraction by exposure count, per edit")
        fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
        _footnote(fig, note)
        plots.save(fig, path, provenance)


def plot_memorization_frontier(metrics: pd.DataFrame, path: Path, families: Mapping[str, str] | None = None,
                               note: str = "", provenance=None) -> list[str]:
    """The results' frontier: memorization against utility, every edit. One panel per test track
    with examples (extraction-rate, memorized): Exact ER (exact 95% interval) against the held-out
    perplexity ratio to Origin (paired bootstrap 95% interval), each method family in its colour and
    marker, each point numbered as its row (#) in the summary table; Origin's rate dashed, ratio 1
    dotted. Lower left is better for suppression (less recitation at the same perplexity), upper left
    for amplification. Writes ``path`` (PNG) and the SVG beside it; returns the panels' titles."""
    from memctl import plots

    families = dict(families or {})
    panels = []
    for prefix, name in (("er_", "extraction-rate track"), ("", "memorized track")):
        col, n = f"{prefix}exact_er", f"{prefix}n_examples"
        if col in metrics and n in metrics and (metrics[n].fillna(0) > 0).any():
            size = int(metrics[n].fillna(0).max())
            panels.append((prefix, col, f"Exact ER, {name} (N={size})"))
    with plots.style():
        fig, axes = plots.subplots(1, max(1, len(panels)), figsize=(5.6 * max(1, len(panels)), 5.4), squeeze=False)
        if not panels or "ppl_ratio" not in metrics:
            axes[0][0].text(0.5, 0.5, "no test track with examples, or no held-out perplexity", ha="center", va="center")
        rows = metrics.reset_index(drop=True)
        for ax, (prefix, col, title) in zip(axes[0], panels):
            for i, rec in rows.iterrows():
                x, y = rec.get("ppl_ratio"), rec.get(col)
                if not _given(x) or not _given(y):
                    continue
                family = families.get(str(rec["edit"])) or plots.family_of({"edit": str(rec["edit"])}, str(rec["method"]))
                style = plots.family_style(family)
                xerr = _err(x, rec.get("ppl_ratio_lo"), rec.get("ppl_ratio_hi"))
                yerr = _err(y, rec.get(f"{prefix}exact_er_lo"), rec.get(f"{prefix}exact_er_hi"))
                ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="none", ecolor=style.edge or style.color,
                            elinewidth=0.8, alpha=0.6, capsize=2, zorder=2)
                ax.scatter([x], [y], s=110 if family == "origin" else 42, zorder=4, label=style.family,
                           **style.scatter_kwargs())
                ax.annotate(str(i + 1), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6, color="#333333")
            origin = rows[rows["edit"] == "none"]
            if len(origin) and _given(origin[col].iloc[0]):
                ax.axhline(float(origin[col].iloc[0]), color=plots.REFERENCE, ls="--", lw=0.8, zorder=1,
                           label="Origin's rate")
            ax.axvline(1.0, color=plots.REFERENCE, ls=":", lw=0.8, zorder=1)
            ax.set_xlabel("held-out perplexity / Origin's (95% CI)")
            ax.set_ylabel("Exact ER (exact 95% CI)")
            ax.set_title(title)
            ax.set_ylim(-0.05, 1.05)
        seen: dict[str, Any] = {}
        for ax in axes[0]:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(label, handle)
        order = {s.family: k for k, s in enumerate(plots.FAMILIES.values())}
        keys = sorted(seen, key=lambda k: order.get(k, len(order)))
        bottom = (0.07 if note else 0.0) + (0.06 * math.ceil(len(keys) / 5) if keys else 0.0)
        if keys:  # below the panels: the points stay visible
            fig.legend([seen[k] for k in keys], keys, loc="lower center", ncol=min(5, len(keys)), fontsize=7,
                       frameon=False, bbox_to_anchor=(0.5, 0.07 if note else 0.0))
        fig.suptitle("Memorization against utility, every edit (numbers: rows of the summary table)")
        fig.tight_layout(rect=(0, bottom, 1, 1))
        _footnote(fig, note)
        plots.save(fig, path, provenance)
    return [t for _, _, t in panels]


def _given(value) -> bool:
    try:
        return value is not None and not math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _err(value, lo, hi):
    """Error bar lengths ([[below], [above]]) of an interval around ``value`` (None without one)."""
    if not (_given(lo) and _given(hi)):
        return None
    return [[max(float(value) - float(lo), 0.0)], [max(float(hi) - float(value), 0.0)]]


def extraction_markdown(by_copies: pd.DataFrame) -> str:
    by_copies = by_copies.astype({"copies": object})
    by_copies.loc[by_copies["copies"] == -1, "copies"] = "unknown"
    cols = [
        ("group", "Group", "{}"),
        ("copies", "Copies in training stream (<=)", "{}"),
        ("n", "N", "{}"),
        ("exact_er", "Exact ER", "{:.3f}"),
        ("fractional_er", "Fractional ER", "{:.3f}"),
        ("loose_accuracy", "Loose acc.", "{:.3f}"),
    ]
    return "# Extraction by exposure count\n\n" + markdown_table(by_copies, cols) + "\n"


def bucket_copies(by_copies: pd.DataFrame) -> pd.DataFrame:
    """Pool counts into powers of two (1, 2, 3-4, 5-8, ...) so natural duplicates read like canaries.

    Candidates without a known exposure count (``copies <= 0``, e.g. benchmark files) form one
    bucket with ``copies = -1`` per group. Families of related memories (the demo's structured
    canaries, one group per family: :func:`memctl.extract.is_family_group`) are pooled by kind,
    e.g. ``canary-records (16 families)``.
    """
    from memctl.extract import family_kind, is_family_group

    df = by_copies.copy()
    family = df["group"].map(is_family_group).astype(bool)
    if family.any():
        kinds = df["group"].map(family_kind)
        counts = df.loc[family].groupby(kinds[family])["group"].nunique()
        df.loc[family, "group"] = kinds[family].map(lambda k: f"{k} ({counts[k]} families)")
    df["bucket"] = df["copies"].map(lambda c: 1 << max(int(c) - 1, 0).bit_length() if c > 0 else -1)
    rows = []
    for (group, bucket), part in df.groupby(["group", "bucket"], sort=True):
        w = part["n"]
        rows.append(
            {
                "group": group,
                "copies": int(bucket),
                "n": int(w.sum()),
                "exact_er": float((part["exact_er"] * w).sum() / w.sum()),
                "fractional_er": float((part["fractional_er"] * w).sum() / w.sum()),
                "loose_accuracy": float((part["loose_accuracy"] * w).sum() / w.sum()),
            }
        )
    return pd.DataFrame(rows, columns=["group", "copies", "n", "exact_er", "fractional_er", "loose_accuracy"])


def plot_extraction(by_copies: pd.DataFrame, path: Path, note: str = "", provenance=None) -> None:
    """The unedited model's exact extraction rate by copy-count bucket, one line per candidate
    group (each its own colour and marker). Writes ``path`` (PNG) and the SVG beside it."""
    from memctl import plots

    markers = ["o", "s", "^", "D", "v", "P", "X", "h"]
    with plots.style():
        fig, ax = plots.subplots(figsize=(6.5, 4.3))
        known = by_copies[by_copies["copies"] > 0]
        if known.empty:
            ax.text(0.5, 0.5, "no exposure counts for these candidates", ha="center", va="center")
        for k, (group, part) in enumerate(known.groupby("group", sort=True)):
            part = part.sort_values("copies")
            ax.plot(part["copies"], part["exact_er"], marker=markers[k % len(markers)],
                    label=f"{group} (n={int(part['n'].sum())})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("copies in the training stream (<= bucket)")
        ax.set_ylabel("exact extraction rate")
        ax.set_ylim(-0.03, 1.03)
        if not known.empty:
            ax.legend(fontsize=8)
        ax.set_title("Greedy exact extraction by exposure count")
        fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
        _footnote(fig, note)
        plots.save(fig, path, provenance)


def formatted_table(df: pd.DataFrame, columns: Sequence[tuple[str, str, str]]) -> pd.DataFrame:
    """The table as the papers print it: chosen columns, their headers, values formatted."""
    cols = [c for c in columns if c[0] in df.columns]
    return pd.DataFrame({h: [_fmt(v, f) for v in df[c]] for c, h, f in cols})


def html_page(title: str, sections: Sequence[tuple[str, pd.DataFrame]], note: str = "") -> str:
    """A small standalone HTML page of tables (for ``snakemake --report`` and browsers)."""
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(note)}</p>" if note else ""]
    for heading, table in sections:
        body += [f"<h2>{html.escape(heading)}</h2>",
                 f"<div class='table-wrap'>{table.to_html(index=False, border=0, classes='memctl')}</div>"]
    return _page(title, body)


# ------------------------------------------------------------------------------ the results page


@dataclass(frozen=True)
class Figure:
    """A figure of the results page: its SVG embedded (the page is one self-contained file), a
    title and a caption that says what it shows and for which configuration."""

    key: str  #: the element id is ``fig-<key>``
    title: str
    svg: bytes
    caption: str  #: plain text with the inline markup of :func:`_inline`
    files: tuple[str, ...] = ()  #: the figure's files, relative to the page


#: (column prefix, heading, N column) of the tracks the summary table shows, where they have examples.
SUMMARY_TRACKS = (("er_", "Extraction-rate track", "er_n_examples"), ("", "Memorized track", "n_examples"),
                  ("ood_", "Out-of-domain family", "ood_n_examples"))
#: The summary table's utility columns (held-out perplexity over Origin's), after the two test tracks.
PPL_GROUP = ("ppl", "Held-out perplexity / Origin", None)


def _size(metrics: pd.DataFrame, column: str) -> int:
    """A track's N as the evaluation saw it (the unedited model's row, else the largest)."""
    if column not in metrics or not len(metrics):
        return 0
    origin = metrics[metrics["edit"] == "none"] if "edit" in metrics else metrics.iloc[0:0]
    values = (origin if len(origin) else metrics)[column].fillna(0)
    return int(values.max()) if len(values) else 0


def configuration_text(run: Mapping[str, Any] | None, metrics: pd.DataFrame) -> str:
    """One sentence naming the configuration behind the results (the report job's ``run`` record,
    planned from the config, and the sizes the evaluation saw): the model, the extraction window,
    each test track's N and how its split was drawn, the held-out windows, the number of edits."""
    run = dict(run or {})
    model = run.get("model") or (str(metrics["model"].iloc[0]) if "model" in metrics and len(metrics) else "?")
    if run.get("source") == "demo":
        what = "the embedded demo model"
    elif run.get("name_or_path"):
        what = f"{run['source']} model `{run['name_or_path']}`" + (f" at revision {run['revision']}"
                                                                   if run.get("revision") else "")
    else:
        what = ""
    parts = [f"Model `{model}`" + (f" ({what})" if what else "")]
    if run.get("prefix_len") and run.get("suffix_len"):
        parts.append(f"{run['prefix_len']}-token prefixes, {run['suffix_len']}-token suffixes decoded greedily")
    tracks = []
    er, mem, ood = (_size(metrics, c) for c in ("er_n_examples", "n_examples", "ood_n_examples"))
    if er:
        how = (f" (extract.er_test_fraction {run['er_test_fraction']:g}, split seed {run.get('split_seed', '?')})"
               if run.get("er_test_fraction") is not None else "")
        tracks.append(f"extraction-rate test split N={er}{how}")
    if mem or "n_examples" in metrics:
        how = f" (extract.test_fraction {run['test_fraction']:g})" if run.get("test_fraction") is not None else ""
        tracks.append(f"memorized test split N={mem}{how}")
    if ood:
        tracks.append(f"out-of-domain family N={ood}")
    if tracks:
        parts.append(", ".join(tracks))
    windows = _size(metrics, "ppl_windows")
    if windows:
        parts.append(f"held-out perplexity over {windows} windows")
    if len(metrics):
        edits = int((metrics["edit"] != "none").sum()) if "edit" in metrics else len(metrics)
        parts.append(f"{edits} edit{'s' if edits != 1 else ''} against Origin")
    return "; ".join(parts) + "."


def masks_configuration_text(masks: Mapping[str, Any] | None) -> str:
    """The masks' settings that shape the masks table and its ablation plots (the ``run`` record's
    ``masks``), as one sentence; '' without them."""
    if not masks:
        return ""
    parts = [f"masks ({', '.join(masks.get('modes') or [])}) at target sparsity {masks.get('sparsity', '?'):g}"]
    if masks.get("threshold") is not None:
        parts.append(f"learning threshold t={masks['threshold']:g}")
    if masks.get("steps"):
        parts.append(f"{masks['steps']} steps")
    if masks.get("seeds"):
        parts.append("seed" + ("s " if len(masks["seeds"]) > 1 else " ") + ", ".join(map(str, masks["seeds"])))
    sweep = masks.get("sweep") or {}
    if sweep.get("sparsities"):
        parts.append("sparsity sweep " + ", ".join(f"{v:g}" for v in sweep["sparsities"])
                     + (f" (modes {', '.join(sweep.get('sparsity_modes') or [])})" if sweep.get("sparsity_modes") else ""))
    if sweep.get("thresholds"):
        parts.append("threshold sweep t=" + ", ".join(f"{v:g}" for v in sweep["thresholds"]))
    return "Masks: " + ", ".join(parts) + "."


def _verdict_class(text: str) -> str:
    """CSS classes of a verdict cell ('lower / higher / no evidence of a difference (p=...)'), ''
    for any other cell. The text stays: colour is never the only cue."""
    m = re.match(r"(lower|higher|no evidence of a difference)\b", text)
    if not m:
        return ""
    kind = m[1] if m[1] in ("lower", "higher") else "same"
    return f"verdict {kind}" + (f" {UNDERPOWERED}" if UNDERPOWERED in text else "")


#: Columns of words, not numbers: left-aligned (the first column always is).
TEXT_COLUMNS = frozenset({"Method", "Settings", "Row", "Against", "Track", "Stage", "Kept", "Why", "Group", "Device",
                          "Edit", "Edit id", "Ablation", "Matrix", "Basis", "Band"})


def _cell(text: str, tag: str = "td", text_column: bool = False) -> str:
    cls = _verdict_class(text) if tag == "td" else ""
    cls = cls or ("text" if text_column else "")
    return f"<{tag} class='{cls}'>{_inline(text)}</{tag}>" if cls else f"<{tag}>{_inline(text)}</{tag}>"


def _table_html(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    text = [i > 0 and h in TEXT_COLUMNS for i, h in enumerate(header)]
    head = "".join(_cell(c, "th", t) for c, t in zip(header, text))
    cells = "".join("<tr>" + "".join(_cell(c, "td", i < len(text) and text[i]) for i, c in enumerate(r)) + "</tr>"
                    for r in rows)
    return (f"<div class='table-wrap'><table class='memctl'><thead><tr>{head}</tr></thead>"
            f"<tbody>{cells}</tbody></table></div>")


def _text(value, pattern: str = "{}") -> str:
    """A value as a cell's text (``-`` where missing), unescaped: the cells are HTML here."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


def summary_html(metrics: pd.DataFrame, caption: str = "") -> str:
    """The summary table: one row per edit (numbered as the frontier plot's points), Exact ER with
    its count and exact 95% interval and the paired test against Origin on each test track with
    examples, the held-out perplexity ratio to Origin with its interval and test after the
    extraction-rate and memorized tracks, the out-of-domain family last. Verdict cells
    carry their direction as a class (coloured, with a glyph) and keep their words."""
    metrics = _prepared(metrics).reset_index(drop=True)
    tracks = [t for t in SUMMARY_TRACKS if t[2] in metrics and (metrics[t[2]].fillna(0) > 0).any()]
    top = ["<th rowspan='2'>#</th><th rowspan='2' class='text'>Method</th><th rowspan='2' class='text'>Settings</th>"]
    sub = []
    # the utility beside the two test tracks (the frontier's axes), the out-of-domain family last
    groups = [t for t in tracks if t[0] != "ood_"] + [PPL_GROUP] + [t for t in tracks if t[0] == "ood_"]
    for prefix, heading, n in groups:
        if prefix == PPL_GROUP[0]:
            top.append(f"<th colspan='3' class='group'>{html.escape(heading)}</th>")
            sub += ["ratio", "95% CI", "vs Origin"]
        else:
            top.append(f"<th colspan='3' class='group'>{html.escape(heading)} (N={_size(metrics, n)})</th>")
            sub += ["Exact ER (k/N)", "95% CI", "vs Origin"]
    body = []
    for i, rec in metrics.iterrows():
        method = _text(rec.get("method", rec.get("edit")))
        converged = rec.get("converged")
        unconverged = converged is not None and _given(converged) and not bool(converged)
        cells = [str(i + 1), method + (" (did not converge)" if unconverged else ""), _text(rec.get("settings", "-"))]
        for prefix, _, _ in groups:
            if prefix == PPL_GROUP[0]:
                cells += [_text(rec.get("ppl_ratio"), "{:.3f}"), _text(rec.get("ppl_ratio_ci", "-")),
                          _text(rec.get("ppl_vs_origin", "-"))]
                continue
            value = _text(rec.get(f"{prefix}exact_er"), "{:.3f}")
            count = rec.get(f"{prefix}exact_count")
            cells += [value + (f" ({count})" if count not in (None, "-") and value != "-" else ""),
                      _text(rec.get(f"{prefix}exact_ci", "-")), _text(rec.get(f"{prefix}vs_origin", "-"))]
        cls = " class='origin'" if rec.get("edit") == "none" else ""
        body.append(f"<tr{cls}>" + "".join(_cell(c, "td", k in (1, 2)) for k, c in enumerate(cells)) + "</tr>")
    cap = f"<p class='caption' id='summary-caption'>{_inline(caption)}</p>" if caption else ""
    return (f"<div class='table-wrap'><table id='summary-table' class='memctl summary'><thead><tr>{''.join(top)}</tr>"
            f"<tr>{''.join(_cell(c, 'th') for c in sub)}</tr></thead><tbody>{''.join(body)}</tbody></table></div>{cap}")


#: What each ablation plot of the masks report shows (its file ``ablation_<name>.svg``).
ABLATION_CAPTIONS = {
    "sparsity": ("Sparsity ablation of the masks (weight-pruning paper Fig. 3)",
                 "Exact ER and Fractional ER on the extraction-rate test split and held-out perplexity of the swept "
                 "mask modes (and baselines, where swept) at each target sparsity; the dashed line is Origin, a cross "
                 "a mask that did not converge."),
    "threshold": ("Learning-threshold ablation of the masks (weight-pruning paper Fig. 4)",
                  "The down mode (and CSP down, where swept) trained with each threshold t: Exact ER and Fractional "
                  "ER on the extraction-rate test split, memorized-suffix loss and held-out loss against t; the "
                  "dashed horizontal line is Origin, the dotted vertical line the unpruned model's loss on the "
                  "masks' training memories."),
}


def report_figures(out: Path, metrics: pd.DataFrame, records: Sequence[dict[str, Any]] = (),
                   run: Mapping[str, Any] | None = None, by_edit: pd.DataFrame | None = None,
                   by_copies: pd.DataFrame | None = None, provenance=None) -> list[Figure]:
    """Write the report stage's figures into ``out`` (PNG and SVG each: :func:`memctl.plots.save`)
    and return them for the page, captioned with the configuration (:func:`configuration_text`):
    the frontier plot (``frontier``), every edit by copy count (``edits_by_copies``, with
    ``by_edit``), the unedited model by copy count (``extraction_by_copies``, with ``by_copies``)."""
    from memctl.plots import svg_path

    metrics = _prepared(metrics)
    config = configuration_text(run, metrics)
    families = edit_families(metrics, records)
    figures = []
    panels = plot_memorization_frontier(metrics, out / "frontier.png", families, config, provenance)
    figures.append(Figure(
        "frontier", "Memorization against utility, every edit",
        svg_path(out / "frontier.png").read_bytes(),
        f"{' and '.join(panels) or 'Exact ER'} (exact Clopper-Pearson 95% intervals) against held-out perplexity over "
        "Origin's on the same windows (paired bootstrap 95% intervals); one colour and marker per method family "
        "(Okabe-Ito palette), each point numbered as its row in Table 1; dashed: Origin's rate, dotted: Origin's "
        "perplexity. Lower left suppresses memorization at little cost in perplexity; an amplifying edit (up) "
        "should sit above the dashed line. " + config,
        ("frontier.png", "frontier.svg")))
    if by_edit is not None:
        plot_edits_by_copies(by_edit, out / "edits_by_copies.png", families, config, provenance)
        n = ", ".join(f"{'unknown' if b == -1 else f'<={b}'}: {int(k)}"
                      for b, k in by_edit.groupby("copies")["n"].first().items()) if len(by_edit) else "none"
        figures.append(Figure(
            "edits-by-copies", "Extraction by copy count, every edit",
            svg_path(out / "edits_by_copies.png").read_bytes(),
            "Exact ER of each edit per bucket of copies in the training stream, on the extraction-rate test split "
            f"(N per bucket: {n}); Origin thick and black, each method family in its colour and marker, the edits "
            "of one family told apart by the dash. Table: `edits_by_copies.md`. " + config,
            ("edits_by_copies.png", "edits_by_copies.svg")))
    if by_copies is not None:
        plot_extraction(by_copies, out / "extraction_by_copies.png", config, provenance)
        total = int(by_copies["n"].sum()) if len(by_copies) else 0
        figures.append(Figure(
            "extraction-by-copies", "Extraction by copy count, the unedited model",
            svg_path(out / "extraction_by_copies.png").read_bytes(),
            f"Greedy exact extraction rate of the unedited model on all {total} candidates, by how often each "
            "occurs in the training data (buckets 1, 2, 3-4, 5-8, ...), one line per candidate group (families "
            "of related memories pooled by kind): "
            "memorization grows with duplication. Table: `extraction_by_copies.md`. " + config,
            ("extraction_by_copies.png", "extraction_by_copies.svg")))
    return figures


def masks_section(table: str | Path, figures: Sequence[str | Path] = (), run: Mapping[str, Any] | None = None,
                  metrics: pd.DataFrame | None = None) -> tuple[str, list[Figure]]:
    """The masks report's main table (its ``table.md``) and its ablation plots (``ablation_*.svg``)
    for the results page, each plot captioned with the masks' settings and the configuration."""
    config = configuration_text(run, metrics if metrics is not None else pd.DataFrame())
    masks_config = masks_configuration_text((run or {}).get("masks"))
    text = Path(table).read_text(encoding="utf-8")
    if masks_config:
        text = masks_config + "\n\n" + text
    out = []
    for path in map(Path, figures):
        name = path.stem.removeprefix("ablation_")
        title, what = ABLATION_CAPTIONS.get(name, (f"Masks: {name}", ""))
        out.append(Figure(f"masks-{name}", title, path.read_bytes(), " ".join(p for p in (what, masks_config, config) if p),
                          (f"masks/{path.with_suffix('.png').name}", f"masks/{path.name}")))
    return text, out


VERDICT_LEGEND = (
    "<p class='legend'>Verdicts against Origin (paired tests, alpha 0.05): "
    "<span class='verdict lower'>lower</span> <span class='verdict higher'>higher</span> "
    "<span class='verdict same'>no evidence of a difference</span> "
    f"<span class='verdict same {UNDERPOWERED}'>{UNDERPOWERED}</span> (a track too small for its 'no evidence' "
    "to mean much). The words are in every cell; colour and glyph only repeat them.</p>")


def figure_html(fig: Figure, number: int) -> str:
    """A figure of the page: the SVG as a data URI (self-contained), its number, title and caption."""
    data = base64.b64encode(fig.svg).decode("ascii")
    files = (" Files: " + ", ".join(f"<code>{html.escape(f)}</code>" for f in fig.files) + ".") if fig.files else ""
    return (f"<figure id='fig-{html.escape(fig.key)}' class='figure'>"
            f"<img src='data:image/svg+xml;base64,{data}' alt='{html.escape(fig.title, quote=True)}'>"
            f"<figcaption><b>Figure {number}. {_inline(fig.title)}.</b> {_inline(fig.caption)}{files}</figcaption>"
            f"</figure>")


def results_html(metrics: pd.DataFrame, data: str = "", figures: Sequence[Figure] = (),
                 masks: tuple[str, Sequence[Figure]] | None = None, run: Mapping[str, Any] | None = None) -> str:
    """The results page, one self-contained HTML file that opens on the results: the configuration,
    the split-size warnings, the summary table (:func:`summary_html`), the figures (embedded SVG,
    numbered, captioned), the masks table and its ablation plots (``masks``: the masks report's
    markdown and figures, where the config runs masks), then every detailed table of
    :func:`results_markdown` and the data section."""
    metrics = _prepared(metrics)
    config = configuration_text(run, metrics)
    models = list(dict.fromkeys(metrics["model"])) if "model" in metrics else []
    title = "memctl results" + (f": {', '.join(map(str, models))}" if models else "")
    nav = [("summary", "Summary")]
    if figures:
        nav.append(("figures", "Figures"))
    if masks:
        nav.append(("masks", "Masks and pruning"))
    nav.append(("details", "Detailed tables"))
    if data:
        nav.append(("data", "Data"))
    body = [f"<header><h1>{_inline(title)}</h1><p class='config' id='configuration'>{_inline(config)}</p>",
            "<nav class='toc'>" + " ".join(f"<a href='#{k}'>{v}</a>" for k, v in nav) + "</nav></header>"]
    warn = split_warnings(split_sizes(metrics))
    if warn:
        items = "".join(f"<li><b>{_inline(w.split(':', 1)[0])}:</b>{_inline(w.split(':', 1)[1])}</li>" for w in warn)
        body.append(f"<section id='warnings' class='warnings'><h2>Warnings</h2><ul>{items}</ul></section>")
    caption = ("**Table 1.** Every edit against the unedited model (Origin), scored on the same examples and "
               "held-out windows: Exact ER with its count and exact Clopper-Pearson 95% interval, the exact McNemar "
               "test against Origin; held-out perplexity over Origin's with a paired bootstrap interval and test. "
               "Rows numbered as the frontier plot's points. " + config)
    body.append("<section id='summary'><h2>Summary</h2>" + VERDICT_LEGEND)
    for model in models or [None]:
        part = metrics if model is None else metrics[metrics["model"] == model]
        if len(models) > 1:
            body.append(f"<h3>{_inline(str(model))}</h3>")
        body.append(summary_html(part, caption))
    body.append("</section>")
    number = 0
    if figures:
        body.append("<section id='figures'><h2>Figures</h2>")
        for fig in figures:
            number += 1
            body.append(figure_html(fig, number))
        body.append("</section>")
    if masks:
        text, mask_figures = masks
        body.append("<section id='masks'><h2>Masks and pruning</h2>")
        body += markdown_body(text, shift=1)
        for fig in mask_figures:
            number += 1
            body.append(figure_html(fig, number))
        body.append("</section>")
    body.append("<section id='details'><h2>Detailed tables</h2>")
    body += markdown_body(results_details_markdown(metrics), shift=1)
    body.append("</section>")
    if data:
        body.append("<section id='data'>")
        body += markdown_body(data)
        body.append("</section>")
    return _page(title, body)


def _inline(text: str) -> str:
    """Escape HTML, then render the inline markup our tables use (`code`, **bold**)."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def markdown_body(text: str, shift: int = 0) -> list[str]:
    """The HTML elements of the markdown that memctl's report commands write (``#`` headings, moved
    ``shift`` levels down; pipe tables, verdict cells classed; ``-`` lists; paragraphs)."""
    body: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line:
            i += 1
        elif line.startswith("#"):
            hashes = len(line) - len(line.lstrip("#"))
            level = min(hashes + shift, 6)
            body.append(f"<h{level}>{_inline(line[hashes:].strip())}</h{level}>")
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(split_row(lines[i]))
                i += 1
            rows = block[1:]
            if rows and all(c and set(c) <= set("-:") for c in rows[0]):
                rows = rows[1:]  # the separator row under the header
            body.append(_table_html(block[0], rows))
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append(f"<ul>{''.join(items)}</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "|", "- ")):
                para.append(lines[i].strip())
                i += 1
            body.append(f"<p>{_inline(' '.join(para))}</p>")
    return body


def markdown_html(text: str, title: str) -> str:
    """The markdown that memctl's report commands write, as a standalone, styled HTML page.

    Covers what those commands emit (``#`` headings, pipe tables, ``-`` lists, paragraphs), so the
    same tables appear in ``snakemake --report`` without another dependency.
    """
    return _page(title, markdown_body(text))


#: The pages' stylesheet, embedded (each page is one self-contained file). Verdict colours are
#: tints of the plots' Okabe-Ito blue (lower) and vermillion (higher), with a glyph, beside the words.
CSS = r"""
:root{--fg:#1b1b1b;--muted:#4a4a4a;--line:#d4d7dc;--head:#f1f3f5;--accent:#0072B2;
--lower:#d3e6f3;--higher:#f9dcc6;--same:#ececec}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);
background:#fff;max-width:1800px;margin:0 auto;padding:1.2rem 2rem 4rem}
h1{font-size:1.55rem;margin:.2rem 0 .3rem}
h2{font-size:1.22rem;margin:2.2rem 0 .6rem;padding-bottom:.2rem;border-bottom:2px solid var(--accent)}
h3{font-size:1.05rem;margin:1.5rem 0 .4rem}h4{font-size:.95rem;margin:1.2rem 0 .3rem}
p,li,figcaption{max-width:80em}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.88em;background:#f1f3f5;
padding:0 .25em;border-radius:3px}
header .config{color:var(--muted);margin:.2rem 0 .5rem}
nav.toc a{margin-right:1em;color:var(--accent);text-decoration:none;font-weight:600}
nav.toc a:hover{text-decoration:underline}
.warnings{border-left:5px solid #E69F00;background:#fff7e0;padding:.2rem 1rem .4rem;margin:1rem 0}
.warnings h2{border:none;margin:.6rem 0 .2rem;font-size:1.05rem}
.table-wrap{overflow-x:auto;margin:.5rem 0 1.2rem;border:1px solid var(--line);border-radius:4px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;font-size:13px;min-width:100%}
p.caption{color:var(--muted);font-size:13px;margin:-.6rem 0 1.2rem}
th,td{padding:4px 9px;border-bottom:1px solid var(--line);text-align:right;vertical-align:top;white-space:nowrap}
td:first-child,th:first-child,td.text,th.text{text-align:left}
th{background:var(--head);font-weight:600}
th.group{text-align:center;border-left:1px solid var(--line)}
table.summary{font-size:12.5px}table.summary td,table.summary th{padding:3px 7px}
table.summary .verdict{min-width:8.5em}
tbody tr:nth-child(even){background:#fafbfc}
tbody tr:hover{background:#eef5fb}
tr.origin td{font-weight:600;background:#f6f6f6}
.verdict{text-align:left;white-space:normal;min-width:10em}
.verdict.lower{background:var(--lower)}
.verdict.higher{background:var(--higher)}
.verdict.same{background:var(--same);color:#333}
.verdict.lower::before{content:"\25BC\00a0";color:var(--accent)}
.verdict.higher::before{content:"\25B2\00a0";color:#D55E00}
.verdict.underpowered{font-style:italic;outline:1px dashed #777;outline-offset:-3px}
p.legend span.verdict{display:inline-block;padding:0 .45em;border-radius:3px;min-width:0}
figure{margin:1.6rem 0}
figure img{display:block;max-width:100%;height:auto;border:1px solid var(--line);border-radius:4px;background:#fff}
figcaption{color:#333;margin-top:.45rem}
@media print{body{max-width:none;padding:0}.table-wrap{overflow:visible;border:none}nav.toc{display:none}}
"""


def _page(title: str, body: Sequence[str]) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
