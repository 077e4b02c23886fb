"""Tables and plots that read like the papers' tables.

``results.md`` holds one row per (model, edit); later methods add rows by adding metrics files.
The extraction curve (exact extraction by exposure count) is a table and a plot.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

# (column, header, format) in the order the papers print them.
RESULT_COLUMNS = [
    ("method", "Method", "{}"),
    ("edit", "Edit", "{}"),
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
    ("edit", "Edit", "{}"),
    ("converged", "Converged", "{}"),  # the marker: only where the metrics carry it
    ("er_exact_er", "Exact ER", "{:.3f}"),
    ("er_exact_ci", "95% CI", "{}"),
    ("er_fractional_er", "Fractional ER", "{:.3f}"),
    ("er_fractional_ci", "95% CI", "{}"),
    ("er_vs_origin", "vs Origin (Exact ER)", "{}"),
    ("heldout_ppl", "Held-out PPL", "{:.2f}"),
    ("ppl_ratio", "PPL / Origin", "{:.3f}"),
    ("ppl_ratio_ci", "95% CI (PPL ratio)", "{}"),
    ("er_n_examples", "N", "{}"),
]


def _ci_text(lo: float, hi: float) -> str:
    return "-" if math.isnan(lo) else f"[{lo:.3f}, {hi:.3f}]"


def _versus(lo: float, hi: float, ref_lo: float, ref_hi: float) -> str:
    """Do two 95% intervals overlap? In words, for the reader of the table."""
    if any(math.isnan(v) for v in (lo, hi, ref_lo, ref_hi)):
        return "-"
    if hi < ref_lo:
        return "lower (no overlap)"
    if lo > ref_hi:
        return "higher (no overlap)"
    return "overlap"


def with_intervals(metrics: pd.DataFrame, scores: dict[str, pd.DataFrame], n_boot: int = 1000) -> pd.DataFrame:
    """``metrics`` with bootstrap 95% intervals of Exact ER and Fractional ER on both tracks (from
    each edit's per-example ``scores``) and, per edit, whether its Exact ER interval overlaps the
    unedited model's."""
    from memctl.metrics import rate_ci

    out = metrics.copy()
    for prefix, track in (("", "memorized"), ("er_", "extraction_rate"), ("ood_", "ood")):
        bounds = {}
        for edit, table in scores.items():
            part = table[table["track"] == track] if "track" in table else table.iloc[0:0]
            ci = rate_ci(part["exact_match"].to_numpy(), part["n_match"].to_numpy(), part["n_suffix"].to_numpy(),
                         n_boot=n_boot)
            bounds[edit] = ci
        ref = bounds.get("none", {"exact_er": (math.nan, math.nan)})["exact_er"]
        nan = {"exact_er": (math.nan, math.nan), "fractional_er": (math.nan, math.nan)}
        out[f"{prefix}exact_ci"] = [_ci_text(*bounds.get(e, nan)["exact_er"]) for e in out["edit"]]
        out[f"{prefix}fractional_ci"] = [_ci_text(*bounds.get(e, nan)["fractional_er"]) for e in out["edit"]]
        out[f"{prefix}vs_origin"] = ["-" if e == "none" else _versus(*bounds.get(e, nan)["exact_er"], *ref)
                                     for e in out["edit"]]
        for i, name in enumerate(("lo", "hi")):
            out[f"{prefix}exact_er_{name}"] = [bounds.get(e, nan)["exact_er"][i] for e in out["edit"]]
    out["ppl_ratio"], out["ppl_ratio_ci"] = math.nan, "-"
    held = {e: t[t["track"] == "heldout"].sort_values("window") for e, t in scores.items()
            if "track" in t and "window" in t}
    base = held.get("none")
    if base is not None and len(base):
        from memctl.metrics import ppl_ratio_ci

        tokens = int(base["n_tokens"].iloc[0])
        for i, edit in enumerate(out["edit"]):
            part = held.get(edit)
            if part is None or len(part) != len(base):
                continue
            ratio, lo, hi = ppl_ratio_ci(part["nll_sum"].to_numpy(), base["nll_sum"].to_numpy(), tokens, n_boot)
            out.loc[out.index[i], "ppl_ratio"] = ratio
            out.loc[out.index[i], "ppl_ratio_ci"] = "-" if edit == "none" else _ci_text(lo, hi)
    return out


OOD_COLUMNS = [
    ("method", "Method", "{}"),
    ("edit", "Edit", "{}"),
    ("converged", "Converged", "{}"),
    ("ood_exact_er", "Exact ER", "{:.3f}"),
    ("ood_exact_ci", "95% CI", "{}"),
    ("ood_fractional_er", "Fractional ER", "{:.3f}"),
    ("ood_vs_origin", "vs Origin (Exact ER)", "{}"),
    ("ood_loose_accuracy", "Loose acc.", "{:.3f}"),
    ("ood_n_examples", "N", "{}"),
]


MEMORIZED_COLUMNS = [
    ("method", "Method", "{}"),
    ("edit", "Edit", "{}"),
    ("converged", "Converged", "{}"),  # the marker: only where the metrics carry it
    ("heldout_loss", "Held-out loss", "{:.3f}"),
    ("heldout_ppl", "Held-out PPL", "{:.2f}"),
    ("ppl_ratio", "PPL / Origin", "{:.3f}"),
    ("ppl_ratio_ci", "95% CI (PPL ratio)", "{}"),
    ("fractional_er", "Fractional ER", "{:.3f}"),
    ("exact_er", "Exact ER", "{:.3f}"),
    ("exact_ci", "95% CI", "{}"),
    ("vs_origin", "vs Origin (Exact ER)", "{}"),
    ("loose_accuracy", "Loose acc.", "{:.3f}"),
    ("avg_levenshtein", "Avg. Levenshtein", "{:.3f}"),
    ("mem_loss", "Mem. loss", "{:.3f}"),
    ("mem_ppl", "Mem. PPL", "{:.2f}"),
    ("ndcg10", "nDCG@10", "{:.3f}"),
    ("ndcg10_text", "nDCG@10 (text)", "{:.3f}"),
    ("n_examples", "N", "{}"),
]


def versus_none_mask(part: pd.DataFrame, prefix: str = "er_") -> str:
    """In words, for the pruning paper's comparison: does each trained mask's Exact ER interval
    (``Ours (up)`` / ``(down)`` / ``(reciprocal)``) overlap the ``Ours (none)`` mask's, the same
    sparsity without a memorization term? Empty where there is no ``none`` mask or no intervals."""
    lo, hi = f"{prefix}exact_er_lo", f"{prefix}exact_er_hi"
    if lo not in part or "method" not in part:
        return ""
    rows = {m: r for m, r in zip(part["method"], part.to_dict("records"))}
    ref = rows.get("Ours (none)")
    if ref is None or math.isnan(ref[lo]):
        return ""
    sentences = []
    for mode in ("up", "down", "reciprocal"):
        row = rows.get(f"Ours ({mode})")
        if row is None or math.isnan(row[lo]):
            continue
        verdict = _versus(row[lo], row[hi], ref[lo], ref[hi])
        word = {"overlap": "overlaps", "lower (no overlap)": "is lower than (no overlap with)",
                "higher (no overlap)": "is higher than (no overlap with)"}[verdict]
        sentences.append(f"Ours ({mode}) Exact ER {row[prefix + 'exact_er']:.3f} [{row[lo]:.3f}, {row[hi]:.3f}] "
                         f"{word} Ours (none) {ref[prefix + 'exact_er']:.3f} [{ref[lo]:.3f}, {ref[hi]:.3f}].")
    return " ".join(sentences)


def results_markdown(metrics: pd.DataFrame, data: str = "") -> str:
    """Both evaluation tracks per model (intervals where :func:`with_intervals` added them), then
    ``data`` (:func:`data_markdown`)."""
    parts = ["# memctl results", ""]
    parts.append(
        "Two evaluation tracks. Extraction-rate track (weight-pruning paper Sec. 4.1): greedy generation on a "
        "held-out split of all candidates, stratified by group and copy count, whatever the unedited model "
        "extracts. Memorized track (loss-curvature paper Sec. 4.2): held-out sequences the unedited model "
        "extracts exactly (so its Exact ER there is 1 by construction). Exact ER = strict accuracy; Fractional "
        "ER = matching suffix positions pooled; loose = token Levenshtein similarity >= 0.75. 95% CI: "
        "percentile bootstrap over examples (1000 resamples); PPL / Origin: held-out perplexity over the unedited model's, with a paired bootstrap interval over the same windows; 'vs Origin' says whether the edit's Exact ER "
        "interval overlaps the unedited model's. Held-out PPL is corpus perplexity over non-overlapping "
        "context-length windows; Mem. loss/PPL is teacher-forced on the memorized suffixes. nDCG@10 compares "
        "each position's top-10 next tokens with the unedited model's (1 = unchanged): on non-memorized held-out "
        "sequences (the loss-curvature paper's column) and on held-out text windows (text)."
    )
    for model, part in metrics.groupby("model", sort=True):
        parts += ["", f"## {model}"]
        if "er_n_examples" in part and (part["er_n_examples"].fillna(0) > 0).any():
            parts += ["", "### Extraction-rate track", "", markdown_table(part, ER_COLUMNS)]
            versus = versus_none_mask(part)
            if versus:
                parts += ["", "Masks against the mask trained without a memorization term (95% intervals): " + versus]
        parts += ["", "### Memorized track", "", markdown_table(part, MEMORIZED_COLUMNS)]
        if "ood_n_examples" in part and (part["ood_n_examples"].fillna(0) > 0).any():
            parts += ["", "### Out-of-domain family", "",
                      "A candidate group held out of everything the edits train or are tuned on "
                      "(`extract.ood_group`; the demo's quotes), scored on a short suffix "
                      "(`extract.ood_suffix_len`, the loss-curvature paper's 8 tokens), all of its "
                      "candidates whatever the unedited model extracts.", "",
                      markdown_table(part, OOD_COLUMNS)]
    return "\n".join(parts) + "\n" + data


def data_markdown(records: dict[str, dict]) -> str:
    """What the data stages kept and dropped, from their sidecars (``records``: stage -> sidecar):
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
    cal = records.get("calibration")
    if cal and cal.get("dropped_for_test_overlap"):
        d = cal["dropped_for_test_overlap"]
        rows.append({"stage": "calibration", "kept": f"{cal.get('windows', '?')} of {d.get('of', '?')} windows",
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
