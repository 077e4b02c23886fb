"""Tables and plots that read like the papers' tables.

``results.md`` holds one row per (model, edit); later methods add rows by adding metrics files.
The extraction curve (exact extraction by exposure count) is a table and a plot.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memctl import stats

# (column, header, format) in the order the papers print them.
RESULT_COLUMNS = [
    ("method", "Method", "{}"),
    ("settings", "Settings", "{}"),
    # Only where the metrics carry it (a trained edit's delta says converged: false when written with
    # on_unconverged: flag): "no" marks a result that is not the method's.
    ("converged", "Converged", "{}"),
    ("heldout_loss", "Held-out loss", "{:.3f}"),
    ("heldout_ppl", "Held-out PPL", "{:.2f}"),
    ("fractional_er", "Fractional ER", "{:.3f}"),
    ("exact_er", "Exact ER", "{:.3f}"),
    ("loose_accuracy", "Loose acc.", "{:.3f}"),
    ("avg_levenshtein", "Avg. Levenshtein", "{:.3f}"),
    ("mem_loss", "Mem. loss", "{:.3f}"),
    ("mem_ppl", "Mem. PPL", "{:.2f}"),
    ("ndcg10", "nDCG@10", "{:.3f}"),
    ("n_examples", "N", "{}"),
    ("edit", "Edit id", "{}"),  # the hash: a detail (Settings tells the rows apart)
]


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


ER_COLUMNS = [
    ("method", "Method", "{}"),
    ("settings", "Settings", "{}"),
    ("converged", "Converged", "{}"),  # the marker: only where the metrics carry it
    ("er_exact_er", "Exact ER", "{:.3f}"),
    ("er_exact_count", "k/N", "{}"),
    ("er_exact_ci", "95% CI", "{}"),
    ("er_vs_origin", "vs Origin (Exact ER)", "{}"),
    ("er_fractional_er", "Fractional ER", "{:.3f}"),
    ("er_fractional_ci", "95% CI", "{}"),
    ("er_frac_vs_origin", "vs Origin (Fractional ER)", "{}"),
    ("heldout_ppl", "Held-out PPL", "{:.2f}"),
    ("ppl_ratio", "PPL / Origin", "{:.3f}"),
    ("ppl_ratio_ci", "95% CI (PPL ratio)", "{}"),
    ("ppl_vs_origin", "vs Origin (PPL)", "{}"),
    ("er_n_examples", "N", "{}"),
    ("edit", "Edit id", "{}"),  # the hash: a detail (Settings tells the rows apart)
]

#: (column prefix, track) of the generation tracks that :func:`with_intervals` tests.
TRACKS = (("", "memorized"), ("er_", "extraction_rate"), ("ood_", "ood"), ("ood_nonmem_", "ood_nonmemorized"))
#: Per-example score columns the paired tests read.
UNIT_COLUMNS = ("exact_match", "n_match", "n_suffix", "levenshtein_norm", "levenshtein_sim")


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
    same windows and ``ppl_vs_origin``; and ``paper_tests`` (JSON), the comparisons the papers draw
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
    base = scores.get("none")
    for i, edit in enumerate(edits):
        test = perplexity_test(scores.get(edit), base)
        if test is None:
            continue
        out.loc[out.index[i], "ppl_ratio"] = test.estimate
        if edit != "none":
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
    the memorized track, where each is one row (with several K-FAC or SVD rows, a sweep, the
    curvature report compares the points its declared rule chooses on the validation slice, and
    the paper's own setting: memctl.curvature.selection)."""
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


OOD_COLUMNS = [
    ("method", "Method", "{}"),
    ("settings", "Settings", "{}"),
    ("converged", "Converged", "{}"),
    ("ood_exact_er", "Exact ER", "{:.3f}"),
    ("ood_exact_count", "k/N", "{}"),
    ("ood_exact_ci", "95% CI", "{}"),
    ("ood_vs_origin", "vs Origin (Exact ER)", "{}"),
    ("ood_fractional_er", "Fractional ER", "{:.3f}"),
    ("ood_fractional_ci", "95% CI", "{}"),
    ("ood_frac_vs_origin", "vs Origin (Fractional ER)", "{}"),
    ("ood_loose_accuracy", "Loose acc.", "{:.3f}"),
    ("ood_loose_ci", "95% CI", "{}"),
    ("ood_n_examples", "N", "{}"),
    ("edit", "Edit id", "{}"),  # the hash: a detail (Settings tells the rows apart)
]


