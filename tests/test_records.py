"""The metric records (memctl.metric_records): one declaration per metric, read by every report table."""

from dataclasses import FrozenInstanceError
from pathlib import Path

import pandas as pd
import pytest

from memctl import metric_records, report
from memctl.curvature import report as curvature_report
from memctl.masks import report as masks_report
from memctl.vision import report as vision_report

DOCS = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

#: The headers of every table built from the records, as they were written by hand before the
#: records existed: the derivation must keep them byte for byte.
HEADERS = {
    "report.ER_COLUMNS": "Method | Settings | Converged | Exact ER | k/N | 95% CI | vs Origin (Exact ER) | Fractional ER "
                         "| 95% CI | vs Origin (Fractional ER) | Held-out PPL | PPL / Origin | 95% CI (PPL ratio) | "
                         "vs Origin (PPL) | N | Edit id",
    "report.MEMORIZED_COLUMNS": "Method | Settings | Converged | Held-out loss | Held-out PPL | PPL / Origin | 95% CI "
                                "(PPL ratio) | vs Origin (PPL) | Fractional ER | 95% CI | vs Origin (Fractional ER) | "
                                "Exact ER | k/N | 95% CI | vs Origin (Exact ER) | Loose acc. | 95% CI | Avg. Levenshtein "
                                "| 95% CI | vs Origin (Levenshtein) | Mem. loss | Mem. PPL | nDCG@10 | nDCG@10 (text) | "
                                "N | Edit id",
    "report.OOD_COLUMNS": "Method | Settings | Converged | Exact ER | k/N | 95% CI | vs Origin (Exact ER) | Fractional "
                          "ER | 95% CI | vs Origin (Fractional ER) | Loose acc. | 95% CI | N | Edit id",
    "report.RESULT_COLUMNS": "Method | Settings | Converged | Held-out loss | Held-out PPL | Fractional ER | Exact ER | "
                             "Loose acc. | Avg. Levenshtein | Mem. loss | Mem. PPL | nDCG@10 | N | Edit id",
    "masks.COLUMNS": "Held-out loss | Held-out PPL | Fractional ER | Exact ER | Fractional ER (own training memories) | "
                     "Exact ER (own training memories) | Fractional ER (memorized) | Exact ER (memorized) | Mem. loss | "
                     "Mem. PPL | Sparsity",
    "curvature.COLUMNS": "Method | Form | Edit | Layers | Roles | Strength | Paper's setting | Held-out PPL | PPL / "
                         "unedited (all windows) | 95% CI | vs unedited (PPL) | PPL / unedited (selection windows) | "
                         "nDCG@10 (text) | Val. Exact ER | Within budget | Strict acc. | k/N | 95% CI | vs unedited "
                         "(strict) | Loose acc. | 95% CI | Avg. Levenshtein | 95% CI | vs unedited (Levenshtein) | ER "
                         "track Exact ER | nDCG@10 | Mem. loss",
    "curvature.track": "Row | Edit | Form | Layers | Strength | Exact ER | k/N | 95% CI | vs unedited (McNemar) | "
                       "Fractional ER | 95% CI | vs unedited (paired bootstrap) | Avg. Levenshtein | 95% CI | vs unedited "
                       "(paired bootstrap)",
    "curvature.UTILITY_COLUMNS": "Row | Edit | Within budget | PPL / unedited (selection windows) | PPL / unedited "
                                 "(report windows) | 95% CI | vs unedited (paired bootstrap) | nDCG@10 (text windows) | "
                                 "nDCG@10 (non-memorized ER-test sequences, the paper's column)",
    "vision.COLUMNS": "Unit | MLP blocks | Method | Strength | Memorization (noised labels) | k/N | 95% CI | vs Origin "
                      "(memorization) | Recovered true labels | k/N | vs Origin (recovery) | Clean train | k/N | "
                      "Selection slice | k/N | Validation | k/N | 95% CI | vs Origin (validation)",
}
TABLES = {
    "report.ER_COLUMNS": report.ER_COLUMNS, "report.MEMORIZED_COLUMNS": report.MEMORIZED_COLUMNS,
    "report.OOD_COLUMNS": report.OOD_COLUMNS, "report.RESULT_COLUMNS": report.RESULT_COLUMNS,
    "masks.COLUMNS": masks_report.COLUMNS, "curvature.COLUMNS": curvature_report.COLUMNS,
    "curvature.track": curvature_report._track_columns("er_"),
    "curvature.UTILITY_COLUMNS": curvature_report.UTILITY_COLUMNS, "vision.COLUMNS": vision_report.COLUMNS,
}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_the_tables_keep_their_headers(name):
    assert " | ".join(h for _, h, _ in TABLES[name]) == HEADERS[name]


def _record_columns() -> dict[str, tuple[str, str, str]]:
    """Every (column, header, format) the records give the track tables of results.md."""
    out = {}
    for track, prefix in metric_records.PREFIXES.items():
        for metric in metric_records.on_track(track):
            out.update({c[0]: c for c in metric.columns(prefix=prefix)})
    return out


