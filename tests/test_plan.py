"""The plan (memctl.plan), the stage registry (memctl.stages) and config composition, without
Snakemake: which jobs exist, where they write, what a changed setting touches."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from memctl import lab, stages
from memctl.config import ConfigError, load_config, merge, validate_config, workflow_config
from memctl.plan import build_plan

REPO = Path(__file__).resolve().parents[1]
TINY = Path(__file__).with_name("tiny_config.yaml")


def tiny(change=None):
    raw = yaml.safe_load(TINY.read_text())
    if change:
        change(raw)
    cfg = validate_config(raw)
    return build_plan(cfg, lab.workflow_model_dims(cfg), python_version="3.11")


def job_keys(plan):
    """(stage, key) -> (outputs, args) of every job."""
    return {(j.stage, j.key): (dict(j.outputs), j.args) for j in plan.jobs()}


def changed(before, after):
    a, b = job_keys(before), job_keys(after)
    return sorted({stage for stage, key in a.keys() ^ b.keys()} | {s for (s, k) in a.keys() & b.keys() if a[s, k] != b[s, k]})


def test_tiny_plan_has_every_stage_and_one_evaluation_per_edit():
    plan = tiny()
    counts = {name: len(s.jobs) for name, s in plan.stages.items()}
    assert counts["apply_edit"] == 3  # the tiny config's three curvature edits
    assert counts["train_mask"] == 5  # modes none/up/down + sparsity 0.4 (up) + threshold 6 (down)
    assert counts["prune_baseline"] == 3 and counts["balanced_subnet"] == 1
    assert counts["csp"] == 2  # CSP (down), CSP (up)
    assert counts["evaluate"] == len(plan.edits) == 1 + 3 + 5 + 3 + 1 + 2
    assert set(plan.stage("evaluate").jobs) == set(plan.edits)
    assert set(plan.stages) <= set(stages.STAGES)


def test_every_job_input_is_made_by_a_job_and_no_two_jobs_write_one_path():
    plan = tiny()
    produced = {}
    for job in plan.jobs():
        for path in job.outputs.values():
            assert path not in produced, (job.stage, path)
            produced[path] = job.stage
            assert path.startswith(("results/", "results/tables/")), path
    for job in plan.jobs():
        for value in job.inputs.values():
            for path in value if isinstance(value, list) else [value]:
                assert path in produced, (job.stage, path)
    for target in plan.targets:
        assert target in produced


def test_artifacts_are_what_the_targets_need():
    plan = tiny()
    needed = set(plan.artifacts())
    assert set(plan.targets) <= needed
    assert plan.job("extract").outputs["memorized_test"] in needed
    assert all(p in needed for p in plan.job("apply_edit", {"curv_edit": next(iter(plan.stage("apply_edit").jobs))}).outputs.values())
    off = tiny(lambda c: c["curvature"]["spectrum"].update(enabled=False))
    assert off.job("kfac_spectrum").outputs["spectrum"] not in set(off.artifacts())  # planned, not needed


def test_wildcard_patterns_match_their_jobs():
    plan = tiny()
    for stage in plan.stages.values():
        for job in stage.jobs.values():
            for name, pattern in stage.outputs.items():
                expected = pattern.replace(f"{{{stage.wildcard}}}", job.key) if stage.wildcard else pattern
                assert job.outputs[name] == expected
            if stage.wildcard:
                assert re.fullmatch(stage.constraint, job.key)
                assert job.log == stage.log.replace(f"{{{stage.wildcard}}}", job.key)


@pytest.mark.parametrize(
    "change, expected",
    [
        # evaluation settings: every evaluation and the reports that read metrics, nothing upstream
        (lambda c: c["evaluate"].update(loose_threshold=0.5),
         ["curvature_report", "evaluate", "masks_report", "report"]),
        # batch sizes: how fast, not what (flags from the rules' resources)
        (lambda c: (c["evaluate"].update(batch_size=8, heldout_batch_size=2), c["extract"].update(batch_size=3)), []),
        # one edit's strength: that edit (a new id), its evaluation, the reports listing it
        (lambda c: c["curvature"]["edits"][0].update(strength=0.7),
         ["apply_edit", "curvature_report", "evaluate", "report"]),
        # the K-FAC data budget: collection onward; the SVD edit, extraction and masks untouched
        (lambda c: c["curvature"]["data"].update(max_tokens=2000),
         ["apply_edit", "collect_kfac", "curvature_report", "decompose_kfac", "evaluate", "kfac_spectrum",
          "report"]),
        # the down-mode threshold: only down masks
        (lambda c: c["masks"].update(threshold=5.0), ["evaluate", "masks_report", "report", "train_mask"]),
        # the masks' calibration text: their calibration job, the masks and baselines that read it; no K-FAC job
        (lambda c: c.setdefault("calibration", {}).update(demo_text={"masks": "stream"}),
         ["calibration", "evaluate", "masks_report", "prune_baseline", "report", "train_mask"]),
        # the factors' calibration text: their calibration job and the K-FAC chain; no mask, no SVD edit
        (lambda c: c.setdefault("calibration", {}).update(demo_text={"kfac": "documents"}),
         ["apply_edit", "calibration", "collect_kfac", "curvature_report", "decompose_kfac", "evaluate",
          "kfac_spectrum", "report"]),
    ],
)
def test_a_changed_setting_changes_only_the_jobs_it_touches(change, expected):
    assert changed(tiny(), tiny(change)) == expected


def _flag(job, name):
    return job.args[job.args.index(name) + 1] if name in job.args else None


def test_two_calibration_texts_one_per_consumer():
    """The demo: the factors read the training stream (canaries included), the masks, pruning
    baselines and BalancedSubnet's calibration retain set its canary-free documents; both drop the
    windows that share a run with any evaluated sequence (test, validation, extraction-rate test, OOD)."""
    plan = tiny(lambda c: c["pruning"]["balanced_subnet"].update(retain="calibration"))
    jobs = plan.stage("calibration").jobs
    assert plan.stage("calibration").wildcard == "calib" and len(jobs) == 2
    text = {_flag(j, "--demo-text"): j.outputs["windows"] for j in jobs.values()}
    assert set(text) == {"stream", "documents"}
    evaluated = [plan.job("extract").outputs[t] for t in ("memorized_test", "memorized_val", "er_test", "ood")]
    for job in jobs.values():
        assert job.inputs["exclude"] == evaluated and "--disjoint-ngram" in job.args
        assert job.outputs["windows"] == f"{plan.model.dir}/calibration-{job.key}/windows.safetensors"
    (collect,) = plan.stage("collect_kfac").jobs.values()
    assert collect.inputs["windows"] == text["stream"]
    masks = [*plan.stage("train_mask").jobs.values(), *plan.stage("balanced_subnet").jobs.values(),
             *(j for j in plan.stage("prune_baseline").jobs.values() if not j.key.startswith("magnitude"))]
    assert masks and all(text["documents"] in (_flag(j, "--calibration"), _flag(j, "--retain")) for j in masks)
    assert text["stream"] not in {p for j in masks for p in j.args}
    report = plan.job("report")
    assert report.inputs["data"][-2:] == [text["documents"], text["stream"]]  # their sidecars: what was dropped


def test_a_user_text_is_one_calibration_for_every_consumer(tmp_path):
    (tmp_path / "c4.txt").write_text("text " * 100)
    plan = tiny(lambda c: c.update(calibration={"source": "text", "path": str(tmp_path / "c4.txt")}))
    (job,) = plan.stage("calibration").jobs.values()
    assert "--demo-text" not in job.args and "--corpus" not in job.args
    (collect,) = plan.stage("collect_kfac").jobs.values()
    assert collect.inputs["windows"] == job.outputs["windows"] == plan.job("train_mask", {
        "edit": next(iter(plan.stage("train_mask").jobs))}).inputs["calibration"]


def test_calibration_on_the_held_out_text_drops_the_held_out_windows(tmp_path):
    """One text for held-out and calibration (`memctl init` without --calibration): the calibration
    job reads the held-out windows and drops those it shares a run with; a different text, or the
    demo's, keeps its job as it was. With the n-gram check off the plan refuses."""
    (tmp_path / "heldout.txt").write_text("text " * 100)
    (tmp_path / "c4.txt").write_text("other " * 100)
    same = {"source": "text", "path": str(tmp_path / "heldout.txt")}
    plan = tiny(lambda c: c.update(heldout=dict(same), calibration={**same, "path": str(tmp_path / "." / "heldout.txt")}))
    (job,) = plan.stage("calibration").jobs.values()
    heldout = plan.job("heldout").outputs["windows"]
    assert job.inputs["heldout_windows"] == heldout == _flag(job, "--heldout-windows")
    assert _flag(job, "--disjoint-ngram") == "16"
    other = tiny(lambda c: c.update(heldout=dict(same), calibration={**same, "path": str(tmp_path / "c4.txt")}))
    (plain,) = other.stage("calibration").jobs.values()
    assert "heldout_windows" not in plain.inputs and "--heldout-windows" not in plain.args
    assert job.key != plain.key  # its own artifact
    demo = tiny()
    assert all("heldout_windows" not in j.inputs for j in demo.stage("calibration").jobs.values())
    with pytest.raises(ConfigError, match="same text as heldout .* extract.disjoint_ngram 0"):
        tiny(lambda c: (c.update(heldout=dict(same), calibration=dict(same)), c["extract"].update(disjoint_ngram=0)))