MEMORIZED_COLUMNS = [
    ("method", "Method", "{}"),
    ("settings", "Settings", "{}"),
    ("converged", "Converged", "{}"),  # the marker: only where the metrics carry it
    ("heldout_loss", "Held-out loss", "{:.3f}"),
    ("heldout_ppl", "Held-out PPL", "{:.2f}"),
    ("ppl_ratio", "PPL / Origin", "{:.3f}"),
    ("ppl_ratio_ci", "95% CI (PPL ratio)", "{}"),
    ("ppl_vs_origin", "vs Origin (PPL)", "{}"),
    ("fractional_er", "Fractional ER", "{:.3f}"),
    ("fractional_ci", "95% CI", "{}"),
    ("frac_vs_origin", "vs Origin (Fractional ER)", "{}"),
    ("exact_er", "Exact ER", "{:.3f}"),
    ("exact_count", "k/N", "{}"),
    ("exact_ci", "95% CI", "{}"),
    ("vs_origin", "vs Origin (Exact ER)", "{}"),
    ("loose_accuracy", "Loose acc.", "{:.3f}"),
    ("loose_ci", "95% CI", "{}"),
    ("avg_levenshtein", "Avg. Levenshtein", "{:.3f}"),
    ("levenshtein_ci", "95% CI", "{}"),
    ("lev_vs_origin", "vs Origin (Levenshtein)", "{}"),
    ("mem_loss", "Mem. loss", "{:.3f}"),
    ("mem_ppl", "Mem. PPL", "{:.2f}"),
    ("ndcg10", "nDCG@10", "{:.3f}"),
    ("ndcg10_text", "nDCG@10 (text)", "{:.3f}"),
    ("n_examples", "N", "{}"),
    ("edit", "Edit id", "{}"),  # the hash: a detail (Settings tells the rows apart)
]

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


#: The splits whose size the report and the extract log check: (table, metrics column of its size,
#: verdict prefix of its track or None, what it is).
SPLITS = (
    ("er_test", "er_n_examples", "er_", "extraction-rate test split (er_test)"),
    ("memorized_test", "n_examples", "", "memorized test split (memorized_test)"),
    ("ood", "ood_n_examples", "ood_", "out-of-domain family (ood)"),
    ("memorized_val", "val_n_examples", None, "validation slice (memorized_val)"),
)
#: Verdict columns of a track (with its prefix) that :func:`mark_underpowered` marks.
VERDICT_COLUMNS = ("vs_origin", "frac_vs_origin", "lev_vs_origin")
UNDERPOWERED = "underpowered"


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


def split_warnings(sizes: dict[str, int]) -> list[str]:
    """One sentence per split that is too small for its purpose (``sizes``: table name -> rows,
    :data:`SPLITS`): a test track below :func:`memctl.stats.min_n_for_width` (its exact 95%
    interval cannot be narrower than :data:`memctl.stats.TARGET_WIDTH`), the validation slice below
    :func:`memctl.stats.min_n_zero_below`. An absent out-of-domain family (0 rows) is not one."""
    need = stats.min_n_for_width()
    out = []
    for table, _, prefix, what in SPLITS:
        if table not in sizes or sizes[table] is None or (isinstance(sizes[table], float) and math.isnan(sizes[table])):
            continue
        n = int(sizes[table])
        if table == "ood" and n == 0:
            continue
        if prefix is None:
            val_min = stats.min_n_zero_below()
            if n < val_min:
                out.append(f"Small {what}: N={n}. Edit strengths and layers are chosen on it; it needs {val_min} "
                           f"sequences for a clean 0/N to rule out a rate of {stats.VALIDATION_BOUND:g} at 95% "
                           f"(0/{n} rules out only {stats.zero_upper_bound(n):.3f}). Raise "
                           f"extract.validation_fraction or add memories.")
            continue
        if n < need:
            out.append(f"Underpowered {what}: N={n}. An exact 95% interval of a rate is narrower than "
                       f"{stats.TARGET_WIDTH:g} only from {need} examples (worst case, a rate of 0.5); at N={n} it "
                       f"can be {stats.worst_case_width(n):.2f} wide. Its 'no evidence of a difference' verdicts are marked '{UNDERPOWERED}' (a significant one "
                       f"stands at any N). "
                       + ("Raise extract.er_test_fraction or add candidates (memctl init sizes it from the data)."
                          if table == "er_test" else "Add candidates or raise extract.test_fraction."
                          if table == "memorized_test" else "Add candidates to that group."))
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


