"""One record per edit method (:mod:`memctl.edit_methods`): the registry, the labels read from it,
the docs' tables, and a toy pruning baseline added through its record alone, seen planned, run,
evaluated and reported on a copy of the shared tiny store."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from memctl import edit_methods, labels
from memctl.config import ConfigError, validate_config
from memctl.edit_methods import EditMethod, EditMethodError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "tiny_config.yaml"

#: The row labels as the tables have printed them (before the records).
TODAY = {
    "curvature": {"kfac": "K-FAC", "kfac_factor": "K-FAC (per factor)", "kfac_pairwise": "K-FAC (pairwise)",
                  "svd": "SVD"},
    "mask": {"none": "Ours (none)", "up": "Ours (up)", "down": "Ours (down)", "reciprocal": "Ours (reciprocal)"},
    "baseline": {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"},
    "balanced_subnet": {"balanced_subnet": "BalancedSubnet"},
    "csp": {"csp_down": "CSP (down)", "csp_up": "CSP (up)"},
}


# ----------------------------------------------------------------------------- the registry


def test_every_method_has_a_unique_name_and_label_and_todays_label():
    methods = list(edit_methods.METHODS.values())
    assert len({m.name for m in methods}) == len(methods)
    assert len({m.label for m in methods}) == len(methods)
    assert {f: {k: m.label for k, m in edit_methods.family(f).items()} for f in TODAY} == TODAY
    assert all(m.stage == edit_methods.FAMILY_STAGES[m.family] for m in methods)


def test_labels_module_reads_the_records():
    assert dict(labels.CURVATURE_LABELS) == TODAY["curvature"]
    assert dict(labels.MASK_MODE_LABELS) == TODAY["mask"]
    assert dict(labels.BASELINE_LABELS) == TODAY["baseline"]
    assert list(labels.FIXED_LABELS.items()) == [
        ("Origin", "the unedited model"), ("BalancedSubnet", "the BalancedSubnet baseline"),
        ("CSP (down)", "the CSP baseline"), ("CSP (up)", "the CSP baseline")]


def test_the_baselines_records_say_what_their_jobs_take():
    b = edit_methods.baseline_methods()
    assert list(b) == ["magnitude", "wanda", "sparsegpt"]
    assert (b["magnitude"].statistics, b["magnitude"].setting_keys, b["magnitude"].forms) == (None, (), ("sequential",))
    assert (b["wanda"].statistics, b["wanda"].setting_keys) == (
        "diagonal", ("calibration_windows", "batch_size", "second_moments"))
    assert (b["sparsegpt"].statistics, b["sparsegpt"].setting_keys) == (
        "full", ("calibration_windows", "batch_size", "second_moments", "damp", "block_size"))
    assert b["magnitude"].planned_forms(["one_pass"]) == ["sequential"]
    assert b["wanda"].planned_forms(["one_pass", "sequential"]) == ["one_pass", "sequential"]
    for m in b.values():
        assert callable(m.rule())  # the "module:function" names resolve


def test_register_refuses_a_taken_name_or_label_and_a_bad_record():
    with pytest.raises(EditMethodError, match="'wanda' is registered already"):
        edit_methods.register(EditMethod("wanda", "Wanda 2", "baseline", "prune_baseline", prune=lambda *a: a,
                                         forms=("sequential",)))
    with pytest.raises(EditMethodError, match="label 'SparseGPT' is the label of 'sparsegpt'"):
        edit_methods.register(EditMethod("sgpt2", "SparseGPT", "baseline", "prune_baseline", prune=lambda *a: a,
                                         forms=("sequential",)))
    with pytest.raises(EditMethodError, match="written by stage 'prune_baseline'"):
        EditMethod("x", "X", "baseline", "train_mask", prune=lambda *a: a, forms=("sequential",))
    with pytest.raises(EditMethodError, match="reads no statistics, so it has one form"):
        EditMethod("x", "X", "baseline", "prune_baseline", prune=lambda *a: a, forms=("sequential", "one_pass"))
    with pytest.raises(EditMethodError, match="no pruning settings"):
        EditMethod("x", "X", "baseline", "prune_baseline", statistics="diagonal", prune=lambda *a: a,
                   forms=("sequential",), setting_keys=("lr",))
    assert "sgpt2" not in edit_methods.METHODS and "x" not in edit_methods.METHODS


def test_a_config_naming_an_unknown_method_fails_naming_the_key_and_the_value():
    cfg = yaml.safe_load(TINY.read_text())
    cfg["pruning"]["methods"] = ["magnitude", "no_such_pruner"]
    with pytest.raises(ConfigError, match=r"pruning\.methods\.1: 'no_such_pruner' is not one of "
                                          r"\['magnitude', 'wanda', 'sparsegpt'\]"):
        validate_config(cfg)


# ----------------------------------------------------------------------------- the docs read them


def test_the_docs_name_every_registered_baseline():
    masks = (REPO / "docs" / "masks.md").read_text(encoding="utf-8")
    (row,) = [line for line in masks.splitlines() if line.startswith("| `prune_baseline`")]
    architecture = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    for name, method in edit_methods.baseline_methods().items():
        assert re.search(rf"\b{name}\b", row), f"docs/masks.md's prune_baseline row does not name {name}"
        if method.reads_data and "one_pass" in method.forms:
            assert f"{name}-onepass" in row
        assert f"`{name}`" in architecture, f"docs/architecture.md does not name {name}"


def test_the_architecture_docs_show_the_records_table():
    architecture = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert edit_methods.markdown() in architecture, "paste memctl.edit_methods.markdown() into docs/architecture.md"


# ----------------------------------------------------------------------------- a toy method


def column_magnitude(weight, statistic, sparsity, settings):
    """The toy rule: in every input column, drop the ``round(r * d_out)`` smallest ``|W|`` (a mask)."""
    import torch

    assert statistic is None
    scores = weight.detach().abs().float()
    k = round(sparsity * scores.shape[0])
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        keep.scatter_(0, torch.sort(scores, dim=0, stable=True).indices[:k, :], False)
    return keep, None


TOY = EditMethod("column_magnitude", "Column magnitude (toy)", "baseline", "prune_baseline",
                 "the toy column-magnitude baseline", statistics=None, forms=("sequential",), prune=column_magnitude)


@pytest.fixture
def toy_method():
    """The toy baseline registered for one test (and taken out again)."""
    edit_methods.register(TOY)
    try:
        yield TOY
    finally:
        edit_methods.unregister(TOY.name)


def test_the_toy_record_alone_makes_a_planned_run_evaluated_and_reported_baseline(toy_method, tiny_store_copy):
    import pandas as pd

    import tiny_store as ts
    from memctl.edits import load_delta

    work = tiny_store_copy
    config = work / "config" / "config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg.setdefault("pruning", {})["methods"] = ["magnitude", "wanda", "sparsegpt", TOY.name]
    config.write_text(yaml.safe_dump(cfg))

    plan = ts.plan_of(work)
    (job,) = [j for j in plan.stage("prune_baseline").jobs.values() if j.label == TOY.label]
    edit = plan.edits[job.key]
    assert (edit.stage, edit.label, edit.info["method"], edit.info["form"]) == (
        "prune_baseline", TOY.label, TOY.name, "none")
    assert "calibration" not in job.inputs and "factors" not in job.inputs  # statistics None: no data
    assert sorted(job.settings) == ["batch_size", "block_size", "calibration_windows", "damp", "form", "groups",
                                    "method", "second_moments", "sparsity"]

    ts.run_by_hand(work, job)
    delta = load_delta(work / edit.delta)
    target = float(cfg.get("masks", {}).get("sparsity", 0.3))
    assert delta.metadata["method"] == TOY.name and delta.metadata["label"] == TOY.label
    assert delta.masks and not delta.replace
    for name, keep in delta.masks.items():  # (d_out, d_in): every column drops round(r * d_out) weights
        assert (~keep).sum(dim=0).unique().tolist() == [round(target * keep.shape[0])], name
    assert abs(delta.metadata["sparsity"] - target) < 0.02

    (evaluate,) = [j for j in plan.stage("evaluate").jobs.values()
                   if edit.delta in [str(p) for v in j.inputs.values() for p in ts._paths(v)]]
    ts.run_by_hand(work, evaluate)
    (report,) = plan.stage("masks_report").jobs.values()
    assert any(e["edit"] == job.key and e["series"] == TOY.label for e in report.settings["edits"])
    ts.run_by_hand(work, report)
    table = pd.read_parquet(work / report.outputs["table"])
    assert TOY.label in set(table["method"]), sorted(set(table["method"]))
    assert f"| {TOY.label} |" in (work / report.outputs["markdown"]).read_text()


def test_the_toy_is_gone_after_its_test():
    assert TOY.name not in edit_methods.METHODS
    assert TOY.name not in labels.BASELINE_LABELS