def test_the_calibration_ablation_is_a_second_kfac_chain_with_labels_that_say_so():
    before = tiny()
    plan = tiny(lambda c: c["curvature"].update(ablations={"calibration_without_memories": True}))
    # only added jobs: the main chain, SVD, masks and every other job keep their paths and arguments
    a, b = job_keys(before), job_keys(plan)
    assert {k: v for k, v in a.items() if k[0] not in ("curvature_report", "report")}.items() <= b.items()
    added = sorted(stage for stage, _ in b.keys() - a.keys())
    kfac = [e for e in before.edits.values() if e.stage == "apply_edit" and e.info["method"] != "svd"]
    assert added == sorted(["calibration", "collect_kfac", "decompose_kfac", *["apply_edit"] * len(kfac),
                            *["evaluate"] * len(kfac)])
    rows = [e for e in plan.edits.values() if e.info.get("calibration") == "without_memories"]
    assert sorted(e.label for e in rows) == sorted(f"{e.label}, calibration without memories" for e in kfac)
    assert {e.info["method"] for e in rows} == {e.info["method"] for e in kfac}  # no SVD row
    # the ablation reads the documents, with every memorized sequence dropped too
    (cal,) = [j for k, j in plan.stage("calibration").jobs.items() if k not in before.stage("calibration").jobs]
    assert _flag(cal, "--demo-text") == "documents"
    assert cal.inputs["exclude"][-1] == plan.job("extract").outputs["memorized"]
    (collect,) = [j for j in plan.stage("collect_kfac").jobs.values() if j.inputs["windows"] == cal.outputs["windows"]]
    (decompose,) = [j for j in plan.stage("decompose_kfac").jobs.values() if j.key.startswith(collect.key + "/")]
    for edit in rows:
        job = plan.job("apply_edit", {"curv_edit": edit.id})
        assert job.inputs["eigen"] == decompose.outputs["eigen"] and '"calibration":"without_memories"' in _flag(
            job, "--settings")
        assert edit.id in plan.stage("evaluate").jobs
        assert plan.job("evaluate", {"edit": edit.id}).outputs["metrics"] in plan.job("curvature_report").inputs["metrics"]
    assert len(plan.stage("kfac_spectrum").jobs) == 1  # the spectrum stays the paper's
    labels = [e.label for e in plan.edits.values()]
    assert len(set(labels) & {e.label for e in rows}) == len(rows)
    with pytest.raises(ConfigError, match="curvature.ablations.calibration_without_memories gives the ablation row"):
        tiny(lambda c: c["curvature"].update(
            ablations={"calibration_without_memories": True},
            edits=[{"method": "kfac", "layers": [0], "strength": 0.8, "label": "mine"},
                   {"method": "kfac", "layers": [1], "strength": 0.8, "label": "mine, calibration without memories"}]))