def test_the_track_tables_headers_and_formats_come_from_the_records():
    given = _record_columns()
    for cols in (report.ER_COLUMNS, report.MEMORIZED_COLUMNS, report.OOD_COLUMNS):
        metric_cols = [c for c in cols if c not in report.LEAD_COLUMNS and c != report.EDIT_COLUMN
                       and not c[0].endswith("n_examples")]
        assert metric_cols and all(given[c[0]] == c for c in metric_cols)
    # each track table shows exactly the records that name its track; TRACK_ORDER only orders them
    for track, order in report.TRACK_ORDER.items():
        assert sorted(order) == sorted(m.key for m in metric_records.on_track(track))
    for key in report.RESULT_METRICS:
        assert metric_records.by_key(key).column() in report.RESULT_COLUMNS


def test_the_other_reports_take_headers_and_formats_from_the_records():
    headers = {m.header.format(reference=r) for m in metric_records.METRICS for r in ("Origin", "unedited")}
    for col, head, fmt in masks_report.COLUMNS:  # a record's header, labelled with its set, and its format
        metric = metric_records.by_key(col.removeprefix("er_").removeprefix("forget_"))
        assert head.split(" (")[0] in headers
        assert fmt == (metric.fmt if col != "mem_ppl" else "{:.3f}")  # the paper's table: three decimals
    for metric, parts in vision_report.ACCURACIES:
        assert all(c in vision_report.COLUMNS for c in metric.columns(parts))
        assert (metric.key, metric.header, metric.fmt) in vision_report.COLUMNS
    assert metric_records.STRICT_ACCURACY.columns(reference="unedited")[-1] == ("vs_origin", "vs unedited (strict)", "{}")


def test_verdict_and_unit_columns_come_from_the_records():
    assert report.VERDICT_COLUMNS == ("vs_origin", "frac_vs_origin", "lev_vs_origin")
    assert report.UNIT_COLUMNS == ("exact_match", "n_match", "n_suffix", "levenshtein_norm", "levenshtein_sim")


def test_every_record_is_well_formed():
    keys = [m.key for m in metric_records.METRICS]
    assert len(keys) == len(set(keys))
    for m in metric_records.METRICS:
        assert m.role in (metric_records.MEMORIZATION, metric_records.UTILITY, metric_records.EDIT), m.key
        assert m.direction in ("lower", "higher"), m.key
        assert m.interval in (None, metric_records.CLOPPER_PEARSON, metric_records.PERCENTILE_BOOTSTRAP,
                              metric_records.PAIRED_BOOTSTRAP_RATIO), m.key
        assert m.test in (None, metric_records.MCNEMAR, metric_records.PAIRED_BOOTSTRAP), m.key
        assert not (m.verdict and not m.test), f"{m.key}: a verdict needs its paired test"
        assert not (m.ci and not m.interval), f"{m.key}: an interval column needs its kind"
        assert set(m.tracks) <= {*metric_records.PREFIXES, metric_records.VISION}, m.key
        m.fmt.format(0.5)
    with pytest.raises(FrozenInstanceError):
        metric_records.EXACT_ER.key = "x"
    with pytest.raises(ValueError, match="no count column"):
        metric_records.FRACTIONAL_ER.column("count")


TOY = metric_records.Metric(
    "toy_rate", "Toy rate", "{:.1f}", direction="lower", interval=metric_records.CLOPPER_PEARSON,
    test=metric_records.MCNEMAR, tracks=("memorized", "extraction_rate"), ci="toy_ci", verdict="toy_vs_origin",
    short="Toy")


def test_a_new_metric_is_one_record(monkeypatch):
    """A toy metric declared only as a record shows in the tables of the tracks it names (value, its
    interval and verdict, after the listed metrics), formatted by its record, and nowhere else."""
    monkeypatch.setattr(metric_records, "METRICS", (*metric_records.METRICS, TOY))
    metrics = pd.DataFrame([{"model": "m", "edit": "none", "method": "Origin", "n_examples": 4, "er_n_examples": 9,
                             "exact_er": 1.0, "toy_rate": 0.25, "toy_ci": "[0.1, 0.4]", "toy_vs_origin": "-",
                             "er_toy_rate": 0.75, "er_toy_ci": "[0.5, 0.9]", "er_toy_vs_origin": "-"}])
    text = report.results_details_markdown(metrics)
    er, memorized = text.split("### Extraction-rate track")[1].split("### Memorized track")
    assert "| Toy rate | 95% CI | vs Origin (Toy) | N | Edit id |" in er
    assert "| 0.8 | [0.5, 0.9] | - | 9 | none |" in er
    assert "| Toy rate | 95% CI | vs Origin (Toy) | N | Edit id |" in memorized
    assert "| 0.2 | [0.1, 0.4] | - | 4 | none |" in memorized  # "{:.1f}" of 0.25
    assert "toy_vs_origin" in metric_records.verdict_columns()
    assert [m.key for m in metric_records.on_track("ood")] == ["exact_er", "fractional_er", "loose_accuracy"]


def test_the_docs_table_is_the_records():
    assert metric_records.markdown() in DOCS.read_text(encoding="utf-8")


def test_the_vision_accuracies_are_the_models():
    from memctl.vision import model

    assert vision_report.METRIC_NAMES == tuple(model.METRICS)
