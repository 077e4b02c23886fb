"""The declared K-FAC vs SVD selection rule (memctl.curvature.selection) on constructed tables.

Every number below is worked by hand from the tables built here. The unedited model's held-out
windows have a summed NLL of 100 nats over 63 tokens each; an edit with perplexity ratio r on a set
of windows adds 63 ln r nats to each of them, so the ratio read back is r.
"""

import math

import numpy as np
import pandas as pd
import pytest

from memctl.config import ConfigError
from memctl.curvature import report, selection

TOKENS = 63
N_WINDOWS = 10  # selection_windows 0.5: windows 0-4 select, 5-9 report
VAL_N = 20


def _spec(method, layers, strength, **extra):
    return {"method": method, "layers": layers, "roles": None, "groups": ["mlp"], "strength": strength, **extra}


#: edit -> (spec, selection-window PPL ratio, validation Exact ER, nDCG@10 on text windows).
#: Layer set 0,1,2: k2 has the lowest validation Exact ER but is over the PPL budget (1.10);
#: k1 and k3 tie at 0.25 and k3 has the lower PPL ratio; s2 fails nDCG (0.89), s3 PPL (1.06).
#: Layer set 0: k4 (0.10) is K-FAC's best anywhere; s4 the only SVD edit there (0.95).
#: Layer 1: k5 (validation 0, no cost) has no SVD edit on its layers, so it cannot compete.
EDITS = {
    "k1": (_spec("kfac", [0, 1, 2], 0.5), 1.01, 0.25, 0.95),
    "k2": (_spec("kfac_pairwise", [0, 1, 2], 0.7), 1.10, 0.00, 0.95),
    "k3": (_spec("kfac", [0, 1, 2], 0.7), 1.005, 0.25, 0.97),
    "s1": (_spec("svd", [0, 1, 2], 0.5), 1.01, 0.50, 0.96),
    "s2": (_spec("svd", [0, 1, 2], 0.3), 1.015, 0.45, 0.89),
    "s3": (_spec("svd", [0, 1, 2], 0.25), 1.06, 0.00, 0.90),
    "k4": (_spec("kfac_pairwise", [0], 0.6), 1.015, 0.10, 0.93),
    "s4": (_spec("svd", [0], 0.2), 1.018, 0.95, 0.95),
    "k5": (_spec("kfac_pairwise", [1], 0.6), 1.0, 0.00, 0.99),
}


def _metrics(edits):
    rows = [{"model": "m", "edit": "none", "method": "Origin", "heldout_ppl": 10.0, "val_n_examples": VAL_N,
             "val_exact_er": 1.0, "ndcg10_text": 1.0}]
    for edit, (spec, ratio, val, ndcg) in edits.items():
        rows.append({"model": "m", "edit": edit, "method": "SVD" if spec["method"] == "svd" else "K-FAC",
                     "heldout_ppl": 10.0 * ratio, "val_n_examples": VAL_N, "val_exact_er": val, "ndcg10_text": ndcg})
    df = pd.DataFrame(rows)
    # test-split metrics: the memorized track, the extraction-rate track, the paper's nDCG column
    for col, value in (("n_examples", 20), ("exact_er", 1.0), ("strict_accuracy", 1.0), ("fractional_er", 1.0),
                       ("loose_accuracy", 1.0), ("avg_levenshtein", 0.0), ("mem_loss", 1.0), ("mem_ppl", 2.7),
                       ("er_n_examples", 10), ("er_exact_er", 0.4), ("er_fractional_er", 0.5),
                       ("er_loose_accuracy", 0.5), ("ndcg10", 0.9)):
        df[col] = value
    return df