def test_the_ablation_of_a_user_text_needs_the_ngram_check(tmp_path):
    (tmp_path / "c4.txt").write_text("text " * 100)

    def change(c, n):
        c.update(calibration={"source": "text", "path": str(tmp_path / "c4.txt")})
        c["extract"]["disjoint_ngram"] = n
        c["curvature"].update(ablations={"calibration_without_memories": True})

    plan = tiny(lambda c: change(c, 16))
    assert len(plan.stage("calibration").jobs) == 2 and len(plan.stage("decompose_kfac").jobs) == 2
    with pytest.raises(ConfigError, match="extract.disjoint_ngram is 0"):
        tiny(lambda c: change(c, 0))


def test_sharded_chains_keep_their_paths_and_keys_apart():
    plan = tiny(lambda c: c["curvature"].update(data={"max_tokens": 3000, "shards": 2},
                                                ablations={"calibration_without_memories": True}))
    collect, merge = plan.stage("collect_kfac"), plan.stage("merge_kfac")
    assert len(collect.jobs) == 4 and len(merge.jobs) == 2 and len(plan.stage("decompose_kfac").jobs) == 2
    for key, job in merge.jobs.items():
        assert job.inputs["shards"] == [collect.jobs[f"{key}/shards/{i}"].outputs["factors"] for i in range(2)]
    assert not re.fullmatch(collect.constraint, next(iter(merge.jobs)))


