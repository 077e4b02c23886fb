"""Curvature results: one row per edit, the sweep plot, and K-FAC vs SVD at matched perplexity.

Edits are compared at matched held-out perplexity, not matched strength: strengths (energy, rho,
keep fraction) mean different things per method and per amount of factor data. Every K-FAC method
(``kfac``, ``kfac_factor``, ``kfac_pairwise``) is of kind "kfac" in the K-FAC vs SVD comparison; the
form column tells them apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd

from memctl.report import markdown_table

COLUMNS = [
    ("method", "Method", "{}"),
    ("form", "Form", "{}"),
    ("edit", "Edit", "{}"),
    ("layers", "Layers", "{}"),
    ("roles", "Roles", "{}"),
    ("strength", "Strength", "{:.3g}"),
    ("heldout_ppl", "Held-out PPL", "{:.2f}"),
    ("ppl_ratio", "PPL / unedited", "{:.3f}"),
    ("ppl_ratio_ci", "95% CI", "{}"),
    ("ppl_vs_origin", "vs unedited (PPL)", "{}"),
    ("strict_accuracy", "Strict acc.", "{:.3f}"),
    ("exact_count", "k/N", "{}"),
    ("exact_ci", "95% CI", "{}"),
    ("vs_origin", "vs unedited (strict)", "{}"),
    ("val_exact_er", "Val. strict acc.", "{:.3f}"),
    ("loose_accuracy", "Loose acc.", "{:.3f}"),
    ("loose_ci", "95% CI", "{}"),
    ("avg_levenshtein", "Avg. Levenshtein", "{:.3f}"),
    ("levenshtein_ci", "95% CI", "{}"),
    ("lev_vs_origin", "vs unedited (Levenshtein)", "{}"),
    ("ndcg10", "nDCG@10", "{:.3f}"),
    ("mem_loss", "Mem. loss", "{:.3f}"),
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


def pair_tests(k: Mapping, s: Mapping, scores: Mapping[str, pd.DataFrame] | None) -> str:
    """The chosen K-FAC edit against the chosen SVD edit on the memorized test sequences both
    scored, in words: exact McNemar tests of strict and loose accuracy, paired bootstrap of average
    Levenshtein and of the held-out perplexity ratio (``lower`` = K-FAC's is lower). Without
    per-example scores, the numbers only: no test."""
    head = (f"K-FAC vs SVD on the test split: strict {k['strict_accuracy']:.3f} vs {s['strict_accuracy']:.3f}, loose "
            f"{k['loose_accuracy']:.3f} vs {s['loose_accuracy']:.3f}")
    if not scores or k["edit"] not in scores or s["edit"] not in scores:
        return head + " (no per-example scores: no paired test)."
    from memctl import stats
    from memctl.report import paired_tests, perplexity_test, track_part

    tests = paired_tests([track_part(scores[k["edit"]], "memorized")], [track_part(scores[s["edit"]], "memorized")])
    if not tests:
        return head + " (they share no scored sequence: no paired test)."
    exact = tests["exact"]
    bits = [f"strict: K-FAC {stats.verdict(exact)} (exact McNemar, {exact.row_only} sequences only K-FAC "
            f"reproduces vs {exact.ref_only} only SVD)"]
    if "loose" in tests:
        bits.append(f"loose: K-FAC {stats.verdict(tests['loose'])} (exact McNemar)")
    if "levenshtein" in tests:
        bits.append(f"Avg. Levenshtein: K-FAC {stats.verdict(tests['levenshtein'])} (paired bootstrap)")
    ppl = perplexity_test(scores[k["edit"]], scores[s["edit"]])
    if ppl is not None:
        bits.append(f"held-out PPL: K-FAC {stats.verdict(ppl)} (ratio {ppl.estimate:.3f} "
                    f"[{ppl.lo:.3f}, {ppl.hi:.3f}], paired bootstrap over windows)")
    return head + "; " + "; ".join(bits) + "."


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
    """Metrics of the unedited model and each curvature edit, with their specs and PPL ratios."""
    from memctl.curvature.settings import FORMS

    base = metrics[metrics["edit"] == "none"]
    base_ppl = float(base["heldout_ppl"].iloc[0]) if len(base) else math.nan
    rows = []
    for rec in metrics.to_dict("records"):
        spec = specs.get(rec["edit"])
        if rec["edit"] != "none" and spec is None:
            continue
        spec = spec or {}
        rows.append({
            **rec,
            "kind": "none" if rec["edit"] == "none" else ("svd" if spec["method"] == "svd" else "kfac"),  # all K-FAC forms
            "form": FORMS.get(spec.get("method"), "-"),
            "layers": ",".join(map(str, spec["layers"])) if spec.get("layers") else "-",
            "roles": ",".join(spec["roles"]) if spec.get("roles") else ("all" if spec else "-"),
            "strength": spec.get("strength", math.nan),
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


def selection_track(table: pd.DataFrame) -> tuple[str, str, str]:
    """(exact column, loose column, what they are measured on) that strengths are chosen by: the
    memorized track's validation slice when every edit was scored on one, else (and the report
    says so) the test split."""
    if "val_n_examples" in table and len(table) and (table["val_n_examples"].fillna(0) > 0).all():
        n = int(table["val_n_examples"].iloc[0])
        return "val_exact_er", "val_loose_accuracy", f"the validation slice ({n} memorized sequences held out of the train side)"
    return "strict_accuracy", "loose_accuracy", ("the TEST split (the validation slice is empty: extract.validation_fraction is 0 or the "
                                                  "memorized set too small)")


def best_matched(table: pd.DataFrame, tolerance: float = 0.05, max_ppl_ratio: float | None = 1.5):
    """The (K-FAC row, SVD row) pair within ``tolerance`` relative held-out perplexity of each other
    (and at most ``max_ppl_ratio`` x the unedited model's) with the lowest memorization on the
    selection track (:func:`selection_track`: the validation slice, never the test split when
    there is one): summed exact match, then summed loose accuracy, then mean perplexity. None when
    no pair matches."""
    exact, loose, _ = selection_track(table)
    ok = table if max_ppl_ratio is None else table[table["ppl_ratio"] <= max_ppl_ratio]
    kfac, svd = ok[ok["kind"] == "kfac"], ok[ok["kind"] == "svd"]
    best, best_key = None, None
    for k in kfac.to_dict("records"):
        for s in svd.to_dict("records"):
            if abs(math.log(k["heldout_ppl"] / s["heldout_ppl"])) > math.log1p(tolerance):
                continue
            key = (k[exact] + s[exact], k[loose] + s[loose], k["heldout_ppl"] + s["heldout_ppl"], k["edit"], s["edit"])
            if best_key is None or key < best_key:
                best, best_key = (k, s), key
    return best


def curvature_markdown(table: pd.DataFrame, settings: Mapping, spectrum: pd.DataFrame | None = None,
                       examples_md: str = "", scores: Mapping[str, pd.DataFrame] | None = None) -> str:
    tol = float(settings.get("match_tolerance", 0.05))
    cap = settings.get("max_ppl_ratio", 1.5)
    parts = [
        "# Curvature edits (K-FAC vs SVD)", "",
        "Memorization on the held-out memorized split (strict = exact suffix, loose = token Levenshtein "
        "similarity >= 0.75); held-out PPL = corpus perplexity; nDCG@10 against the unedited model's "
        "top-10 on non-memorized held-out text. Form: `projector` = paper form (Kronecker eigenpairs "
        "taken by product lambda_i mu_j until they hold strength of tr(A) tr(G), then projection on "
        "the A and G directions they use), `per-factor` = the same projection with strength of each "
        "factor's energy kept, `pairwise` = public-code form (Fisher pairs kept up to rho = strength "
        "of tr(G) tr(A)), `svd` = top strength share of singular values.", "",
        markdown_table(table, COLUMNS), "",
        *([TESTS_NOTE, ""] if "vs_origin" in table else []),
        f"## Best K-FAC vs best SVD at matched held-out perplexity (within {tol:.0%}"
        + (f", PPL at most {cap}x the unedited model's" if cap is not None else "") + ")", "",
    ]
    pair = best_matched(table, tol, cap)
    base = table[table["kind"] == "none"]
    if pair is None:
        parts.append("No K-FAC and SVD edits with matching perplexity: widen the strength sweeps.")
    else:
        rows = pd.concat([base, pd.DataFrame(list(pair))], ignore_index=True)
        parts.append(markdown_table(rows, COLUMNS))
        k, s = pair
        parts += ["", f"The pair was chosen on {selection_track(table)[2]}; the rows show the test split.",
                  "", f"At matched perplexity ({k['heldout_ppl']:.2f} vs {s['heldout_ppl']:.2f}): "
                  + pair_tests(k, s, scores)]
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


def plot_sweep(table: pd.DataFrame, path) -> None:
    """Strict and loose accuracy vs held-out perplexity, one point per edit, K-FAC vs SVD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120, sharex=True)
    styles = {("kfac", "projector"): ("tab:red", "o", "K-FAC (projector)"),
              ("kfac", "per-factor"): ("tab:purple", "D", "K-FAC (per factor)"),
              ("kfac", "pairwise"): ("tab:orange", "s", "K-FAC (pairwise)"),
              ("svd", "svd"): ("tab:blue", "^", "SVD"), ("none", "-"): ("black", "*", "unedited")}
    for ax, metric, title in ((axes[0], "strict_accuracy", "strict (exact) accuracy"),
                              (axes[1], "loose_accuracy", "loose accuracy (Levenshtein sim. >= 0.75)")):
        for (kind, form), (color, marker, label) in styles.items():
            part = table[(table["kind"] == kind) & (table["form"] == form)]
            if part.empty:
                continue
            ax.scatter(part["heldout_ppl"], part[metric], c=color, marker=marker, s=60 if kind == "none" else 28,
                       label=label, alpha=0.85, edgecolors="none")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("held-out perplexity (log scale)")
        ax.set_ylabel(title)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Memorization vs utility, one point per edit")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
