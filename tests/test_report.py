"""Results tables: exposure buckets pooled by hand-checked weights; tables without counts; paired tests."""

import math

import pandas as pd
import pytest

from memctl import report


def test_bucket_copies_pools_powers_of_two():
    by = pd.DataFrame(
        {"group": ["a", "a", "a", "b"], "copies": [1, 3, 4, -1], "n": [2, 1, 3, 5],
         "exact_er": [0.0, 1.0, 0.0, 0.2], "fractional_er": [0.5, 1.0, 0.2, 0.5], "loose_accuracy": [0, 1, 0, 0.4]}
    )
    out = report.bucket_copies(by).set_index(["group", "copies"])
    # copies 3 and 4 share bucket 4: n = 1 + 3, exact = (1*1 + 3*0) / 4, fractional = (1*1 + 3*0.2) / 4.
    assert out.loc[("a", 4), "n"] == 4
    assert out.loc[("a", 4), "exact_er"] == pytest.approx(0.25)
    assert out.loc[("a", 4), "fractional_er"] == pytest.approx(0.4)
    assert out.loc[("a", 1), "n"] == 2
    assert out.loc[("b", -1), "n"] == 5  # unknown exposure stays one bucket



def test_bucket_copies_pools_families_by_kind():
    """Two record families and a control group: the families are one line, weighted by n, named
    with their number; the control group stays as it is."""
    by = pd.DataFrame({"group": ["canary-records-0", "canary-records-1", "canary-records-1", "canary-words"],
                       "copies": [8, 8, 16, 8], "n": [1, 3, 2, 4], "exact_er": [1.0, 0.0, 0.5, 0.25],
                       "fractional_er": [1.0, 0.5, 0.5, 0.5], "loose_accuracy": [1.0, 0.0, 1.0, 0.5]})
    out = report.bucket_copies(by).set_index(["group", "copies"])
    assert set(out.index) == {("canary-records (2 families)", 8), ("canary-records (2 families)", 16),
                              ("canary-words", 8)}
    assert out.loc[("canary-records (2 families)", 8), "n"] == 4
    assert out.loc[("canary-records (2 families)", 8), "exact_er"] == pytest.approx(0.25)  # (1*1 + 3*0) / 4
    assert out.loc[("canary-words", 8), "exact_er"] == pytest.approx(0.25)