def test_changed_strength_keeps_every_other_edit_id():
    before, after = tiny(), tiny(lambda c: c["curvature"]["edits"][0].update(strength=0.7))
    assert len(set(before.edits) ^ set(after.edits)) == 2  # one id out, one in
    svd = [e for e in before.edits.values() if e.info.get("method") == "svd"]
    assert svd and all(e.id in after.edits for e in svd)
    ids_before = set(before.stage("apply_edit").jobs)
    ids_after = set(after.stage("apply_edit").jobs)
    assert len(ids_before & ids_after) == 2


def test_batch_sizes_are_runtime_flags():
    plan = tiny(lambda c: c["extract"].update(batch_size=3))
    job = plan.job("extract")
    assert job.runtime == {"batch_size": 3} and "batch_size" not in job.settings
    assert shlex.split(job.command(1))[2:6] == ["--threads", "1", "--batch-size", "3"]


def test_stage_threads_override_per_rule_and_rerun_nothing():
    """resources.stage_threads sets one rule's threads (others keep resources.threads, one-thread
    rules stay at 1); threads are not a setting, so no job changes; bad names are refused."""
    res = {"threads": 2, "stage_threads": {"evaluate": 1, "train_mask": 3}}
    assert [stages.job_threads(s, res) for s in ("evaluate", "train_mask", "extract", "report")] == [1, 3, 2, 1]
    assert stages.job_threads("evaluate", {"threads": 4}) == 4
    before = tiny()
    after = tiny(lambda c: c.setdefault("resources", {}).update(stage_threads={"evaluate": 1}))
    assert changed(before, after) == []
    with pytest.raises(ConfigError, match=r"stage_threads\.evaluat: no such rule"):
        tiny(lambda c: c.setdefault("resources", {}).update(stage_threads={"evaluat": 1}))
    with pytest.raises(ConfigError, match=r"stage_threads\.report: this rule runs on one thread"):
        tiny(lambda c: c.setdefault("resources", {}).update(stage_threads={"report": 2}))
    with pytest.raises(ConfigError, match="stage_threads"):
        tiny(lambda c: c.setdefault("resources", {}).update(stage_threads={"evaluate": 0}))


def test_candidates_get_the_lengths_only():
    """Extraction settings that do not shape the candidate table do not reach it."""
    assert "candidates" not in changed(tiny(), tiny(lambda c: c["extract"].update(split_seed=7, batch_size=8)))
    plan = tiny(lambda c: c["extract"].update(prefix_len=20, suffix_len=12))
    cand = plan.job("candidates")
    assert cand.settings["prefix_len"] == 20 and cand.settings["suffix_len"] == 12
    assert '{"prefix_len":20,"suffix_len":12}' in cand.args
    assert lab._seq_len(plan.config) == 32  # the resource estimate reads the same resolved lengths


def test_arguments_survive_the_shell(tmp_path):
    root = str(tmp_path / "a store; with $(spaces)")
    plan = tiny(lambda c: c.update(root=root, results_dir=f"{root}/tables"))
    job = plan.job("evaluate", {"edit": "none"})
    assert shlex.split(job.arg_string) == list(job.args)
    assert job.args[job.args.index("--out-dir") + 1].startswith(root)
    assert shlex.split(job.command(2))[:2] == ["memctl", "evaluate"]


@pytest.mark.parametrize("key, value", [("root", "results/../elsewhere"), ("results_dir", "../tables"),
                                        ("root", "a\nb")])
def test_store_paths_stay_inside(key, value):
    with pytest.raises(ConfigError, match=key):
        tiny(lambda c: c.update({key: value}))


def test_model_tag_must_be_path_safe():
    with pytest.raises(ConfigError, match="model.tag"):
        tiny(lambda c: c["model"].update(tag=".."))


def test_kfac_second_moments_with_the_sequential_form_is_refused():
    with pytest.raises(ConfigError, match="pruning.second_moments"):
        tiny(lambda c: c["pruning"].update(second_moments="kfac", forms=["sequential"]))