def results_markdown(metrics: pd.DataFrame, data: str = "") -> str:
    """Both evaluation tracks per model (intervals and paired tests where :func:`with_intervals`
    added them), the comparisons the papers draw, then ``data`` (:func:`data_markdown`)."""
    parts = ["# memctl results", ""]
    parts.append(
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
    if "er_" + UNDERPOWERED not in metrics:
        metrics = mark_underpowered(metrics)
    if "settings" not in metrics:
        metrics = with_settings(metrics)
    warn = warnings_markdown(metrics)
    if warn:
        parts[2:2] = [warn, ""]
    parts += ["", STATS_NOTE]
    for model, part in metrics.groupby("model", sort=True):
        parts += ["", f"## {model}"]
        if "er_n_examples" in part and (part["er_n_examples"].fillna(0) > 0).any():
            parts += ["", "### Extraction-rate track", "", markdown_table(part, ER_COLUMNS)]
        parts += ["", "### Memorized track", "", markdown_table(part, MEMORIZED_COLUMNS)]
        if "ood_n_examples" in part and (part["ood_n_examples"].fillna(0) > 0).any():
            parts += ["", "### Out-of-domain family", "",
                      "A candidate group held out of everything the edits train or are tuned on "
                      "(`extract.ood_group`; the demo's quotes), scored on a short suffix "
                      "(`extract.ood_suffix_len`, the loss-curvature paper's 8 tokens), all of its "
                      "candidates whatever the unedited model extracts.", "",
                      markdown_table(part, OOD_COLUMNS)]
        paper = paper_tests_markdown(part)
        if paper:
            parts += ["", "### The papers' comparisons, paired", "",
                      "Each trained mask against the `none` mask of the same seed or swept sparsity (and the "
                      "main-table mask against the `none` objective at its mode's lambda_s: the sparsity-only "
                      "ablation, paper Table 5), on both tracks; K-FAC, SVD and BalancedSubnet against each "
                      "other on the memorized track where each is a single row (with a sweep of K-FAC or SVD "
                      "edits, curvature.md compares the points a declared rule chooses on the validation slice, "
                      "our addition, and the paper's own setting). Verdicts are the row's against the "
                      "reference's on the examples both scored.", "", paper]
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


def plot_edits_by_copies(table: pd.DataFrame, path: Path) -> None:
    """Extraction rate vs copies, one line per edit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    known = table[table["copies"] > 0]
    if known.empty:
        ax.text(0.5, 0.5, "no exposure counts for these candidates", ha="center", va="center")
    for (edit, method), part in known.groupby(["edit", "method"], sort=False):
        part = part.sort_values("copies")
        style = {"color": "black", "linewidth": 2.5} if edit == "none" else {"linewidth": 1, "alpha": 0.8}
        ax.plot(part["copies"], part["exact_er"], marker="o", markersize=3, label=method, **style)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("copies in the training stream (<= bucket)")
    ax.set_ylabel("exact extraction rate (extraction-rate track)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    if not known.empty:
        ax.legend(fontsize=6, ncol=2, loc="upper left")
    ax.set_title("Exact extraction by exposure count, per edit")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


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
    bucket with ``copies = -1`` per group.
    """
    df = by_copies.copy()
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


def plot_extraction(by_copies: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    known = by_copies[by_copies["copies"] > 0]
    if known.empty:
        ax.text(0.5, 0.5, "no exposure counts for these candidates", ha="center", va="center")
    for group, part in known.groupby("group", sort=True):
        part = part.sort_values("copies")
        ax.plot(part["copies"], part["exact_er"], marker="o", label=f"{group} (n={int(part['n'].sum())})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("copies in the training stream (<= bucket)")
    ax.set_ylabel("exact extraction rate")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    if not known.empty:
        ax.legend(fontsize=8)
    ax.set_title("Greedy exact extraction by exposure count")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def formatted_table(df: pd.DataFrame, columns: Sequence[tuple[str, str, str]]) -> pd.DataFrame:
    """The table as the papers print it: chosen columns, their headers, values formatted."""
    cols = [c for c in columns if c[0] in df.columns]
    return pd.DataFrame({h: [_fmt(v, f) for v in df[c]] for c, h, f in cols})


def html_page(title: str, sections: Sequence[tuple[str, pd.DataFrame]], note: str = "") -> str:
    """A small standalone HTML page of tables (for ``snakemake --report`` and browsers)."""
    body = [f"<h1>{title}</h1>", f"<p>{note}</p>" if note else ""]
    for heading, table in sections:
        body += [f"<h2>{heading}</h2>", table.to_html(index=False, border=0, classes="memctl")]
    return _page(title, body)


def results_html(metrics: pd.DataFrame, data: str = "") -> str:
    """The results page: both tracks per model, as :func:`results_markdown` writes them."""
    return markdown_html(results_markdown(metrics, data), "memctl results")


def _inline(text: str) -> str:
    """Escape HTML, then render the inline markup our tables use (`code`, **bold**)."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def markdown_html(text: str, title: str) -> str:
    """The markdown that memctl's report commands write, as a standalone HTML page.

    Covers what those commands emit (``#`` headings, pipe tables, ``-`` lists, paragraphs), so the
    same tables appear in ``snakemake --report`` without another dependency.
    """
    body: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line:
            i += 1
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 6)
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(split_row(lines[i]))
                i += 1
            header, rows = block[0], [r for r in block[1:] if not all(set(c) <= set("-:") for c in r)]
            head = "".join(f"<th>{_inline(c)}</th>" for c in header)
            cells = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
            body.append(f"<table class='memctl'><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
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
    return _page(title, body)


def _page(title: str, body: Sequence[str]) -> str:
    style = "table{border-collapse:collapse}td,th{padding:2px 8px;text-align:right}td:first-child{text-align:left}"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