def test_tables_render_missing_values_and_unknown_counts(tmp_path):
    metrics = pd.DataFrame([{"model": "m", "edit": "none", "method": "Origin", "exact_er": float("nan"),
                             "heldout_ppl": 30.8123, "n_examples": 0}])
    md = report.results_markdown(metrics)
    assert "| Origin | none | 30.81 | - | 0 |" in md
    by = report.bucket_copies(pd.DataFrame({"group": ["all"], "copies": [-1], "n": [3], "exact_er": [1.0],
                                            "fractional_er": [1.0], "loose_accuracy": [1.0]}))
    assert "| all | unknown | 3 | 1.000 |" in report.extraction_markdown(by)
    report.plot_extraction(by, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_markdown_pages_render_tables_lists_and_escape_cells():
    md = ("# Title `x`\n\nSome **bold** text\nthat wraps.\n\n| Method | PPL |\n|---|---:|\n| Ours (up) | 1.50 |\n"
          "| a<b | - |\n\n- note one\n- note two\n")
    page = report.markdown_html(md, "T & U")
    assert "<title>T &amp; U</title>" in page
    assert "<h1>Title <code>x</code></h1>" in page
    assert "<p>Some <b>bold</b> text that wraps.</p>" in page
    assert "<thead><tr><th>Method</th><th>PPL</th></tr></thead>" in page
    assert "<tr><td>Ours (up)</td><td>1.50</td></tr><tr><td>a&lt;b</td><td>-</td></tr>" in page
    assert "---" not in page  # the separator row is not a data row
    assert "<ul><li>note one</li><li>note two</li></ul>" in page


def test_a_pipe_in_a_label_keeps_the_columns():
    """An edit label with `|` (or a newline) is one cell in the markdown table and the HTML page."""
    import pandas as pd

    from memctl.report import markdown_html, results_markdown, split_row

    metrics = pd.DataFrame([{"model": "m", "method": "K-FAC | rho=0.5\nnew", "edit": "e", "exact_er": 0.5,
                             "n_examples": 4}])
    text = results_markdown(metrics)
    rows = [line for line in text.splitlines() if line.startswith("| K-FAC")]
    header = next(line for line in text.splitlines() if line.startswith("| Method"))
    assert len(split_row(rows[0])) == len(split_row(header))
    assert "K-FAC | rho=0.5 new" in split_row(rows[0])
    page = markdown_html(text, "t")
    assert "<td>K-FAC | rho=0.5 new</td>" in page


def _scores(track: str, exact: list[int], n_match: list[int] | None = None, n_suffix: int = 4,
            ids: list[str] | None = None) -> pd.DataFrame:
    """Per-example scores of one track as evaluate writes them (Levenshtein from the matches)."""
    n_match = n_match if n_match is not None else [n_suffix * e for e in exact]
    lev = [(n_suffix - m) / n_suffix for m in n_match]
    return pd.DataFrame({"track": track, "candidate_id": ids or [f"c{i}" for i in range(len(exact))],
                         "exact_match": [bool(e) for e in exact], "n_match": n_match, "n_suffix": n_suffix,
                         "levenshtein_norm": lev, "levenshtein_sim": [1 - v for v in lev]})


def _heldout(nll: list[float], tokens: int = 63) -> pd.DataFrame:
    return pd.DataFrame({"track": "heldout", "window": range(len(nll)), "nll_sum": nll, "n_tokens": tokens})


def test_each_edit_is_tested_against_origin_on_the_same_examples():
    """A constructed scores table: 81 extraction-rate examples, Origin extracts 36.
    - down extracts none: 0/81 with the exact interval [0.000, 0.045] (not [0.000, 0.000]); 36
      discordant examples all Origin's: McNemar p = 2 / 2^36 -> lower (p<0.001).
    - up extracts 2 more than Origin on 9 + 1 discordant examples (9 only up, 1 only Origin):
      p = 2 * 11 / 1024 = 0.021 -> higher (p=0.021), although its Clopper-Pearson interval
      [0.34, 0.56] overlaps Origin's [0.33, 0.56]: the overlap rule said nothing here.
    - tie: the same 36 examples as Origin: no evidence of a difference (p=1)."""
    origin = [1] * 36 + [0] * 45
    up = [1] * 35 + [0] + [1] * 9 + [0] * 36  # loses example 35, gains examples 36..44
    frames = {"none": origin, "down": [0] * 81, "up": up, "tie": origin}
    metrics = pd.DataFrame({"model": "m", "edit": list(frames), "method": ["Origin", "Ours (down)", "Ours (up)", "Tie"],
                            "er_n_examples": 81, "n_examples": 4, "er_exact_er": [sum(v) / 81 for v in frames.values()]})
    worse = [200.0 + i for i in range(30)]
    scores = {e: pd.concat([_scores("extraction_rate", v), _scores("memorized", [1, 1, 1, 1]),
                            _heldout([w + (6.3 if e == "down" else 0.0) for w in worse])])
              for e, v in frames.items()}
    out = report.with_intervals(metrics, scores).set_index("edit")
    assert out.loc["down", "er_exact_ci"] == "[0.000, 0.045]" and out.loc["down", "er_exact_count"] == "0/81"
    assert out.loc["down", "er_vs_origin"] == "lower (p<0.001)"
    assert out.loc["down", "er_vs_origin_p"] == pytest.approx(2 / 2**36)
    assert out.loc["up", "er_vs_origin"] == "higher (p=0.021)"
    assert out.loc["up", "er_vs_origin_p"] == pytest.approx(22 / 1024)
    lo_up, hi_up = out.loc["up", ["er_exact_er_lo", "er_exact_er_hi"]]
    lo_o, hi_o = out.loc["none", ["er_exact_er_lo", "er_exact_er_hi"]]
    assert lo_up < hi_o and lo_o < hi_up  # the intervals overlap
    assert out.loc["tie", "er_vs_origin"] == "no evidence of a difference (p=1)"
    assert out.loc["none", "er_vs_origin"] == "-" and out.loc["none", "exact_ci"] == "[0.398, 1.000]"  # 4/4
    # fractional ER: the same data all-or-nothing per example, so the paired bootstrap agrees in direction
    assert out.loc["down", "er_frac_vs_origin"].startswith("lower (p")
    # held-out perplexity: every window 0.1 nats per token worse -> ratio exp(0.1), a point interval
    assert out.loc["down", "ppl_ratio"] == pytest.approx(math.exp(0.1))
    assert out.loc["down", "ppl_vs_origin"] == "higher (p<0.001)"
    assert out.loc["tie", "ppl_vs_origin"] == "no evidence of a difference (p=1)"
    text = report.results_markdown(out.reset_index())
    # no plan records here: the settings cell is '-', the edit id is the last (detail) column
    row = next(line for line in text.splitlines() if line.startswith("| Ours (down) | - | 0.000 | 0/81 |"))
    assert "| [0.000, 0.045] | lower (p<0.001) |" in row and row.endswith("| 81 | down |")
    assert "exact McNemar test" in text and "no evidence of a difference" in text
    assert "intervals overlap" not in text and "(no overlap)" not in text


def test_examples_pair_on_candidate_ids_not_row_order():
    """The reference's rows in another order: the test pairs example c0 with c0."""
    metrics = pd.DataFrame({"model": "m", "edit": ["none", "e"], "method": ["Origin", "Edit"], "er_n_examples": 10})
    base = _scores("extraction_rate", [1] * 5 + [0] * 5)
    scores = {"none": base.iloc[::-1], "e": base.copy()}
    out = report.with_intervals(metrics, scores).set_index("edit")
    assert out.loc["e", "er_vs_origin"] == "no evidence of a difference (p=1)"


def test_the_papers_comparisons_are_paired_tests():
    """Ours (up) against Ours (none) on both tracks (and against the sparsity-only ablation at its
    lambda_s); K-FAC vs SVD vs BalancedSubnet on the memorized track where each is a single row."""
    labels = {"none": "Origin", "a": "Ours (none)", "b": "Ours (up)", "c": "Ours (down)", "d": "Ours (up, sparsity only)",
              "s1": "Ours (up), seed 1", "n1": "Ours (none), seed 1", "k": "K-FAC", "s": "SVD", "bsn": "BalancedSubnet"}
    metrics = pd.DataFrame({"model": "m", "edit": list(labels), "method": list(labels.values()), "er_n_examples": 20,
                            "n_examples": 20})
    er = {"none": [1] * 10 + [0] * 10, "a": [1] * 10 + [0] * 10, "b": [1] * 20, "c": [0] * 20,
          "d": [1] * 10 + [0] * 10, "s1": [1] * 20, "n1": [1] * 10 + [0] * 10,
          "k": [0] * 20, "s": [1] * 20, "bsn": [1] * 20}
    mem = {"k": [0] * 20}
    scores = {e: pd.concat([_scores("extraction_rate", v), _scores("memorized", mem.get(e, [1] * 20))])
              for e, v in er.items()}
    pairs = {(r, f, tracks) for r, f, tracks, _ in report.paper_pairs(metrics)}
    both = ("extraction_rate", "memorized")
    assert pairs == {("b", "a", both), ("c", "a", both), ("b", "d", both), ("s1", "n1", both),
                     ("k", "s", ("memorized",)), ("k", "bsn", ("memorized",)), ("s", "bsn", ("memorized",))}
    out = report.with_intervals(metrics, scores)
    text = report.results_markdown(out)
    section = text[text.index("### The papers' comparisons, paired"):]
    rows = {tuple(report.split_row(line)[:3]): report.split_row(line) for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| Row")}
    # up extracts 10 more than none, all discordant one way: p = 2 / 2^10
    assert rows[("Ours (up)", "Ours (none)", "extraction-rate")][3:5] == ["1.000 vs 0.500", "higher (p=0.002)"]
    assert rows[("Ours (up)", "Ours (none)", "memorized")][4] == "no evidence of a difference (p=1); underpowered"  # N < 104
    assert rows[("Ours (down)", "Ours (none)", "extraction-rate")][4] == "lower (p=0.002)"
    assert ("Ours (up), seed 1", "Ours (none), seed 1", "extraction-rate") in rows
    assert rows[("K-FAC", "SVD", "memorized")][4] == "lower (p<0.001)"  # 20 discordant: 2 / 2^20
    assert rows[("SVD", "BalancedSubnet", "memorized")][4] == "no evidence of a difference (p=1); underpowered"
    # two K-FAC rows (a sweep) and no row of the paper's setting: K-FAC is not compared here (the
    # curvature report compares its chosen pair)
    more = pd.concat([metrics, pd.DataFrame({"model": "m", "edit": ["k2"], "method": ["K-FAC (pairwise)"]})])
    assert not any("K-FAC" in why for *_, why in report.paper_pairs(more))
    # sweeps with the paper's own setting among them: that row stands for its method (the paper grid's
    # other SVD points do not), against the other methods' rows
    sweep = pd.DataFrame({"model": "m", "edit": ["k", "k2", "kp", "s", "s2", "sp", "bsn"],
                          "method": ["K-FAC", "K-FAC (pairwise)", "K-FAC (paper: 80% energy, MLPs 0-2)", "SVD",
                                     "SVD (paper grid: top 10%, MLPs 0-2)", "SVD (paper: top 20%, MLPs 0-2)",
                                     "BalancedSubnet"]})
    assert {(r, f) for r, f, tracks, _ in report.paper_pairs(sweep)} == {("kp", "sp"), ("kp", "bsn"), ("sp", "bsn")}


def test_the_data_section_counts_what_was_dropped():
    from memctl.report import data_markdown, split_row

    text = data_markdown({
        "candidates": {"stats": {"kept": 46, "rows": 50}, "dropped": {"prefix_too_short": 3, "sequence_too_short": 1}},
        "extract": {"dropped_for_test_overlap": {"er_train": 3, "memorized_train": 0}, "counts": {"er_train": 40}},
        "calibration": {"windows": 119, "dropped_for_test_overlap": {"windows": 5, "of": 124, "ngram": 16}},
    })
    rows = {split_row(line)[0]: split_row(line) for line in text.splitlines() if line.startswith("| ") and "Stage" not in line}
    assert rows["candidates"][1:3] == ["46 of 50 rows", "4"] and "prefix too short 3" in rows["candidates"][3]
    assert rows["extract (er_train)"][2] == "3" and rows["calibration"][1:3] == ["119 of 124 windows", "5"]
    assert data_markdown({}) == ""


def test_the_data_section_has_one_row_per_calibration_text(tmp_path):
    """K-FAC's stream and the masks' documents are two calibration artifacts: the report's data
    section reads both sidecars (keyed by their text) and shows a row for each."""
    from memctl.commands import _sidecars
    from memctl.report import data_markdown, split_row
    from memctl.store import Provenance, write_text

    paths = []
    for text, kept, dropped in (("demo documents", 122, 3), ("demo stream", 210, 46)):
        prov = Provenance("calibration", {}, {})
        prov.extra.update(text=text, windows=kept,
                          dropped_for_test_overlap={"windows": dropped, "of": kept + dropped, "ngram": 16})
        paths.append(tmp_path / text.replace(" ", "-") / "windows.safetensors")
        write_text(paths[-1], "w", provenance=prov)
    records = _sidecars(paths)
    assert sorted(records) == ["calibration (demo documents)", "calibration (demo stream)"]
    rows = {split_row(line)[0]: split_row(line) for line in data_markdown(records).splitlines()
            if line.startswith("| ") and "Stage" not in line}
    assert rows["calibration (demo stream)"][1:3] == ["210 of 256 windows", "46"]
    assert rows["calibration (demo documents)"][1:3] == ["122 of 125 windows", "3"]


# ------------------------------------------------------------------ split sizes (memctl.stats helpers)


def test_interval_width_helpers_by_hand():
    from memctl import stats

    # n = 1: k = 0 gives [0, 1 - 0.025] = [0, 0.975]
    assert stats.worst_case_width(1) == pytest.approx(0.975)
    # n = 2, k = 1: Beta(1, 2) has CDF 1 - (1 - x)^2, so lo = 1 - sqrt(0.975), hi = sqrt(0.975)
    assert stats.worst_case_width(2) == pytest.approx(2 * math.sqrt(0.975) - 1)
    assert stats.worst_case_width(0) == 1.0
    # 0 of n: upper bound 1 - 0.025^(1/n); 0.2 needs n > ln(0.025) / ln(0.8) = 16.53
    assert stats.zero_upper_bound(16) == pytest.approx(1 - 0.025 ** (1 / 16)) and stats.zero_upper_bound(16) > 0.2
    assert stats.zero_upper_bound(17) < 0.2 and stats.min_n_zero_below(0.2) == 17
    # 0.5 (the 0/1 bound 0.975 at n = 1) needs ln(0.025) / ln(0.5) = 5.32 -> 6
    assert stats.min_n_zero_below(0.5) == 6
    # the documented width: the smallest n whose worst-case interval is narrower than 0.2
    n = stats.min_n_for_width(0.2)
    assert stats.worst_case_width(n) < 0.2 <= stats.worst_case_width(n - 1) and n == 104
    # the normal approximation 1.96 / sqrt(n) < 0.2 gives 97: Clopper-Pearson is wider
    assert n > (1.96 / 0.2) ** 2
    with pytest.raises(ValueError, match="not in"):
        stats.min_n_for_width(0)


def test_small_splits_warn_and_mark_no_evidence_verdicts_underpowered():
    from memctl import stats

    lines = report.split_warnings({"er_test": 4, "memorized_test": 200, "memorized_val": 1, "ood": 0})
    assert len(lines) == 2
    assert lines[0].startswith("Underpowered extraction-rate test split (er_test): N=4.")
    assert "narrower than 0.2 only from 104 examples" in lines[0]
    assert f"can be {stats.worst_case_width(4):.2f} wide" in lines[0]
    assert lines[1].startswith("Small validation slice (memorized_val): N=1.") and "needs 17 sequences" in lines[1]
    assert "0/1 rules out only 0.975" in lines[1]
    assert report.split_warnings({"er_test": 104, "memorized_test": 500, "memorized_val": 17, "ood": 0}) == []
    metrics = pd.DataFrame([
        {"model": "m", "edit": "none", "method": "Origin", "er_n_examples": 4, "n_examples": 200, "val_n_examples": 30,
         "er_vs_origin": "-", "vs_origin": "-"},
        {"model": "m", "edit": "e1", "method": "Ours (up)", "er_n_examples": 4, "n_examples": 200, "val_n_examples": 30,
         "er_vs_origin": "no evidence of a difference (p=0.5)", "vs_origin": "no evidence of a difference (p=0.3)"},
        {"model": "m", "edit": "e2", "method": "Ours (down)", "er_n_examples": 4, "n_examples": 200,
         "val_n_examples": 30, "er_vs_origin": "lower (p=0.01)", "vs_origin": "lower (p<0.001)"}])
    marked = report.mark_underpowered(metrics)
    assert marked["er_vs_origin"].tolist() == ["-", "no evidence of a difference (p=0.5); underpowered",
                                               "lower (p=0.01)"]  # a significant verdict stands at any N
    assert marked["vs_origin"].tolist() == metrics["vs_origin"].tolist()  # 200 >= 104
    assert report.mark_underpowered(marked)["er_vs_origin"].equals(marked["er_vs_origin"])  # idempotent
    md = report.results_markdown(metrics)
    assert md.index("## Warnings") < md.index("Every row is scored")  # at the top
    assert "- **Underpowered extraction-rate test split (er_test):** N=4." in md
    assert "| no evidence of a difference (p=0.5); underpowered |" in md


def test_every_row_shows_what_distinguishes_it():
    """Two strengths of one method differ in the Settings column, not only by the hash."""
    records = [
        {"edit": "none", "label": "Origin", "family": "origin"},
        {"edit": "kfac-aaa", "label": "K-FAC", "family": "curvature", "method": "kfac", "strength": 0.3,
         "layers": [0, 1, 2]},
        {"edit": "kfac-bbb", "label": "K-FAC", "family": "curvature", "method": "kfac", "strength": 0.5,
         "layers": [0, 2]},
        {"edit": "mask-down-c", "label": "Ours (down)", "family": "ours", "mode": "down", "sparsity": 0.3,
         "threshold": 4.0, "seed": 1},
        {"edit": "wanda-onepass-d", "label": "Wanda (one-pass)", "family": "baseline", "method": "wanda",
         "form": "one_pass", "sparsity": 0.5},
        {"edit": "csp-down-e", "label": "CSP (down)", "family": "csp", "method": "csp", "mode": "down",
         "threshold": 4.0},
    ]
    metrics = pd.DataFrame({"model": "m", "edit": [r["edit"] for r in records] + ["other"],
                            "method": [r["label"] for r in records] + ["Hand-made"], "exact_er": 0.5,
                            "n_examples": 10})
    out = report.with_settings(metrics, records)
    assert out["settings"].tolist() == [
        "none", "strength 0.3, layers 0-2", "strength 0.5, layers 0, 2", "sparsity 0.3, threshold 4, seed 1",
        "sparsity 0.5, one-pass", "theta 4", "-"]
    md = report.results_markdown(out)
    assert "| Method | Settings | Exact ER | N | Edit id |" in md
    assert "| K-FAC | strength 0.3, layers 0-2 | 0.500 | 10 | kfac-aaa |" in md
    assert "| K-FAC | strength 0.5, layers 0, 2 | 0.500 | 10 | kfac-bbb |" in md


# ------------------------------------------------------------------- plots and the results page


def _page_metrics():
    """Origin and three edits of three families, with intervals and paired tests (8 examples a track)."""
    exact = {"none": [1, 1, 1, 1, 0, 0, 0, 0], "kfac-a": [0] * 8, "mask-up-b": [1] * 7 + [0], "svd-c": [1, 1, 1, 0, 0, 0, 0, 0]}
    nll = {"none": [100.0, 110, 90, 105], "kfac-a": [120.0, 131, 108, 126], "mask-up-b": [99.0, 111, 90, 104],
           "svd-c": [101.0, 111, 91, 106]}
    scores = {e: pd.concat([_scores("extraction_rate", x), _scores("memorized", x), _heldout(nll[e])])
              for e, x in exact.items()}
    for table in scores.values():
        table["copies"] = [1, 2, 4, 8] * 4 + [float("nan")] * 4
    labels = {"none": "Origin", "kfac-a": "K-FAC", "mask-up-b": "Ours (up)", "svd-c": "SVD"}
    metrics = pd.DataFrame([{"model": "demo-abc", "edit": e, "method": labels[e], "n_examples": 8, "er_n_examples": 8,
                             "exact_er": sum(x) / 8, "er_exact_er": sum(x) / 8, "heldout_ppl": 30.0}
                            for e, x in exact.items()])
    records = [{"edit": "none", "family": "origin"}, {"edit": "kfac-a", "family": "curvature", "method": "kfac",
                                                      "strength": 0.8, "layers": [0]},
               {"edit": "mask-up-b", "family": "ours", "mode": "up", "sparsity": 0.3, "seed": 0},
               {"edit": "svd-c", "family": "curvature", "method": "svd", "strength": 0.5, "layers": [0]}]
    metrics = report.with_settings(report.mark_underpowered(report.with_intervals(metrics, scores)), records)
    return metrics, scores, records


RUN = {"model": "demo-abc", "source": "demo", "prefix_len": 32, "suffix_len": 32, "er_test_fraction": 0.25,
       "test_fraction": 0.25, "split_seed": 42,
       "masks": {"modes": ["none", "up"], "sparsity": 0.3, "threshold": 4.0, "steps": 60, "seeds": [0],
                 "sweep": {"sparsities": [0.3, 0.4], "sparsity_modes": ["up"], "thresholds": []}}}


def test_every_method_family_has_its_own_colour_and_marker_from_a_colour_blind_safe_palette():
    from memctl import plots

    styles = {k: v for k, v in plots.FAMILIES.items() if k != "other"}
    assert {"origin", "kfac", "svd", "down", "up", "reciprocal", "none", "baseline", "csp",
            "balanced_subnet"} == set(styles)
    assert len({s.color for s in styles.values()}) == len(styles)  # one colour per family
    assert len({s.marker for s in styles.values()}) == len(styles)  # and one marker: never colour alone
    okabe_ito = {"#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7"}
    assert okabe_ito <= set(plots.PALETTE.values())
    assert all(s.color in plots.PALETTE.values() or s.color == plots.DARK_GREY for s in styles.values())
    fam = plots.family_of
    assert fam({"family": "curvature", "method": "kfac_pairwise"}) == "kfac"
    assert fam({"family": "curvature", "method": "svd"}) == "svd"
    assert fam({"family": "ours", "mode": "reciprocal"}) == "reciprocal"
    assert fam({"family": "baseline", "method": "balanced_subnet"}) == "balanced_subnet"
    assert fam({"family": "baseline", "method": "wanda"}) == "baseline"
    assert fam({"family": "csp", "method": "csp", "mode": "up"}) == "csp"
    assert fam({"edit": "none"}) == "origin"
    assert fam(None, "Ours (down), seed 1") == "down" and fam(None, "SparseGPT, sparsity 0.40") == "baseline"


def test_a_plot_is_written_as_png_and_svg_atomically_with_sidecars_and_reproducibly(tmp_path):
    from memctl.store import Provenance, sidecar_path, verify

    metrics, scores, records = _page_metrics()
    prov = Provenance("report", {}, {})
    families = report.edit_families(metrics, records)
    report.plot_memorization_frontier(metrics, tmp_path / "f.png", families, "config line", prov)
    png, svg = tmp_path / "f.png", tmp_path / "f.svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in svg.read_bytes()[:2000]
    assert verify(png) == [] and verify(svg) == []  # each with a sidecar whose checksum holds
    assert sidecar_path(svg).exists()
    first = svg.read_bytes()
    report.plot_memorization_frontier(metrics, tmp_path / "f.png", families, "config line", prov)
    assert svg.read_bytes() == first  # no date, fixed ids: the same figure gives the same file
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "f.png", "f.png.meta.json", "f.svg", "f.svg.meta.json"]  # no temporary left behind


def test_the_results_page_opens_on_a_summary_with_intervals_then_captioned_embedded_figures(tmp_path):
    import base64
    from html.parser import HTMLParser

    metrics, scores, records = _page_metrics()
    by_edit = report.edits_by_copies(scores, dict(zip(metrics["edit"], metrics["method"])))
    by_copies = report.bucket_copies(pd.DataFrame({"group": ["w", "w"], "copies": [1, 4], "n": [3, 5],
                                                   "exact_er": [0.0, 0.6], "fractional_er": [0.1, 0.7],
                                                   "loose_accuracy": [0.0, 0.6]}))
    figures = report.report_figures(tmp_path, metrics, records, RUN, by_edit, by_copies)
    assert [f.key for f in figures] == ["frontier", "edits-by-copies", "extraction-by-copies"]
    for name in ("frontier", "edits_by_copies", "extraction_by_copies"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5000 and (tmp_path / f"{name}.svg").stat().st_size > 5000
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "table.md").write_text("## Masks at sparsity 0.3\n\n| Method | Exact ER | vs Origin |\n"
                                                 "|---|---:|---:|\n| Origin | 0.5 | - |\n| Ours (up) | 0.9 | higher (p=0.01) |\n")
    (tmp_path / "masks" / "ablation_sparsity.svg").write_bytes(figures[0].svg)
    masks = report.masks_section(tmp_path / "masks" / "table.md", [tmp_path / "masks" / "ablation_sparsity.svg"],
                                 RUN, metrics)
    page = report.results_html(metrics, "", figures, masks, RUN)

    class Tree(HTMLParser):
        """The page's elements in document order: ids, images, the summary table's cells, verdict
        classes, figure captions (an end tag closes up to its start tag; void elements have none)."""

        VOID = {"img", "meta", "br", "hr", "link", "input"}

        def __init__(self):
            super().__init__()
            self.order, self.stack, self.imgs, self.rows, self.verdicts, self.captions = [], [], [], [], [], []

        def inside(self, what):
            return any(what in (tag, id_) for tag, id_ in self.stack)

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if a.get("id"):
                self.order.append(a["id"])
            if tag == "img":
                self.imgs.append(a)
            if tag == "tr" and self.inside("summary-table"):
                self.rows.append([])
            if tag == "td" and self.inside("summary-table"):
                self.rows[-1].append("")
            if tag == "td" and "verdict" in (a.get("class") or ""):
                self.verdicts.append(a["class"])
            if tag == "figcaption":
                self.captions.append("")
            if tag not in self.VOID:
                self.stack.append((tag, a.get("id")))

        def handle_endtag(self, tag):
            while self.stack and self.stack.pop()[0] != tag:
                pass

        def handle_data(self, data):
            if self.inside("summary-table") and self.inside("td"):
                self.rows[-1][-1] += data
            if self.inside("figcaption"):
                self.captions[-1] += data

    tree = Tree()
    tree.feed(page)
    # opens on the results: configuration, (warnings), summary, then figures, masks, the detailed tables
    ids = [i for i in tree.order if i in ("configuration", "summary", "figures", "masks", "details")]
    assert ids == ["configuration", "summary", "figures", "masks", "details"]
    body = [r for r in tree.rows if r]
    assert [r[1] for r in body] == ["Origin", "K-FAC", "Ours (up)", "SVD"]
    kfac = body[1]
    assert kfac[0] == "2" and kfac[2] == "strength 0.8, layers 0"
    assert kfac[3] == "0.000 (0/8)" and kfac[4].startswith("[0.000, 0.3")  # Exact ER, k/N, exact 95% interval
    # held-out perplexity over Origin's: exp((485 - 405) nats / (4 windows x 63 tokens)) = 1.374, and its interval
    assert float(kfac[-3]) == pytest.approx(math.exp(80 / 252), abs=5e-4) and kfac[-2].startswith("[")
    assert any(c.startswith("verdict lower") for c in tree.verdicts)
    assert any(c.startswith("verdict higher") for c in tree.verdicts)
    # four figures, each an embedded SVG (the file is self-contained), each captioned with the configuration
    assert len(tree.imgs) == 4
    for img in tree.imgs:
        assert img["src"].startswith("data:image/svg+xml;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1]).lstrip().startswith((b"<?xml", b"<svg"))
    assert len(tree.captions) == 4
    for caption in tree.captions:
        assert "demo-abc" in caption and "N=8" in caption and "32-token prefixes" in caption
    assert "target sparsity 0.3" in tree.captions[-1] and "sparsity sweep 0.3, 0.4" in tree.captions[-1]
    assert "src='http" not in page and "<link" not in page and "<script" not in page


def _tiny_plan(change=None):
    """The plan of tests/tiny_config.yaml (``change`` edits the raw config first)."""
    from pathlib import Path

    import yaml

    from memctl import lab
    from memctl.config import validate_config
    from memctl.plan import build_plan

    raw = yaml.safe_load((Path(__file__).with_name("tiny_config.yaml")).read_text())
    if change:
        change(raw)
    cfg = validate_config(raw)
    return build_plan(cfg, lab.workflow_model_dims(cfg), python_version="3.11")


def test_the_report_job_reads_the_masks_table_and_ablation_plots_only_where_masks_run():
    plan = _tiny_plan()
    job, masks = plan.job("report"), plan.job("masks_report")
    assert job.inputs["masks_table"] == masks.outputs["markdown"]
    assert job.inputs["masks_figures"] == [masks.outputs["sparsity_svg"], masks.outputs["threshold_svg"]]
    assert "--masks-table" in job.args and job.settings["run"]["masks"]["sparsity"] == plan.config["masks"]["sparsity"]
    off = _tiny_plan(lambda c: c["masks"].update(enabled=False))
    assert "masks_table" not in off.job("report").inputs and "--masks-table" not in off.job("report").args


def test_every_planned_plot_has_its_svg_beside_it():
    plan = _tiny_plan()
    outputs = {p for job in plan.jobs() for p in job.outputs.values()}
    pngs = sorted(p for p in outputs if p.endswith(".png"))
    assert len(pngs) >= 7  # frontier, by copies (2), curvature (2), masks ablations (2)
    assert [p for p in pngs if p[:-4] + ".svg" not in outputs] == []


def test_edits_by_kind_and_copies_pair_each_stratum_against_origin_on_the_same_candidates():
    # 12 extraction-rate candidates: 8 of two record families (pooled as one kind), 4 word canaries.
    # Origin extracts records 0-1 and words 0-1; the edit extracts every record (6 more, none lost:
    # exact McNemar p = 2 * 0.5**6 = 0.03125, higher) and loses both words (p = 0.5, no evidence).
    ids = [f"c{i}" for i in range(12)]
    groups = ["canary-records-0"] * 4 + ["canary-records-1"] * 4 + ["canary-words"] * 4
    copies = [4, 4, 8, 8, 4, 4, 8, 8, 2, 2, 16, 16]

    def scores(extracted, track="extraction_rate"):
        return pd.DataFrame({"track": track, "candidate_id": ids, "group": groups, "copies": copies,
                             "exact_match": [i in extracted for i in range(12)]})

    origin, edit = scores({0, 1, 8, 9}), scores(set(range(8)))
    shuffled = edit.iloc[::-1].reset_index(drop=True)  # rows in another order: paired by candidate id
    table = report.edits_by_stratum({"none": origin, "e": shuffled}, {"none": "Origin", "e": "Up"},
                                    tracks=("extraction_rate",))
    kind = table[(table["by"] == "kind") & (table["edit"] == "e")].set_index("stratum")
    assert kind.loc["canary-records", ["n", "k", "origin_k"]].tolist() == [8, 8, 2]
    assert kind.loc["canary-records", "p"] == pytest.approx(2 * 0.5**6)
    assert kind.loc["canary-records", "verdict"] == "higher (p=0.031)"
    assert kind.loc["canary-words", ["n", "k", "origin_k"]].tolist() == [4, 0, 2]
    assert kind.loc["canary-words", "p"] == pytest.approx(0.5)
    copies_rows = table[(table["by"] == "copies") & (table["edit"] == "e")].set_index("stratum")
    # buckets: 2 -> 2, 4 -> 4, 8 -> 8, 16 -> 16; copies 4: c0 c1 c4 c5 (Origin c0 c1), edit all four
    assert copies_rows.loc["4", ["n", "k", "origin_k"]].tolist() == [4, 4, 2]
    assert copies_rows.loc["2", ["n", "k", "origin_k"]].tolist() == [2, 0, 2]
    text = report.edits_by_stratum_markdown(table)
    lines = [line for line in text.splitlines() if line.startswith("| Origin") or line.startswith("| Up")]
    assert lines[0].startswith("| Origin | none | 2/8 | 2/4 |")  # Origin first, strata sorted by name
    assert "| 8/8 higher (p=0.031) | 0/4 (p=0.5) |" in lines[1]
    # a track Origin did not score gives no rows (nothing to pair with)
    assert report.edits_by_stratum({"none": origin, "e": edit}, {}, tracks=("forget",)).empty