def test_sweeps_over_every_layer_need_the_layer_count():
    def per_layer(c):
        c["curvature"]["sweeps"] = {"per_layer": {"methods": ["svd"]}}

    cfg = validate_config(yaml.safe_load(TINY.read_text()) | {"curvature": {"sweeps": {"per_layer": {"methods": ["svd"]}}}})
    assert len(build_plan(cfg, lab.workflow_model_dims(cfg)).stage("apply_edit").jobs) == 2  # 2 layers
    with pytest.raises(ConfigError, match="layers"):
        build_plan(cfg, None)


# ------------------------------------------------------------------------------ the registry


def test_every_rule_is_a_stage_and_every_stage_a_command():
    from memctl.cli import build_parser

    text = "\n".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    rules = set(re.findall(r"^\s*rule (\w+):", text, re.MULTILINE))
    assert rules == set(stages.STAGES)
    for name in rules:
        assert f'"memctl {stages.get(name).command}' in text, name
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(stages.commands()) <= set(sub.choices)
    for name, stage in stages.STAGES.items():
        # the registry's entry is the function the subcommand runs
        assert sub.choices[stage.command].get_default("func").__qualname__ == stage.function, name
        assert re.fullmatch(r"[0-9a-f]{12}", stages.code_hash(name))


def test_stage_code_follows_the_imports():
    src = Path(stages.__file__).parent
    collect = {p.relative_to(src).as_posix() for p in stages.code_files("collect_kfac")}
    assert {"curvature/collect.py", "architectures.py", "models.py"} <= collect
    assert "curvature/decompose.py" not in collect  # editing the decomposition keeps the factors
    assert not any(p.startswith(("store/", "cli.py", "plan.py")) for p in collect)  # infrastructure
    edit = {p.relative_to(src).as_posix() for p in stages.code_files("apply_edit")}
    assert {"curvature/edit.py", "architectures.py", "edits.py"} <= edit
    masks = {p.relative_to(src).as_posix() for p in stages.code_files("train_mask")}
    assert {"masks/training.py", "masks/gates.py", "masks/data.py"} <= masks
    # the extraction and the evaluation are no report's code: a table's wording reruns only reports
    for name in ("extract", "evaluate", "collect_kfac", "train_mask"):
        files = {p.relative_to(src).as_posix() for p in stages.code_files(name)}
        assert not files & {"report.py", "masks/report.py", "curvature/report.py", "plots.py"}, (name, files)
        assert not any(p.startswith("planning/") for p in files), name


def test_stage_code_hash_changes_with_a_used_helper_only(tmp_path, monkeypatch):
    """The entry module counts with the definitions the entry uses: another command's code in
    the same module does not rerun this stage."""
    module = tmp_path / "memctl_fake"
    module.mkdir()
    src = (
        "import json\n\n"
        "def helper():\n    return 1\n\n"
        "def other():\n    return 2\n\n"
        "def cmd_a(args):\n    return helper()\n"
    )
    monkeypatch.setattr(stages, "SRC", tmp_path / "memctl")
    pkg = tmp_path / "memctl"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "fake.py").write_text(src)
    stage = stages.Stage("fake", "fake", "memctl.fake:cmd_a", "light")
    monkeypatch.setitem(stages.STAGES, "fake", stage)
    stages.clear_caches()
    first = stages.code_hash("fake")
    (pkg / "fake.py").write_text(src.replace("return 2", "return 3"))
    stages.clear_caches()
    assert stages.code_hash("fake") == first
    (pkg / "fake.py").write_text(src.replace("return 1", "return 4"))
    stages.clear_caches()
    assert stages.code_hash("fake") != first
    stages.clear_caches()


