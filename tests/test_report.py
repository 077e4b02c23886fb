"""Results tables: exposure buckets pooled by hand-checked weights; tables without counts."""

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


def test_bootstrap_intervals_cover_the_rate_and_say_whether_edits_differ():
    """Intervals from 1000 resamples: by hand, a rate of k/n has a percentile interval around k/n
    whose width shrinks like 1/sqrt(n); an edit at 0/40 vs Origin at 30/40 does not overlap."""
    import numpy as np
    import pandas as pd

    from memctl.metrics import rate_ci
    from memctl.report import with_intervals

    exact = np.array([1] * 30 + [0] * 10)
    ci = rate_ci(exact, exact * 4, np.full(40, 4))
    lo, hi = ci["exact_er"]
    assert lo < 0.75 < hi and 0.1 < hi - lo < 0.35  # binomial sd sqrt(.75*.25/40) = 0.068: width ~0.27
    assert ci["fractional_er"] == ci["exact_er"]  # every suffix all-or-nothing here
    assert rate_ci(exact, exact * 4, np.full(40, 4)) == ci  # seeded: the same table, the same interval

    def scores(k, n, track):
        return pd.DataFrame({"track": track, "exact_match": [True] * k + [False] * (n - k), "n_match": [4] * k + [0] * (n - k),
                             "n_suffix": 4})

    metrics = pd.DataFrame({"model": "m", "edit": ["none", "down", "up"], "method": ["Origin", "Ours (down)", "Ours (up)"]})
    s = {"none": pd.concat([scores(30, 40, "extraction_rate"), scores(10, 10, "memorized")]),
         "down": pd.concat([scores(0, 40, "extraction_rate"), scores(0, 10, "memorized")]),
         "up": pd.concat([scores(31, 40, "extraction_rate"), scores(10, 10, "memorized")])}
    out = with_intervals(metrics, s).set_index("edit")
    assert out.loc["down", "er_vs_origin"] == "lower (no overlap)"
    assert out.loc["up", "er_vs_origin"] == "overlap"
    assert out.loc["none", "er_exact_ci"].startswith("[0.6")
    assert out.loc["down", "exact_ci"] == "[0.000, 0.000]"


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


def test_each_trained_mask_is_compared_with_the_none_mask_in_words():
    import pandas as pd

    from memctl.report import results_markdown, versus_none_mask

    part = pd.DataFrame({
        "model": "m", "method": ["Origin", "Ours (none)", "Ours (up)", "Ours (down)"],
        "edit": ["none", "a", "b", "c"], "er_n_examples": 40,
        "er_exact_er": [0.4, 0.35, 0.6, 0.05], "er_exact_er_lo": [0.25, 0.2, 0.45, 0.0],
        "er_exact_er_hi": [0.55, 0.5, 0.75, 0.12],
    })
    text = versus_none_mask(part)
    assert "Ours (up) Exact ER 0.600 [0.450, 0.750] overlaps Ours (none) 0.350 [0.200, 0.500]." in text
    assert "Ours (down) Exact ER 0.050 [0.000, 0.120] is lower than (no overlap with) Ours (none)" in text
    assert "reciprocal" not in text
    assert "Masks against the mask trained without a memorization term" in results_markdown(part)
    assert versus_none_mask(part[part["method"] != "Ours (none)"]) == ""