def _heldout(ratio_sel, ratio_rep=1.0):
    nll = [100.0 + TOKENS * math.log(ratio_sel if w < N_WINDOWS // 2 else ratio_rep) for w in range(N_WINDOWS)]
    return pd.DataFrame({"track": "heldout", "window": range(N_WINDOWS), "nll_sum": nll, "n_tokens": TOKENS})


def _track(track, exact):
    n = len(exact)
    return pd.DataFrame({"track": track, "candidate_id": [f"{track[0]}{i}" for i in range(n)],
                         "exact_match": [bool(e) for e in exact], "n_match": [8 * e for e in exact], "n_suffix": 8,
                         "levenshtein_norm": [0.0 if e else 1.0 for e in exact],
                         "levenshtein_sim": [1.0 if e else 0.0 for e in exact]})


def _scores(edits):
    out = {"none": pd.concat([_track("memorized", [1] * 20), _track("extraction_rate", [1] * 4 + [0] * 6),
                              _heldout(1.0)], ignore_index=True)}
    for edit, (_, ratio, _, _) in edits.items():
        out[edit] = pd.concat([_track("memorized", [1] * 20), _track("extraction_rate", [1] * 4 + [0] * 6),
                               _heldout(ratio)], ignore_index=True)
    return out


def _prepared(edits=EDITS, scores=None, settings=None, metrics=None):
    metrics = _metrics(edits) if metrics is None else metrics
    table = report.edit_table(metrics, {e: v[0] for e, v in edits.items()})
    if scores is not None:
        table = report.add_tests(table, metrics, scores)
    return report.prepare(table, scores, settings or {})


def _chosen(choice):
    return (choice.layers, *(None if choice.chosen[k] is None else choice.chosen[k]["edit"] for k in ("kfac", "svd")))


# ------------------------------------------------------------------------------------ the rule


def test_the_rule_chooses_on_validation_within_the_budget_on_common_layers():
    table, windows, choice, rule = _prepared()
    assert rule == selection.Rule(1.02, 0.90, 0.5, ("kfac", "kfac_factor", "kfac_pairwise"), "kfac")
    assert not windows.split  # no per-window scores: the budget read the ratio over all windows
    # layer rule kfac: K-FAC's best in budget is k4 (0.10) on layer 0, against k3 (0.25) on 0,1,2;
    # SVD's point is then taken on layer 0 too (s4, 0.95), although s1 (0.50) is better elsewhere
    assert _chosen(choice) == ("0", "k4", "s4")
    cand = choice.candidates.set_index("edit")
    assert not cand.loc["k2", "in_budget"] and cand.loc["k2", "why_out"] == "PPL ratio 1.100 > 1.02"
    assert cand.loc["s2", "why_out"] == "nDCG@10 0.890 < 0.9" and cand.loc["s3", "why_out"] == "PPL ratio 1.060 > 1.02"
    assert cand.loc["k3", "in_budget"] and cand.loc["k5", "in_budget"]
    sets = choice.layer_sets.set_index("layers")
    assert sorted(sets.index) == ["0", "0,1,2"]  # layer 1 has no SVD edit: k5 never competes
    assert sets.loc["0,1,2", "kfac_best"] == "k3"  # ties with k1 at 0.25: the lower PPL ratio (1.005) wins
    assert sets.loc["0,1,2", "svd_best"] == "s1" and sets.loc["0,1,2", "kfac_in_budget"] == 2
    assert sets.loc["0,1,2", "kfac_edits"] == 3 and sets.loc["0,1,2", "svd_in_budget"] == 1
    # joint: layer 0 sums 0.10 + 0.95 = 1.05, layers 0-2 sum 0.25 + 0.50 = 0.75
    _, _, joint, _ = _prepared(settings={"layer_rule": "joint"})
    assert _chosen(joint) == ("0,1,2", "k3", "s1")
    # only the projector form competes as K-FAC: k1/k3 on 0,1,2 are the only K-FAC candidates left
    _, _, projector, _ = _prepared(settings={"kfac_forms": ["kfac"]})
    assert _chosen(projector) == ("0,1,2", "k3", "s1")
    md = report.curvature_markdown(table, {}, prepared=(table, windows, choice, rule))
    assert "points chosen by a declared rule (our addition)" in md and "states no such rule" in md
    assert "| K-FAC | k4 | pairwise | 0 | 0.6 | 0.100 | 2/20 | 1.015 | 0.930 | within the budget |" in md
    assert "| SVD | s4 | svd | 0 | 0.2 | 0.950 | 19/20 | 1.018 | 0.950 | within the budget |" in md
    assert "no per-window held-out scores" in md


def test_the_choice_moves_with_the_validation_scores_and_the_selection_windows():
    base = _chosen(_prepared(scores=_scores(EDITS))[2])
    assert base == ("0", "k4", "s4")
    # k4's validation Exact ER 0.10 -> 0.30: K-FAC's best is now k3 (0.25) on layers 0-2, with s1
    moved = dict(EDITS, k4=(EDITS["k4"][0], 1.015, 0.30, 0.93))
    assert _chosen(_prepared(moved, scores=_scores(moved))[2]) == ("0,1,2", "k3", "s1")
    # k3 0.25 -> 0.20 on validation: k3 alone is best on 0,1,2 (no tie); layer 0 still wins (0.10)
    k3 = dict(EDITS, k3=(EDITS["k3"][0], 1.005, 0.20, 0.97))
    assert _chosen(_prepared(k3, scores=_scores(k3))[2]) == ("0", "k4", "s4")
    # k4 over the budget on one selection window: its ratio over windows 0-4 becomes
    # exp((4 ln 1.015 + ln 1.2) / 5) = 1.048 > 1.02: out, and layers 0-2 win again
    scores = _scores(EDITS)
    k4 = scores["k4"]
    k4.loc[(k4["track"] == "heldout") & (k4["window"] == 0), "nll_sum"] = 100.0 + TOKENS * math.log(1.2)
    table, _, choice, _ = _prepared(scores=scores)
    assert _chosen(choice) == ("0,1,2", "k3", "s1")
    ratio = table.set_index("edit").loc["k4", "sel_ppl_ratio"]
    assert ratio == pytest.approx(math.exp((4 * math.log(1.015) + math.log(1.2)) / 5))


def test_the_rule_never_reads_a_test_score():
    """Every test-split score and metric perturbed (the memorized track's test columns and scores,
    the extraction-rate track's, the paper's nDCG@10 column on the ER test split, the held-out report
    windows and the all-window perplexity): the same choice. The rule's columns are the only ones
    it reads (selection.READS)."""
    rng = np.random.default_rng(0)
    scores = _scores(EDITS)
    metrics = _metrics(EDITS)
    _, _, before, _ = _prepared(scores=scores, metrics=metrics)
    for rule in ({}, {"layer_rule": "joint"}):
        reference = _prepared(scores=scores, metrics=metrics, settings=rule)[2]
        ref, in_budget = _chosen(reference), reference.candidates["in_budget"].tolist()
        for trial in range(3):
            m = metrics.copy()
            for col in ("n_examples", "exact_er", "strict_accuracy", "fractional_er", "loose_accuracy",
                        "avg_levenshtein", "mem_loss", "mem_ppl", "er_exact_er", "er_fractional_er",
                        "er_loose_accuracy", "ndcg10"):
                m[col] = rng.uniform(0, 1, len(m))
            m.loc[m["edit"] != "none", "heldout_ppl"] = rng.uniform(5, 50, int((m["edit"] != "none").sum()))
            s = {}
            for edit, table in scores.items():
                t = table.copy()
                gen = t["track"].isin(["memorized", "extraction_rate"])
                t.loc[gen, "exact_match"] = rng.uniform(size=int(gen.sum())) < 0.5
                t.loc[gen, "n_match"] = rng.integers(0, 9, int(gen.sum()))
                t.loc[gen, "levenshtein_norm"] = rng.uniform(size=int(gen.sum()))
                t.loc[gen, "levenshtein_sim"] = 1 - t.loc[gen, "levenshtein_norm"]
                rep = (t["track"] == "heldout") & (t["window"] >= N_WINDOWS // 2)
                if edit != "none":
                    t.loc[rep, "nll_sum"] = rng.uniform(50, 500, int(rep.sum()))
                s[edit] = t
            table, _, choice, _ = _prepared(scores=s, metrics=m, settings=rule)
            assert _chosen(choice) == ref, (rule, trial)
            assert choice.candidates["in_budget"].tolist() == in_budget
            assert not table["sel_ppl_ratio"].equals(table["report_ppl_ratio"])  # the report windows did move
    assert _chosen(before) == ("0", "k4", "s4")


def test_a_point_over_the_budget_is_never_chosen_and_nothing_in_budget_is_said():
    # every edit over the PPL budget: nothing is chosen, the report says so rather than picking
    over = {e: (v[0], 1.05 + i / 100, v[2], v[3]) for i, (e, v) in enumerate(EDITS.items())}
    table, windows, choice, rule = _prepared(over)
    assert _chosen(choice) == (None, None, None)
    md = report.curvature_markdown(table, {}, prepared=(table, windows, choice, rule))
    assert "**Nothing chosen by the rule where it says so:** no K-FAC and no SVD edit on a common layer set is within the budget" in md
    # k1..k4 on the common sets: 1.05, 1.06, 1.07, 1.11 -> lowest 1.050; SVD s1..s4: 1.08, 1.09, 1.10, 1.12
    assert "| K-FAC | nothing chosen |" in md and "no K-FAC edit on any common layer set is within the budget (4 competed; lowest selection PPL ratio 1.050)" in md
    assert "no SVD edit on any common layer set is within the budget (4 competed; lowest selection PPL ratio 1.080)" in md
    assert "The chosen points on the test tracks" not in md
    # K-FAC within budget on layer 0 but SVD not: K-FAC is chosen, SVD's row says why not (no pick
    # of s4 at 1.03, nor of s1 on other layers)
    partial = dict(EDITS, s4=(EDITS["s4"][0], 1.03, 0.0, 0.95))
    table, windows, choice, rule = _prepared(partial)
    assert _chosen(choice) == ("0", "k4", None)
    assert choice.why["svd"] == "no SVD edit on layers 0 is within the budget (1 competed; lowest selection PPL ratio 1.030)"
    # no budget at all: k2 (validation 0, PPL 1.10) is K-FAC's best on layers 0-2, better than k4 (0.10) on
    # layer 0 (k5's 0 is on no common set), and SVD's best there is s3 (0.00, PPL 1.06)
    _, _, free, _ = _prepared(settings={"max_ppl_ratio": None, "min_ndcg10": None})
    assert _chosen(free) == ("0,1,2", "k2", "s3")


def test_without_a_validation_slice_nothing_is_chosen():
    metrics = _metrics(EDITS)
    metrics["val_n_examples"] = 0
    metrics["val_exact_er"] = math.nan
    table, windows, choice, rule = _prepared(metrics=metrics)
    assert _chosen(choice) == (None, None, None) and "never reads the test split" in choice.note
    md = report.curvature_markdown(table, {}, prepared=(table, windows, choice, rule))
    assert "the memorized track has no validation slice" in md


def test_the_chosen_points_are_reported_with_paired_tests_on_the_test_tracks():
    """Memorized test split, 20 sequences: the unedited model extracts all, chosen K-FAC (k4) 6,
    chosen SVD (s4) the same 6 and 6 more. K-FAC vs unedited: 14 discordant -> McNemar p = 2/2^14;
    K-FAC vs SVD: 0 vs 6 -> p = 2/2^6 = 0.031. Extraction-rate test split, 10 sequences: unedited 4,
    K-FAC 0, SVD the same 4: SVD vs unedited p = 1; K-FAC vs SVD 0 vs 4 -> p = 2/2^4 = 0.125.
    Report windows (5-9): K-FAC +0.01 nats per token, SVD +0.02: ratios exp(0.01), exp(0.02); K-FAC
    over SVD exp(-0.01), every window the same shift -> bootstrap p = 2/2001 < 0.001."""
    scores = _scores(EDITS)
    scores["k4"] = pd.concat([_track("memorized", [1] * 6 + [0] * 14), _track("extraction_rate", [0] * 10),
                              _heldout(1.015, math.exp(0.01))], ignore_index=True)
    scores["s4"] = pd.concat([_track("memorized", [1] * 12 + [0] * 8), _track("extraction_rate", [1] * 4 + [0] * 6),
                              _heldout(1.018, math.exp(0.02))], ignore_index=True)
    table, windows, choice, rule = _prepared(scores=scores)
    assert windows == selection.Windows(10, 5, True) and _chosen(choice) == ("0", "k4", "s4")
    rows = report.point_rows([("Unedited", {"edit": "none"}), ("K-FAC", {"edit": "k4"}), ("SVD", {"edit": "s4"})],
                             scores, set(range(5, 10))).set_index("label")
    assert rows.loc["K-FAC", "mem_count"] == "6/20" and rows.loc["K-FAC", "mem_vs"] == "lower (p<0.001)"
    assert rows.loc["SVD", "er_count"] == "4/10" and rows.loc["SVD", "er_vs"] == "no evidence of a difference (p=1)"
    assert rows.loc["K-FAC", "er_ci"] == "[0.000, 0.308]"  # 0/10: 1 - 0.025^(1/10)
    assert rows.loc["K-FAC", "report_ppl_ratio"] == pytest.approx(math.exp(0.01))
    assert rows.loc["SVD", "report_ppl_vs"] == "higher (p<0.001)"
    lines = report.compare_points(("K-FAC", {"edit": "k4"}), ("SVD", {"edit": "s4"}), scores, set(range(5, 10)))
    assert lines[0].startswith("- Memorized track, test split (N=20): Exact ER 0.300 vs 0.600: K-FAC lower (p=0.031) "
                               "(exact McNemar; 0 sequences only K-FAC reproduces, 6 only SVD); ")
    # the per-example differences all point one way: the bootstrap verdicts (p below 0.05 whatever the resamples)
    assert "; Fractional ER 0.300 vs 0.600: lower (p" in lines[0] and "; Avg. Levenshtein 0.700 vs 0.400: higher (p" in lines[0]
    assert lines[1].startswith("- Extraction-rate track, test split (N=10): Exact ER 0.000 vs 0.400: K-FAC no evidence "
                               "of a difference (p=0.12) (exact McNemar; 0 sequences only K-FAC reproduces, 4 only SVD)")
    assert lines[2] == (f"- Held-out PPL, report windows: K-FAC / SVD = {math.exp(-0.01):.3f} [{math.exp(-0.01):.3f}, "
                        f"{math.exp(-0.01):.3f}]: K-FAC lower (p<0.001) (paired bootstrap over 5 windows).")
    md = report.curvature_markdown(table, {}, scores=scores, prepared=(table, windows, choice, rule))
    assert "Chosen K-FAC against chosen SVD" in md and lines[0] in md
    assert "held-out windows 0-4 of 10 (selection) for the budget; windows 5-9 (report)" in md
    assert "| K-FAC (chosen) | k4 | pairwise | 0 | 0.6 | 0.300 | 6/20 |" in md


def test_paper_setting_rows_are_labelled_and_reported_apart():
    specs = {
        "kp": _spec("kfac", [0, 1, 2], 0.8),                     # the paper's K-FAC
        "sp": _spec("svd", [0, 1, 2], 0.2),                      # the paper's SVD
        "sg": _spec("svd", [0, 1, 2], 0.05),                     # its grid
        "sd": _spec("svd", [0, 1, 2], 0.22),                     # a dense point: not the paper's
        "s0": _spec("svd", [0], 0.2),                            # other layers
        "kf": _spec("kfac_factor", [0, 1, 2], 0.8),              # the per-factor reading
        "kd": {**_spec("kfac", [0, 1, 2], 0.8), "roles": ["down"]},  # one MLP matrix only
        "ka": _spec("kfac", [0, 1, 2], 0.8, calibration="without_memories"),  # an ablation's factors
    }
    edits = {e: (s, 1.01, 0.5, 0.95) for e, s in specs.items()}
    table, windows, choice, rule = _prepared(edits)
    by = table.set_index("edit")
    assert by.loc["kp", "paper_label"] == "K-FAC (paper: 80% energy, MLPs 0-2)" and by.loc["kp", "paper"] == "setting"
    assert by.loc["sp", "paper_label"] == "SVD (paper: top 20%, MLPs 0-2)" and by.loc["sp", "paper"] == "setting"
    assert by.loc["sg", "paper_label"] == "SVD (paper grid: top 5%, MLPs 0-2)" and by.loc["sg", "paper"] == "grid"
    assert (by.loc[["sd", "s0", "kf", "kd", "ka"], "paper"] == "").all()
    assert "ka" not in set(choice.candidates["edit"])  # the ablation row is not in the search space
    md = report.curvature_markdown(table, {}, prepared=(table, windows, choice, rule))
    paper = md[md.index("## The paper's own setting"):]
    rows = [line for line in paper.splitlines() if "| kp |" in line]
    assert len(rows) == 3 and all(r.startswith("| K-FAC (paper: 80% energy, MLPs 0-2) | kp |") for r in rows)  # 2 tracks + utility
    assert "| SVD (paper: top 20%, MLPs 0-2) | sp |" in paper and "| SVD (paper grid: top 5%, MLPs 0-2) | sg |" in paper
    assert "| sd |" not in paper and "| ka |" not in paper
    assert "The paper's K-FAC against the paper's SVD" in paper and "not chosen by the rule above" in paper
    assert paper.index("K-FAC (paper: 80%") < paper.index("SVD (paper: top 20%") < paper.index("SVD (paper grid: top 5%")
    # no paper rows: said so
    table, windows, choice, rule = _prepared({"s0": edits["s0"]})
    assert "No edit of this configuration is at the paper's setting" in report.curvature_markdown(
        table, {}, prepared=(table, windows, choice, rule))


def test_bad_rule_values_are_named_before_any_compute():
    with pytest.raises(ConfigError, match=r"curvature.report.max_ppl_ratio: 0.9 must be a number above 1"):
        selection.Rule.from_settings({"max_ppl_ratio": 0.9})
    with pytest.raises(ConfigError, match=r"curvature.report.kfac_forms: \['svd'\]"):
        selection.Rule.from_settings({"kfac_forms": ["svd"]})
    with pytest.raises(ConfigError, match=r"curvature.report.layer_rule: 'best'"):
        selection.Rule.from_settings({"layer_rule": "best"})
    with pytest.raises(ConfigError, match=r"curvature.report.selection_windows: 1"):
        selection.Rule.from_settings({"selection_windows": 1})


def test_frontier_plot_is_written(tmp_path):
    table, _, choice, _ = _prepared(scores=_scores(EDITS))
    report.plot_frontier(table, choice, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 10_000