def test_code_hashes_are_kept_between_processes_until_any_source_changes(tmp_path, monkeypatch):
    """Snakemake hashes every stage's code in every run and every cluster job: the hashes are kept
    in the package's __pycache__ under the digest of all its sources, and any edit recomputes them."""
    pkg = tmp_path / "memctl"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "helper.py").write_text("def helper():\n    return 1\n")
    (pkg / "fake.py").write_text("from memctl.sub.helper import helper\n\ndef cmd_a(args):\n    return helper()\n")
    (pkg / "unrelated.py").write_text("X = 1\n")
    monkeypatch.setattr(stages, "SRC", pkg)
    monkeypatch.setitem(stages.STAGES, "fake", stages.Stage("fake", "fake", "memctl.fake:cmd_a", "light"))
    compute = stages._compute_code_hash
    calls = []
    monkeypatch.setattr(stages, "_compute_code_hash", lambda stage: calls.append(stage.name) or compute(stage))
    stages.clear_caches()
    first = stages.code_hash("fake")
    assert calls == ["fake"] and (pkg / "__pycache__" / stages.CODE_HASH_CACHE).is_file()
    stages.clear_caches()  # a new process: read back, nothing parsed
    assert stages.code_hash("fake") == first and calls == ["fake"]
    # an edit the stage does not depend on: computed again, the same hash
    (pkg / "unrelated.py").write_text("X = 2\n")
    stages.clear_caches()
    assert stages.code_hash("fake") == first and calls == ["fake", "fake"]
    # an edit it depends on (two modules away): a new hash, cached in turn
    (pkg / "sub" / "helper.py").write_text("def helper():\n    return 2\n")
    stages.clear_caches()
    second = stages.code_hash("fake")
    assert second != first and calls == ["fake"] * 3
    stages.clear_caches()
    assert stages.code_hash("fake") == second and calls == ["fake"] * 3
    # a damaged cache file or a package it cannot write to: computed, never an error
    cache = pkg / "__pycache__" / stages.CODE_HASH_CACHE
    cache.write_text("{not json")
    stages.clear_caches()
    assert stages.code_hash("fake") == second and calls == ["fake"] * 4
    # a write that fails half way (after its temporary sibling exists) removes that sibling and
    # nothing else of the folder: Python's own bytecode beside it stays
    (pkg / "__pycache__" / "fake.cpython-311.pyc").write_bytes(b"bytecode")
    cache.unlink()  # (the test's own file: the next write has to create it)
    import memctl.store.atomic as atomic

    def fail(path):
        assert path.name.startswith(".") and path.is_file()  # the temporary sibling, written
        raise PermissionError("read-only")

    monkeypatch.setattr(atomic, "fsync_tree", fail)
    stages.clear_caches()
    assert stages.code_hash("fake") == second and calls == ["fake"] * 5
    left = sorted(p.name for p in (pkg / "__pycache__").iterdir())
    assert not [n for n in left if stages.CODE_HASH_CACHE in n], left  # no cache, no temporary leftover
    assert (pkg / "__pycache__" / "fake.cpython-311.pyc").read_bytes() == b"bytecode"
    stages.clear_caches()


# ---------------------------------------------------------------------- config composition


def test_sweeps_are_opt_in():
    """A config that asks for one mode trains one mask (plus the baselines it leaves enabled)."""
    cfg = validate_config({"masks": {"modes": ["down"]}, "pruning": {"methods": [], "balanced_subnet": {"enabled": False}}})
    plan = build_plan(cfg, lab.workflow_model_dims(cfg), python_version="3.11")
    assert len(plan.stage("train_mask").jobs) == 1 and len(plan.stage("apply_edit").jobs) == 0


def test_extends_puts_the_file_on_top_of_what_it_names(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"masks": {"modes": ["down", "up"], "steps": 7},
                                                        "extract": {"batch_size": 3}}))
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"extends": "base.yaml", "masks": {"steps": 9}}))
    cfg = load_config(tmp_path / "mine.yaml")
    assert cfg["masks"]["modes"] == ["down", "up"] and cfg["masks"]["steps"] == 9
    assert cfg["extract"]["batch_size"] == 3 and "extends" not in cfg


def test_extends_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml not found"):
        load_config(tmp_path / "c.yaml")


def test_a_user_config_does_not_inherit_the_demo(tmp_path):
    """Snakemake with --configfile: the file is the config (schema defaults fill the rest);
    without one, config/config.yaml is, with --config values on top."""
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    mine = {"masks": {"modes": ["down"]}}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(mine))
    cfg = workflow_config(copy.deepcopy(mine), [str(tmp_path / "mine.yaml")], {}, tmp_path, REPO)
    assert cfg["curvature"]["sweeps"]["strength"]["svd"] != demo["curvature"]["sweeps"]["strength"]["svd"]
    default = workflow_config({}, [], {"extract": {"batch_size": 5}}, tmp_path, REPO)
    assert default["curvature"]["sweeps"]["strength"]["svd"] == demo["curvature"]["sweeps"]["strength"]["svd"]
    assert default["extract"]["batch_size"] == 5
    ext = {"extends": "config/config.yaml", "extract": {"batch_size": 5}}
    extended = workflow_config(ext, [str(tmp_path / "mine.yaml")], {}, tmp_path, REPO)
    assert extended["masks"]["steps"] == demo["masks"]["steps"] and extended["extract"]["batch_size"] == 5


