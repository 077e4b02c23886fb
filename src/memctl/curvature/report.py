"""Curvature results: one row per edit, K-FAC vs SVD by a declared rule, the paper's setting, plots.

The K-FAC vs SVD comparison is the pair chosen by :mod:`memctl.curvature.selection` (a rule declared
in ``curvature.report`` before any test score exists, our addition: the loss-curvature paper states
none), each chosen point reported on the test tracks with paired tests against the unedited model
and against each other. Beside it, the paper's own setting (Sec. 4.2.1: K-FAC keeping 80% energy in
the first three MLPs, SVD keeping 20% there, and its SVD grid) as rows of its own, chosen by no
rule. Strengths (energy, rho, keep fraction) mean different things per method and per amount of
factor data, so points are compared at a utility budget, never at matched strength. Every K-FAC
method named in ``curvature.report.kfac_forms`` competes as "K-FAC"; the form column tells them apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd

from memctl import metric_records
from memctl.curvature import selection
from memctl.report import markdown_table

#: The curvature edits are compared with the unedited model: the word the verdicts' headers use.
UNEDITED = "unedited"
M = metric_records
COLUMNS = [
    ("method", "Method", "{}"),
    ("form", "Form", "{}"),
    ("edit", "Edit", "{}"),
    ("layers", "Layers", "{}"),
    ("roles", "Roles", "{}"),
    ("strength", "Strength", "{:.3g}"),
    ("paper", "Paper's setting", "{}"),
    # headers and formats of the metrics from their records (memctl.metric_records)
    M.HELDOUT_PPL.column(),
    M.PPL_RATIO.column(header="{} (all windows)", reference=UNEDITED),
    M.PPL_RATIO.column("ci", header="95% CI"),
    M.PPL_RATIO.column("verdict", reference=UNEDITED),
    M.PPL_RATIO.column(prefix="sel_", name="sel_ppl_ratio", header="{} (selection windows)", reference=UNEDITED),
    M.NDCG10_TEXT.column(name="sel_ndcg10"),
    M.EXACT_ER.column(prefix="val_", name="val_exact_er", header="Val. {}"),
    ("within_budget", "Within budget", "{}"),
    *M.STRICT_ACCURACY.columns(reference=UNEDITED),
    *M.LOOSE_ACCURACY.columns(),
    *M.AVG_LEVENSHTEIN.columns(reference=UNEDITED),
    M.EXACT_ER.column(prefix="er_", header="ER track {}"),
    M.NDCG10.column(),
    M.MEM_LOSS.column(),
]

#: Columns of :func:`memctl.report.with_intervals` (memorized track, held-out windows) that the
#: curvature table shows: exact intervals with counts, bootstrap intervals, paired tests vs unedited.
TEST_COLUMNS = ("exact_count", "exact_ci", "exact_er_lo", "exact_er_hi", "vs_origin", "vs_origin_p", "loose_ci",
                "levenshtein_ci", "lev_vs_origin", "lev_vs_origin_p", "ppl_ratio_ci", "ppl_vs_origin", "ppl_vs_origin_p")

#: Said under the table when it carries the tests.
TESTS_NOTE = (
    "k/N, 95% CI of strict and loose accuracy: exact Clopper-Pearson intervals; Avg. Levenshtein: percentile "
    "bootstrap over examples. 'vs unedited': each edit against the unedited model on the same memorized test "
    "sequences (exact McNemar test for strict accuracy, paired bootstrap for Avg. Levenshtein) and the same "
    "held-out windows (paired bootstrap of the perplexity ratio), memctl.stats; verdicts at significance level "
    "0.05."
)

#: (scores track, metrics column prefix, heading) of the test tracks the chosen points are reported on.
TEST_TRACKS = (("memorized", "", "Memorized track, test split"),
               ("extraction_rate", "er_", "Extraction-rate track, test split"))


def add_tests(table: pd.DataFrame, metrics: pd.DataFrame, scores: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """``table`` (:func:`edit_table`) with :data:`TEST_COLUMNS` computed from the per-example
    ``scores`` of each edit (edit -> scores table, the unedited model's under ``none``)."""
    from memctl.report import with_intervals

    ci = with_intervals(metrics, dict(scores)).drop_duplicates("edit").set_index("edit")
    table = table.copy()
    for col in TEST_COLUMNS:
        if col in ci:
            table[col] = table["edit"].map(ci[col])
    return table


def read_specs(deltas: Sequence[str]) -> dict[str, dict]:
    """edit id -> edit spec, from the deltas' headers (no tensors are read)."""
    from memctl.edits import read_delta_metadata

    specs = {}
    for path in deltas:
        meta = read_delta_metadata(path)
        if "edit_id" in meta:
            specs[meta["edit_id"]] = meta.get("spec", {})
    return specs


def edit_table(metrics: pd.DataFrame, specs: Mapping[str, Mapping]) -> pd.DataFrame:
    """Metrics of the unedited model and each curvature edit, with their specs (``spec_method`` =
    the edit's method), PPL ratios and ``paper`` / ``paper_label`` where the spec is the
    loss-curvature paper's setting or a point of its SVD grid (:func:`selection.paper_setting`)."""
    from memctl.curvature.settings import FORMS

    base = metrics[metrics["edit"] == "none"]
    base_ppl = float(base["heldout_ppl"].iloc[0]) if len(base) else math.nan
    rows = []
    for rec in metrics.to_dict("records"):
        spec = specs.get(rec["edit"])
        if rec["edit"] != "none" and spec is None:
            continue
        spec = spec or {}
        paper = selection.paper_setting(spec) if spec else None
        rows.append({
            **rec,
            "kind": "none" if rec["edit"] == "none" else ("svd" if spec["method"] == "svd" else "kfac"),  # all K-FAC forms
            "spec_method": spec.get("method", "none"),
            "calibration": str(spec.get("calibration") or ""),  # an ablation's factors (curvature.ablations)
            "form": FORMS.get(spec.get("method"), "-"),
            "layers": ",".join(map(str, spec["layers"])) if spec.get("layers") else "-",
            "roles": ",".join(spec["roles"]) if spec.get("roles") else ("all" if spec else "-"),
            "strength": spec.get("strength", math.nan),
            "paper": "" if paper is None else paper[1],
            "paper_label": "" if paper is None else paper[0],
            "ppl_ratio": rec["heldout_ppl"] / base_ppl if base_ppl else math.nan,
        })
    if not rows:
        return pd.DataFrame(columns=[c for c, _, _ in COLUMNS])
    df = pd.DataFrame(rows)
    if "ndcg10" not in df:
        df["ndcg10"] = math.nan
    order = {"none": 0, "kfac": 1, "svd": 2}
    df["_o"] = df["kind"].map(order)
    return df.sort_values(["_o", "form", "layers", "strength", "edit"]).drop(columns="_o").reset_index(drop=True)


def prepare(table: pd.DataFrame, scores: Mapping[str, pd.DataFrame] | None, settings: Mapping | None):
    """(table with the selection utility and ``within_budget``, held-out window split, the rule's
    choice, the rule) of an :func:`edit_table` (with :func:`add_tests` where there are scores)."""
    rule = selection.Rule.from_settings(settings)
    table, windows = selection.add_utility(table, scores, rule)
    choice = selection.choose(table, rule)
    table = table.copy()
    table["within_budget"] = ""
    if not choice.candidates.empty and "why_out" in choice.candidates:
        why = dict(zip(choice.candidates["edit"], choice.candidates["why_out"]))
        table["within_budget"] = [("yes" if why[e] == "" else f"no: {why[e]}") if e in why else "-"
                                  for e in table["edit"]]
    return table, windows, choice, rule


# ----------------------------------------------------------------------------- points on the test tracks


def _ppl_test(row: pd.DataFrame | None, ref: pd.DataFrame | None, ids: set | None):
    """Held-out perplexity of ``row`` over ``ref`` on the windows ``ids`` (None = all): paired
    bootstrap over those windows (memctl.stats.compare_perplexity); None without scores."""
    from memctl import stats

    row, ref = selection.heldout_part(row), selection.heldout_part(ref)
    if row is None or ref is None:
        return None
    if ids is not None:
        row, ref = row[row["window"].isin(ids)], ref[ref["window"].isin(ids)]
    both = ref.merge(row, on="window", suffixes=("_ref", "_row"))
    if both.empty:
        return None
    return stats.compare_perplexity(both["nll_sum_row"].to_numpy(), both["nll_sum_ref"].to_numpy(),
                                    int(both["n_tokens_ref"].iloc[0]))


def point_rows(points: Sequence[tuple[str, Mapping]], scores: Mapping[str, pd.DataFrame] | None,
               report_ids: set | None) -> pd.DataFrame:
    """One row per (label, edit record) of ``points``: per test track (:data:`TEST_TRACKS`) Exact
    ER with k/N and its exact interval, Fractional ER and Avg. Levenshtein with bootstrap intervals,
    each tested against the unedited model on the same examples (McNemar; paired bootstrap); the
    perplexity ratio on the report windows with its paired bootstrap test; nDCG@10. Without
    per-example scores the metrics' numbers and no test."""
    from memctl import stats
    from memctl.report import _ci_text, _count_text, paired_tests, track_part, unit_summary

    scores = scores or {}
    rows = []
    for label, rec in points:
        edit = rec["edit"]
        row = {"label": label, "edit": edit, "form": rec.get("form", "-"), "layers": rec.get("layers", "-"),
               "strength": rec.get("strength", math.nan), "sel_ppl_ratio": rec.get("sel_ppl_ratio", math.nan),
               "report_ppl_ratio": rec.get("report_ppl_ratio", math.nan), "sel_ndcg10": rec.get("sel_ndcg10", math.nan),
               "ndcg10": rec.get("ndcg10", math.nan), "within_budget": rec.get("within_budget", "-")}
        for track, prefix, _ in TEST_TRACKS:
            p = "mem_" if track == "memorized" else "er_"
            part, ref = track_part(scores.get(edit), track), track_part(scores.get("none"), track)
            if part is not None:
                own = unit_summary([part])
                row.update({f"{p}n": own["n"], f"{p}exact": own["exact_er"], f"{p}count": _count_text(own["exact_k"], own["n"]),
                            f"{p}ci": _ci_text(own["exact_er_lo"], own["exact_er_hi"]),
                            f"{p}frac": own.get("fractional_er", math.nan),
                            f"{p}frac_ci": _ci_text(own.get("fractional_lo", math.nan), own.get("fractional_hi", math.nan)),
                            f"{p}lev": own.get("avg_levenshtein", math.nan),
                            f"{p}lev_ci": _ci_text(own.get("levenshtein_lo", math.nan), own.get("levenshtein_hi", math.nan))})
                tests = paired_tests([part], [ref]) if edit != "none" and ref is not None else {}
                for col, name in (("vs", "exact"), ("frac_vs", "fractional"), ("lev_vs", "levenshtein")):
                    row[f"{p}{col}"] = stats.verdict(tests.get(name))
            else:
                n = rec.get(f"{prefix}n_examples", 0)
                n = 0 if n is None or (isinstance(n, float) and math.isnan(n)) else int(n)
                exact = rec.get(f"{prefix}exact_er", math.nan)
                row.update({f"{p}n": n, f"{p}exact": exact if n else math.nan,
                            f"{p}count": _count_text(round(exact * n), n) if n and not math.isnan(exact) else "-",
                            f"{p}frac": rec.get(f"{prefix}fractional_er", math.nan) if n else math.nan,
                            f"{p}lev": rec.get("avg_levenshtein", math.nan) if n and not prefix else math.nan})
        test = None if edit == "none" else _ppl_test(scores.get(edit), scores.get("none"), report_ids)
        if test is not None:
            row.update(report_ppl_ratio=test.estimate, report_ppl_ci=_ci_text(test.lo, test.hi),
                       report_ppl_vs=stats.verdict(test))
        rows.append(row)
    return pd.DataFrame(rows)


#: The metrics of a test track's table of :func:`point_rows`: record, then its columns there (after the
#: track's prefix) per part of the record.
POINT_METRICS = (
    (M.EXACT_ER, {"value": "exact", "count": "count", "ci": "ci", "verdict": "vs"}),
    (M.FRACTIONAL_ER, {"value": "frac", "ci": "frac_ci", "verdict": "frac_vs"}),
    (M.AVG_LEVENSHTEIN, {"value": "lev", "ci": "lev_ci", "verdict": "lev_vs"}),
)


def _track_columns(p: str) -> list[tuple[str, str, str]]:
    """The columns of a test track's table of :func:`point_rows` (``p``: its columns' prefix): each
    metric's value, interval and verdict against the unedited model, named by its test."""
    cols = [("label", "Row", "{}"), ("edit", "Edit", "{}"), ("form", "Form", "{}"), ("layers", "Layers", "{}"),
            ("strength", "Strength", "{:.3g}")]
    for metric, names in POINT_METRICS:
        cols += [metric.column(part, name=p + name, reference=UNEDITED, by_test=True) for part, name in names.items()]
    return cols

UTILITY_COLUMNS = [
    ("label", "Row", "{}"), ("edit", "Edit", "{}"), ("within_budget", "Within budget", "{}"),
    M.PPL_RATIO.column(name="sel_ppl_ratio", header="{} (selection windows)", reference=UNEDITED),
    M.PPL_RATIO.column(name="report_ppl_ratio", header="{} (report windows)", reference=UNEDITED),
    M.PPL_RATIO.column("ci", name="report_ppl_ci", header="95% CI"),
    M.PPL_RATIO.column("verdict", name="report_ppl_vs", reference=UNEDITED, by_test=True),
    M.NDCG10.column(name="sel_ndcg10", header="{} (text windows)"),
    M.NDCG10.column(header="{} (non-memorized ER-test sequences, the paper's column)"),
]


def points_markdown(rows: pd.DataFrame) -> list[str]:
    """The test-track tables of :func:`point_rows` (a track only where some row has examples)."""
    parts = []
    for track, _, heading in TEST_TRACKS:
        p = "mem_" if track == "memorized" else "er_"
        if f"{p}n" not in rows or not (rows[f"{p}n"].fillna(0) > 0).any():
            continue
        n = int(rows[f"{p}n"].fillna(0).max())
        parts += [f"{heading} (N={n}):", "", markdown_table(rows, _track_columns(p)), ""]
    parts += ["Utility (held-out text; nDCG@10 against the unedited model's top-10):", "",
              markdown_table(rows, UTILITY_COLUMNS), ""]
    return parts


def compare_points(a: tuple[str, Mapping], b: tuple[str, Mapping], scores: Mapping[str, pd.DataFrame] | None,
                   report_ids: set | None) -> list[str]:
    """``a`` against ``b`` (each (name, edit record)) on the examples both scored, per test track:
    exact McNemar on Exact ER (with the discordant counts), paired bootstrap on Fractional ER and
    Avg. Levenshtein; paired bootstrap of the perplexity ratio on the report windows. Bullet lines;
    without per-example scores the numbers and no test."""
    from memctl import stats
    from memctl.report import paired_tests, track_part, unit_summary

    (na, ra), (nb, rb) = a, b
    scores = scores or {}
    lines = []
    for track, prefix, heading in TEST_TRACKS:
        pa, pb = track_part(scores.get(ra["edit"]), track), track_part(scores.get(rb["edit"]), track)
        if pa is None or pb is None:
            n = ra.get(f"{prefix}n_examples", 0)
            if n and not (isinstance(n, float) and math.isnan(n)):
                lines.append(f"- {heading}: Exact ER {ra.get(prefix + 'exact_er', math.nan):.3f} vs "
                             f"{rb.get(prefix + 'exact_er', math.nan):.3f} (no per-example scores: no paired test).")
            continue
        tests = paired_tests([pa], [pb])
        if not tests:
            lines.append(f"- {heading}: {na} and {nb} share no scored sequence: no paired test.")
            continue
        sa, sb = unit_summary([pa]), unit_summary([pb])
        exact = tests["exact"]
        bits = [f"Exact ER {sa['exact_er']:.3f} vs {sb['exact_er']:.3f}: {na} {stats.verdict(exact)} (exact McNemar; "
                f"{exact.row_only} sequences only {na} reproduces, {exact.ref_only} only {nb})"]
        if "fractional" in tests:
            bits.append(f"Fractional ER {sa['fractional_er']:.3f} vs {sb['fractional_er']:.3f}: "
                        f"{stats.verdict(tests['fractional'])} (paired bootstrap)")
        if "levenshtein" in tests:
            bits.append(f"Avg. Levenshtein {sa['avg_levenshtein']:.3f} vs {sb['avg_levenshtein']:.3f}: "
                        f"{stats.verdict(tests['levenshtein'])} (paired bootstrap)")
        lines.append(f"- {heading} (N={exact.n}): " + "; ".join(bits) + ".")
    ppl = _ppl_test(scores.get(ra["edit"]), scores.get(rb["edit"]), report_ids)
    if ppl is not None:
        lines.append(f"- Held-out PPL, report windows: {na} / {nb} = {ppl.estimate:.3f} [{ppl.lo:.3f}, {ppl.hi:.3f}]: "
                     f"{na} {stats.verdict(ppl)} (paired bootstrap over {ppl.n} windows).")
    elif not scores:
        lines.append(f"- Held-out PPL ratio {ra.get('report_ppl_ratio', math.nan):.3f} vs "
                     f"{rb.get('report_ppl_ratio', math.nan):.3f} (no per-window scores: no paired test).")
    return lines


# ----------------------------------------------------------------------------- the markdown


INTRO = (
    "Memorization on the held-out memorized split (strict = exact suffix, loose = token Levenshtein "
    "similarity >= 0.75) and the extraction-rate track's test split (ER track); held-out PPL = corpus perplexity; "
    "nDCG@10 against the unedited model's top-10 on non-memorized held-out sequences (nDCG@10 (text): on held-out "
    "text windows). Form: `projector` = paper form (Kronecker eigenpairs taken by product lambda_i mu_j until they "
    "hold strength of tr(A) tr(G), then projection on the A and G directions they use), `per-factor` = the same "
    "projection with strength of each factor's energy kept, `pairwise` = public-code form (Fisher pairs kept up to "
    "rho = strength of tr(G) tr(A)), `svd` = top strength share of singular values. Paper's setting: `setting` = "
    "the loss-curvature paper's reported point (Sec. 4.2.1), `grid` = another point of its SVD grid on those "
    "layers. Within budget: the declared rule's utility budget (below), read on the selection windows."
)


def _layers_text(choice: selection.Choice) -> str:
    if choice.layers is None:
        return "-"
    return choice.layers + ("" if choice.roles in (None, "all", "-") else f" ({choice.roles})")


def choice_markdown(table: pd.DataFrame, choice: selection.Choice, windows: selection.Windows,
                    scores: Mapping[str, pd.DataFrame] | None) -> list[str]:
    """The declared rule, what it chose on validation, and the chosen points on the test tracks."""
    rule = choice.rule
    parts = ["## K-FAC vs SVD: points chosen by a declared rule (our addition)", "",
             selection.describe(rule, choice, windows), ""]
    parts += ["### The choice (validation slice and selection windows only)", ""]
    if choice.note:
        parts += [f"**Nothing chosen by the rule where it says so:** {choice.note}.", ""]
    if not choice.layer_sets.empty:
        ls = choice.layer_sets.copy()
        ls["chosen"] = ["yes" if (r["layers"], r["roles"]) == (choice.layers, choice.roles) else ""
                        for r in ls.to_dict("records")]
        parts += ["Layer sets where both methods have edits (in budget / competing; best in-budget point and its "
                  "validation Exact ER):", "", markdown_table(ls, [
                      ("layers", "Layers", "{}"), ("roles", "Roles", "{}"),
                      ("kfac_in_budget", "K-FAC in budget", "{}"), ("kfac_edits", "K-FAC edits", "{}"),
                      ("kfac_best", "K-FAC best", "{}"), ("kfac_best_val", "Val. Exact ER", "{:.3f}"),
                      ("svd_in_budget", "SVD in budget", "{}"), ("svd_edits", "SVD edits", "{}"),
                      ("svd_best", "SVD best", "{}"), ("svd_best_val", "Val. Exact ER", "{:.3f}"),
                      ("chosen", "Chosen", "{}")]), ""]
    rows = []
    for kind, name in selection.KIND_NAMES.items():
        rec = choice.chosen.get(kind)
        if rec is None:
            rows.append({"method": name, "edit": "nothing chosen", "why": choice.why.get(kind, "-")})
            continue
        full = table[table["edit"] == rec["edit"]].iloc[0].to_dict()
        n = choice.n_validation
        rows.append({"method": name, "edit": rec["edit"], "form": full.get("form"), "layers": _layers_text(choice),
                     "strength": full.get("strength"), "val": full.get("val_exact_er"),
                     "val_count": f"{round(float(full.get('val_exact_er')) * n)}/{n}",
                     "sel_ppl_ratio": full.get("sel_ppl_ratio"), "sel_ndcg10": full.get("sel_ndcg10"),
                     "why": "within the budget"})
    parts += [markdown_table(pd.DataFrame(rows), [
        ("method", "Method", "{}"), ("edit", "Chosen edit", "{}"), ("form", "Form", "{}"), ("layers", "Layers", "{}"),
        ("strength", "Strength", "{:.3g}"), ("val", "Val. Exact ER", "{:.3f}"), ("val_count", "k/N", "{}"),
        ("sel_ppl_ratio", "PPL / unedited (selection windows)", "{:.3f}"), ("sel_ndcg10", "nDCG@10 (text)", "{:.3f}"),
        ("why", "Note", "{}")]), ""]
    chosen = [(f"{selection.KIND_NAMES[k]} (chosen)", choice.chosen[k]) for k in selection.KIND_NAMES
              if choice.chosen.get(k) is not None]
    if not chosen:
        return parts
    _, report_ids = selection.window_ids(scores, windows)
    base = table[table["edit"] == "none"]
    points = ([("Unedited", base.iloc[0].to_dict())] if len(base) else []) + [
        (name, table[table["edit"] == rec["edit"]].iloc[0].to_dict()) for name, rec in chosen]
    parts += ["### The chosen points on the test tracks", "",
              "Each chosen edit against the unedited model on the same test sequences (exact McNemar test on Exact "
              "ER, paired bootstrap on Fractional ER and Avg. Levenshtein) and held-out report windows (paired "
              "bootstrap of the perplexity ratio), memctl.stats, level 0.05.", ""]
    parts += points_markdown(point_rows(points, scores, report_ids))
    if len(chosen) == 2:
        (_, k), (_, s) = chosen
        parts += ["Chosen K-FAC against chosen SVD, on the same test sequences and report windows:", "",
                  *compare_points(("K-FAC", table[table["edit"] == k["edit"]].iloc[0].to_dict()),
                                  ("SVD", table[table["edit"] == s["edit"]].iloc[0].to_dict()), scores, report_ids), ""]
    return parts


def paper_markdown(table: pd.DataFrame, windows: selection.Windows, scores: Mapping[str, pd.DataFrame] | None) -> list[str]:
    """The loss-curvature paper's own setting as rows of their own (chosen by no rule of ours)."""
    where = f"layers {selection.PAPER_LAYERS[0]}-{selection.PAPER_LAYERS[-1]}"
    parts = ["## The paper's own setting (loss-curvature paper Sec. 4.2.1, Table 2)", "",
             f"The paper keeps {selection.PAPER_KFAC_ENERGY:.0%} of energy in the first three MLPs for K-FAC and the "
             f"top {selection.PAPER_SVD_KEEP:.0%} of singular values of the same layers for SVD (its Table 2: nDCG@10 "
             "0.91 and 0.90), after sweeping SVD over keeping "
             + ", ".join(f"{g:.0%}" for g in selection.PAPER_SVD_GRID)
             + f" of singular values. Here: `kfac` (the paper's projector rule) at {selection.PAPER_KFAC_ENERGY:g} and "
             f"`svd` at {selection.PAPER_SVD_KEEP:g} on {where} (the MLP matrices), and the grid's other points. These "
             "rows are reported as the paper set them, not chosen by the rule above (they compete in it like every "
             "other edit).", ""]
    rows = table[table.get("paper", pd.Series("", index=table.index)).fillna("") != ""].copy()
    if rows.empty:
        return parts + ["No edit of this configuration is at the paper's setting (`config/paper.yaml` has them).", ""]
    rows["_o"] = [(0 if p == "setting" else 1, 0 if k == "kfac" else 1, s)
                  for p, k, s in zip(rows["paper"], rows["kind"], rows["strength"])]
    rows = rows.sort_values("_o").drop(columns="_o")
    _, report_ids = selection.window_ids(scores, windows)
    base = table[table["edit"] == "none"]
    points = ([("Unedited", base.iloc[0].to_dict())] if len(base) else []) + [
        (rec["paper_label"], rec) for rec in rows.to_dict("records")]
    parts += points_markdown(point_rows(points, scores, report_ids))
    k = [r for r in rows.to_dict("records") if r["paper"] == "setting" and r["kind"] == "kfac"]
    s = [r for r in rows.to_dict("records") if r["paper"] == "setting" and r["kind"] == "svd"]
    if k and s:
        parts += ["The paper's K-FAC against the paper's SVD, on the same test sequences and report windows:", "",
                  *compare_points(("K-FAC (paper)", k[0]), ("SVD (paper)", s[0]), scores, report_ids), ""]
    return parts


def curvature_markdown(table: pd.DataFrame, settings: Mapping, spectrum: pd.DataFrame | None = None,
                       examples_md: str = "", scores: Mapping[str, pd.DataFrame] | None = None,
                       prepared=None) -> str:
    """The curvature report: every edit, the declared rule's choice and its chosen points on the
    test tracks, the paper's setting, examples and spectrum bands. ``prepared`` = :func:`prepare`'s
    result (computed here when not given)."""
    table, windows, choice, _ = prepared if prepared is not None else prepare(table, scores, settings)
    parts = ["# Curvature edits (K-FAC vs SVD)", "", INTRO, "", markdown_table(table, COLUMNS), "",
             *([TESTS_NOTE, ""] if "vs_origin" in table else [])]
    parts += choice_markdown(table, choice, windows, scores)
    parts += paper_markdown(table, windows, scores)
    parts += ["The frontier plot (`curvature_sweep.png`): validation Exact ER against the selection-window PPL ratio "
              "(what the rule reads), and each test track's Exact ER against the report-window PPL ratio, every edit; "
              "chosen points circled, the paper's setting marked."]
    if examples_md:
        parts += ["", examples_md]
    if spectrum is not None and len(spectrum):
        cols = [("short", "Matrix", "{}"), ("basis", "Basis", "{}"), ("band", "Band", "{}"),
                ("mean_norm_memorized", "Memorized", "{:.4g}"), ("mean_norm_nonmemorized", "Non-memorized", "{:.4g}"),
                ("ratio_memorized_over_nonmemorized", "Ratio", "{:.3f}")]
        parts += ["", "## Spectrum bands (paper Fig. 2): mean ||Zx|| per band", "", markdown_table(spectrum, cols)]
    return "\n".join(parts) + "\n"


def examples(pair: Sequence[Mapping], scores: Mapping[str, pd.DataFrame], memorized: pd.DataFrame,
             decode, n: int = 5) -> pd.DataFrame:
    """The loss-curvature paper's appendix D table: for ``n`` memorized test sequences, the decoded
    prefix, the true suffix and the greedy generation of the unedited model and of each edit of
    ``pair`` (the chosen K-FAC and SVD edits). Sequences that some edit changed come first (in
    candidate order), so the table shows what the edits do; ``decode`` maps token ids to text."""
    gens = {}
    for edit in ["none", *(r["edit"] for r in pair)]:
        table = scores.get(edit)
        if table is None or "generated_ids" not in table:
            return pd.DataFrame()
        part = table[table["track"] == "memorized"] if "track" in table else table
        gens[edit] = dict(zip(part["candidate_id"], part["generated_ids"]))
    rows = []
    for rec in memorized.sort_values("candidate_id").to_dict("records"):
        cid = rec["candidate_id"]
        if any(cid not in g for g in gens.values()):
            continue
        suffix = [int(t) for t in rec["suffix_ids"]]
        changed = any([int(t) for t in gens[r["edit"]][cid]] != suffix for r in pair)
        row = {"candidate_id": cid, "changed": changed, "prefix": decode(rec["prefix_ids"]), "suffix": decode(suffix),
               "none": decode(gens["none"][cid])}
        for r in pair:
            row[r["edit"]] = decode(gens[r["edit"]][cid])
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return df.sort_values(["changed", "candidate_id"], ascending=[False, True]).head(n).reset_index(drop=True)


def examples_markdown(table: pd.DataFrame, pair: Sequence[Mapping]) -> str:
    if table.empty:
        return ""
    cols = [("candidate_id", "Sequence", "{}"), ("prefix", "Prefix", "{}"), ("suffix", "True suffix", "{}"),
            ("none", "Unedited", "{}")]
    cols += [(r["edit"], f"{'K-FAC' if r['kind'] == 'kfac' else 'SVD'} ({r['edit']})", "{}") for r in pair]
    return "\n".join(["## Examples (paper appendix D): generations before and after the chosen edits", "",
                      "Memorized test sequences, those an edit changed first; greedy continuations of the prefix.",
                      "", markdown_table(table, cols)])


def _ratio_ticks(limits: tuple[float, float], budget: float | None) -> list[float]:
    """Perplexity-ratio ticks within ``limits`` on a log axis: 1, the budget, then 1-2-5 steps, each
    kept only at least 1/12 of the axis's log range from the ones before (no overlapping labels)."""
    lo, hi = (max(v, 1e-9) for v in limits)
    span = math.log(hi / lo) if hi > lo else 1.0
    candidates = [1.0, *([budget] if budget else []), 1.1, 1.2, 1.5]
    candidates += [m * 10.0 ** e for e in range(-2, 7) for m in (1, 2, 5)]
    ticks: list[float] = []
    for t in candidates:
        if lo <= t <= hi and all(abs(math.log(t / k)) >= span / 12 for k in ticks):
            ticks.append(t)
    return sorted(ticks)


def plot_frontier(table: pd.DataFrame, choice: selection.Choice, path, provenance=None) -> None:
    """Memorization against held-out perplexity ratio, every edit: the validation slice against the
    selection windows (what the rule reads, its budget drawn), then each test track (memorized,
    extraction-rate) against the report windows; each method's lower frontier drawn, the chosen
    points circled, the paper's setting marked (squares: its reported setting, rings: its SVD grid).
    K-FAC and SVD in their colours of :mod:`memctl.plots` (the forms of K-FAC by marker). Writes
    ``path`` (PNG) and the SVG beside it (with ``provenance``: their sidecars)."""
    import matplotlib.ticker

    from memctl import plots

    panels = [("val_exact_er", "sel_ppl_ratio", "validation slice (selection)", "selection windows")]
    for track, prefix, heading in TEST_TRACKS:
        col = "strict_accuracy" if track == "memorized" else f"{prefix}exact_er"
        n = f"{prefix}n_examples"
        if col in table and (n not in table or (table[n].fillna(0) > 0).any()):
            panels.append((col, "report_ppl_ratio", heading, "report windows"))
    kfac, svd, origin = plots.FAMILIES["kfac"], plots.FAMILIES["svd"], plots.FAMILIES["origin"]
    styles = {("kfac", "projector"): (kfac.color, "o", "K-FAC (projector)"),
              ("kfac", "per-factor"): (kfac.color, "D", "K-FAC (per factor)"),
              ("kfac", "pairwise"): (kfac.color, "p", "K-FAC (pairwise)"),
              ("svd", "svd"): (svd.color, svd.marker, "SVD"), ("none", "-"): (origin.color, origin.marker, "unedited")}
    paper_color = plots.PALETTE["bluish_green"]
    chosen = {r["edit"]: f"chosen {selection.KIND_NAMES[k]}" for k, r in choice.chosen.items() if r is not None}
    budget = choice.rule.max_ppl_ratio
    with plots.style():
        fig, axes = plots.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
        for ax, (ycol, xcol, title, windows) in zip(axes[0], panels):
            if ycol not in table or xcol not in table:
                ax.set_visible(False)
                continue
            data = table[table[xcol].notna() & table[ycol].notna()]
            if "calibration" in data:  # ablation rows (other factors): grey crosses, outside the frontiers
                other = data[data["calibration"].fillna("").astype(str) != ""]
                data = data[data["calibration"].fillna("").astype(str) == ""]
                if not other.empty:
                    ax.scatter(other[xcol], other[ycol], c=plots.PALETTE["grey"], marker="x", s=24, alpha=0.8,
                               zorder=3, label="K-FAC, ablation factors ("
                               + ", ".join(sorted(set(other["calibration"]))) + ")")
            for (kind, form), (color, marker, label) in styles.items():
                part = data[(data["kind"] == kind) & (data["form"] == form)]
                if not part.empty:
                    ax.scatter(part[xcol], part[ycol], c=color, marker=marker, s=70 if kind == "none" else 28,
                               label=label, alpha=0.9, edgecolors="none", zorder=3)
            for kind, color in (("kfac", kfac.color), ("svd", svd.color)):  # lower frontier: least memorization so far
                part = data[data["kind"].isin([kind, "none"])].sort_values(xcol)
                if len(part) > 1:
                    ax.step(part[xcol], part[ycol].cummin(), where="post", color=color, alpha=0.45, lw=1, zorder=2)
            paper = data[data.get("paper", pd.Series("", index=data.index)).fillna("") != ""]
            for rec in paper.to_dict("records"):
                square = rec["paper"] == "setting"
                ax.scatter([rec[xcol]], [rec[ycol]], s=150 if square else 90, marker="s" if square else "o",
                           facecolors="none", edgecolors=paper_color, linewidths=1.5, zorder=4,
                           label="paper's setting" if square else "paper's SVD grid")
            for rec in data[data["edit"].isin(chosen)].to_dict("records"):
                ax.scatter([rec[xcol]], [rec[ycol]], s=260, marker="o", facecolors="none", edgecolors="black",
                           linewidths=1.8, zorder=5)
                ax.annotate(chosen[rec["edit"]], (rec[xcol], rec[ycol]), textcoords="offset points", xytext=(8, 8),
                            fontsize=8)
            if budget is not None:
                ax.axvline(budget, color=plots.REFERENCE, ls="--", lw=1, label=f"PPL budget {budget:g} (selection windows)")
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(_ratio_ticks(ax.get_xlim(), budget)))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(f"held-out PPL / unedited, {windows} (log scale)")
            ax.set_ylabel(f"Exact ER, {title}")
            ax.set_title(title, fontsize=10)
            ax.set_ylim(-0.03, 1.03)
        handles, labels = axes[0][0].get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        axes[0][0].legend(seen.values(), seen.keys(), fontsize=7)
        fig.suptitle("Memorization against utility, every curvature edit (lower left is better)")
        fig.tight_layout()
        plots.save(fig, path, provenance)