def test_the_full_reproduction_is_the_quick_tour_plus_its_sweeps():
    """config/paper.yaml extends the quick tour on the full testbed: it changes only the testbed's
    size (demo corpus, canaries, pretraining steps, candidate windows, calibration windows and the
    K-FAC token budget that follows them); every quick-tour job on that testbed is planned by it
    unchanged (same paths, so one store serves both), and it adds the sweeps, forms and ablations."""
    paper_raw = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    testbed = {
        "demo": paper_raw["demo"],
        "candidates": paper_raw["candidates"],
        "calibration": paper_raw["calibration"],
        "curvature": {"data": paper_raw["curvature"]["data"]},
    }
    assert set(paper_raw["demo"]) == {"corpus", "canaries", "train"}
    assert set(paper_raw["curvature"]["data"]) == {"max_tokens"}
    tour_raw = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    tour_cfg = validate_config(merge(tour_raw, testbed))
    paper_cfg = load_config(REPO / "config" / "paper.yaml")
    assert tour_cfg["demo"] == paper_cfg["demo"]
    tour = build_plan(tour_cfg, lab.workflow_model_dims(tour_cfg))
    paper = build_plan(paper_cfg, lab.workflow_model_dims(paper_cfg))
    tour_outputs = {p for s in tour.stages.values() for j in s.jobs.values() for p in j.outputs.values()}
    paper_outputs = {p for s in paper.stages.values() for j in s.jobs.values() for p in j.outputs.values()}
    report_files = {p for p in tour_outputs if "/tables/" in p or p.startswith(tour_cfg["results_dir"])}
    assert tour_outputs - report_files <= paper_outputs
    for stage in ("apply_edit", "train_mask", "prune_baseline", "evaluate"):
        assert len(paper.stage(stage).jobs) > len(tour.stage(stage).jobs), stage
    # one point of every curvature form in the quick tour
    methods = sorted({j.settings.get("method") for j in tour.stage("apply_edit").jobs.values()})
    assert methods == ["kfac", "kfac_pairwise", "svd"]
    # the vision track trains its ViT with the paper's weight decay (loss-curvature paper App. B.1)
    assert paper_cfg["vision"]["enabled"] and paper_cfg["vision"]["train"]["weight_decay"] == 0.3


# ------------------------------------------------------------------ masks: issue 23 (forget track, paired)


def _forget_of(plan, edit):
    args = plan.stage("evaluate").jobs[edit].args
    return args[args.index("--forget") + 1] if "--forget" in args else None


def test_every_trained_mask_and_origin_are_scored_on_one_sample_of_their_training_memories():
    plan = tiny(lambda raw: raw["masks"].update(own_memories={"rows": 40, "seed": 3}))
    (sample_job,) = plan.stage("sample_memories").jobs.values()
    sample = sample_job.outputs["sample"]
    er_train = plan.stage("extract").jobs[""].outputs["er_train"]
    assert sample_job.inputs == {"table": er_train} and sample_job.settings == {"rows": 40, "seed": 3}
    assert sample_job.args[sample_job.args.index("--table") + 1] == er_train
    masks = set(plan.stage("train_mask").jobs)
    csp = set(plan.stage("csp").jobs)
    assert masks and csp
    for edit in masks | csp | {"none"}:  # every mode's mask (none too: up vs none on the same rows), CSP, Origin
        job = plan.stage("evaluate").jobs[edit]
        assert _forget_of(plan, edit) == sample and job.inputs["forget"] == sample, edit
    # each of them trains on er_train (none: on no memories; Origin: nothing), the sample's table
    for edit in masks | csp:
        job = plan.stage("train_mask").jobs.get(edit) or plan.stage("csp").jobs[edit]
        if job.settings["mode"] != "none":
            assert job.inputs["memorized"] == er_train, edit
    # BalancedSubnet keeps its own forget set; the curvature edits and the baselines train on no memories
    (bsn,) = plan.stage("balanced_subnet").jobs
    assert _forget_of(plan, bsn) == plan.stage("extract").jobs[""].outputs["memorized_train"]
    for edit in [*plan.stage("apply_edit").jobs, *plan.stage("prune_baseline").jobs]:
        assert _forget_of(plan, edit) is None, edit
    # the sample's settings key it: other rows, other path; every mask job stays as it was
    other = tiny(lambda raw: raw["masks"].update(own_memories={"rows": 41, "seed": 3}))
    assert next(iter(other.stage("sample_memories").jobs.values())).outputs["sample"] != sample
    assert set(other.stage("train_mask").jobs) == masks
    # masks off: no sample, and Origin is scored on no forget track
    off = tiny(lambda raw: raw["masks"].update(enabled=False))
    assert not off.stage("sample_memories").jobs and _forget_of(off, "none") is None


def test_masks_of_every_mode_share_lambda_s_seeds_and_steps():
    plan = tiny(lambda raw: raw["masks"].update(lambda_s=50, seeds=[0, 1]))
    main = [j.settings for j in plan.stage("train_mask").jobs.values()]
    assert {s["lambda_s"] for s in main} == {50.0}
    assert {s["steps"] for s in main} == {60}
    by_mode: dict = {}
    for s in main:
        by_mode.setdefault(s["mode"], set()).add(s["seed"])
    assert by_mode["none"] == by_mode["up"] == by_mode["down"] == {0, 1}
    spec = plan.stage("masks_report").jobs[""].settings["edits"]
    assert {e["lambda_s"] for e in spec if e.get("family") == "ours"} == {50.0}
    # the per-mode mapping (the paper's presets): allowed, but must name every planned mode
    mapped = tiny(lambda raw: raw["masks"].update(lambda_s={"none": 160, "up": 240, "down": 160}))
    assert {j.settings["mode"]: j.settings["lambda_s"] for j in mapped.stage("train_mask").jobs.values()
            if j.label.startswith("Ours (") and "," not in j.label} == {"none": 160, "up": 240, "down": 160}
    with pytest.raises(ConfigError, match=r"masks\.lambda_s\.down"):
        tiny(lambda raw: raw["masks"].update(lambda_s={"none": 160, "up": 240}))


def test_the_papers_threshold_sweep_straddles_the_unpruned_memorization_loss():
    """config/paper.yaml's t grid has points below and above the quick tour's measured unpruned L_mem on
    er_train (1.34 nats, docs/masks.md), and `none` at every swept sparsity (up vs none paired there)."""
    cfg = load_config(REPO / "config" / "paper.yaml")
    ts = [*cfg["masks"]["sweep"]["thresholds"], cfg["masks"]["threshold"]]
    assert min(ts) < 1.34 < max(ts) and sum(t < 1.34 for t in ts) >= 2
    assert set(cfg["masks"]["sweep"]["sparsity_modes"]) == {"none", "up"}
    assert cfg["masks"]["ablations"]["mem_loss_tokens"] == ["suffix"]
    assert isinstance(cfg["masks"]["lambda_s"], (int, float))  # one lambda_s: the paired design


def test_bf16_auto_is_resolved_at_plan_time_and_keys_the_artifacts(monkeypatch, tmp_path):
    """`bf16: auto` (demo pretraining, masks) becomes true only where bf16 is native (a GPU, or CPU
    flags avx512_bf16 / amx_bf16): emulated bf16 is several times slower than fp32. The resolved
    value is what the jobs get and what their hashes carry."""
    from memctl import config as config_module

    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(config_module, "CPUINFO", str(cpuinfo))
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 fma\n")
    assert config_module.native_bf16() is False and config_module.native_bf16(gpu=True) is True
    auto = lambda c: (c["demo"]["train"].update(bf16="auto"), c["masks"].update(bf16="auto"))  # noqa: E731
    avx2 = tiny(auto)
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n")
    assert config_module.native_bf16() is True
    native = tiny(auto)
    for plan, want in ((avx2, False), (native, True)):
        assert plan.stage("demo_pretrain").jobs[""].settings["train"]["bf16"] is want
        assert {j.settings["bf16"] for j in plan.stage("train_mask").jobs.values()} == {want}
    # explicit values are kept; the resolved value keys the model and the masks
    assert changed(avx2, native) and "demo_pretrain" in changed(avx2, native)
    assert avx2.stage("demo_pretrain").jobs[""].outputs != native.stage("demo_pretrain").jobs[""].outputs
    assert config_module.resolve_bf16(True) is True and config_module.resolve_bf16(False, gpu=True) is False
