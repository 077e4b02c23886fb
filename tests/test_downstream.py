"""The downstream stage (lm-eval, the weight-pruning paper's Table 4) on a local multiple-choice task
and the tiny model, offline: accuracies checked against log-likelihoods computed here by hand; and
the downstream table of the shared tiny store (``tests/tiny_store.py``)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("lm_eval")

from memctl.cli import main  # noqa: E402
from memctl.edits import apply_delta, save_delta  # noqa: E402
from memctl.models import load_model, load_tokenizer  # noqa: E402
from memctl.store import read_sidecar, sidecar_path, verify  # noqa: E402

MODEL_SETTINGS = {"source": "local", "dtype": "float32", "device": "cpu"}
WORDS = ["fox", "dog", "box", "jugs", "lazy", "quick"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A local lm-eval task: 12 three-way questions from the tiny tokenizer's text, data in a jsonl file."""
    root = tmp_path_factory.mktemp("tasks")
    gen = np.random.default_rng(0)
    docs = []
    for i in range(12):
        choices = list(gen.choice(WORDS, size=3, replace=False))
        docs.append({"question": f"The quick brown {i}:", "choices": choices, "label": int(gen.integers(0, 3))})
    (root / "tiny_mc.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (root / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'tiny_mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return root, docs


def _hand_accuracy(model, tokenizer, docs) -> float:
    """lm-eval's multiple-choice accuracy, computed independently: the summed log-probability of
    " <choice>" after the question (the continuation = the tokens of question + " choice" past the
    question's own tokens), argmax against the label."""
    hits = 0
    for doc in docs:
        ctx = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
            scores.append(float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))))
        hits += int(np.argmax(scores) == doc["label"])
    return hits / len(docs)


@pytest.fixture(scope="module")
def deltas(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("deltas")
    model = load_model(tiny_model_dir, MODEL_SETTINGS)
    gen = torch.Generator().manual_seed(0)
    masks = {name: torch.rand(p.shape, generator=gen) > 0.6 for name, p in model.named_parameters()
             if p.ndim == 2 and ".mlp." in name}  # prune 60% of every MLP matrix
    width = model.get_input_embeddings().embedding_dim
    return {"mask": save_delta(root / "mask.safetensors", masks=masks),
            "prompt": save_delta(root / "prompt.safetensors", prompt=torch.randn(3, width, generator=gen))}


def test_downstream_scores_every_edit_on_the_local_task_and_writes_table_4(tiny_model_dir, task_dir, deltas, tmp_path):
    root, docs = task_dir
    settings = {"tasks": ["tiny_mc"], "include_path": str(root), "batch_size": 4}
    edits = [{"edit": "none", "label": "Origin", "delta": None},
             {"edit": "mask-x", "label": "Ours (down)", "delta": str(deltas["mask"])},
             {"edit": "csp-x", "label": "CSP (down)", "delta": str(deltas["prompt"])}]
    out = tmp_path / "part.parquet"
    main(["downstream", "--model", str(tiny_model_dir), "--model-settings", json.dumps(MODEL_SETTINGS),
          "--threads", "1", "--edits", json.dumps(edits), "--settings", json.dumps(settings), "--out", str(out)])
    assert verify(out) == []
    results = pd.read_parquet(out)
    acc = results[results["metric"] == "acc"].set_index("edit")
    assert list(acc.index) == ["none", "mask-x", "csp-x"] and set(acc["n_samples"]) == {12}
    tokenizer = load_tokenizer(tiny_model_dir)
    expected = {}
    for edit, delta in (("none", None), ("mask-x", deltas["mask"]), ("csp-x", deltas["prompt"])):
        model = load_model(tiny_model_dir, MODEL_SETTINGS)
        if delta:
            apply_delta(model, delta)
        expected[edit] = _hand_accuracy(model, tokenizer, docs)
        assert acc.loc[edit, "value"] == pytest.approx(expected[edit]), edit
    assert len(set(expected.values())) > 1  # the edits were applied: not every row is Origin's
    side = read_sidecar(out)
    assert set(side["cost"]["tokens_processed"]) == {"none", "mask-x", "csp-x"}

    report = tmp_path / "tables"
    main(["downstream-report", "--results", str(out), "--settings", json.dumps(settings), "--out-dir", str(report)])
    table = pd.read_parquet(report / "downstream.parquet")
    assert list(table["method"]) == ["Origin", "CSP (down)", "Ours (down)"]  # the masks table's row order
    assert list(table["tiny_mc"]) == pytest.approx([expected[e] for e in ("none", "csp-x", "mask-x")])
    assert list(table["Avg"]) == list(table["tiny_mc"])  # one task: its mean is itself
    md = (report / "downstream.md").read_text()
    assert "| Method | Edit | tiny_mc | Avg |" in md
    assert f"| Origin | none | {expected['none']:.3f} | {expected['none']:.3f} |" in md


@pytest.mark.slow  # an unknown name is looked up in lm-eval's whole task index (~13 s on 2 cores)
def test_an_unknown_task_fails_naming_it_before_a_model_is_loaded(tiny_model_dir, task_dir, tmp_path, capsys):
    root, _ = task_dir
    with pytest.raises(SystemExit):
        main(["downstream", "--model", str(tiny_model_dir), "--edits", json.dumps([{"edit": "none"}]),
              "--settings", json.dumps({"tasks": ["no_such_task"], "include_path": str(root)}),
              "--out", str(tmp_path / "x.parquet")])
    assert "unknown lm-eval task(s) ['no_such_task']" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()


def test_bad_settings_and_a_missing_metric_fail_naming_them(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):  # the settings are checked against the schema before anything runs
        main(["downstream", "--model", str(tiny_model_dir), "--edits", json.dumps([{"edit": "none"}]),
              "--settings", json.dumps({"tasks": ["tiny_mc"], "limit": 0}), "--out", str(tmp_path / "x.parquet")])
    assert "downstream.limit: 0 is less than the minimum of 1" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()
    from memctl.downstream import table4

    results = pd.DataFrame([{"edit": "none", "method": "Origin", "task": "t", "metric": "acc", "value": 0.5}])
    with pytest.raises(ValueError, match=r"task 't' has no 'acc_norm' \(it has \['acc'\]\)"):
        table4(results, "acc_norm", ["t"])


def test_plan_batches_the_chosen_edits_and_is_off_without_tasks():
    from pathlib import Path

    import yaml

    from memctl import lab
    from memctl.config import validate_config
    from memctl.plan import build_plan

    def plan(downstream):
        raw = yaml.safe_load(Path(__file__).with_name("tiny_config.yaml").read_text(encoding="utf-8"))
        raw["downstream"] = downstream
        cfg = validate_config(raw)
        return build_plan(cfg, lab.workflow_model_dims(cfg), python_version="3.11")

    off = plan({})
    assert not off.stage("downstream").jobs and not any("downstream" in t for t in off.targets)
    one = plan({"tasks": ["arc_easy"]})
    (job,) = one.stage("downstream").jobs.values()
    edits = json.loads(job.args[job.args.index("--edits") + 1])
    main_table = [e.id for e in one.edits.values() if e.info.get("family") in ("origin", "ours", "baseline", "csp")
                  and (e.stage != "train_mask" or e.label.startswith("Ours (") and "," not in e.label)]
    assert [e["edit"] for e in edits] == [e for e in main_table if e in {x["edit"] for x in edits}]
    assert {e["label"] for e in edits} >= {"Origin", "Magnitude", "CSP (down)", "CSP (up)", "Ours (down)"}
    assert len(job.inputs["deltas"]) == len(edits) - 1  # every edit's delta but Origin's
    assert "results/tables/downstream.md" in one.targets
    split = plan({"tasks": ["arc_easy"], "edits_per_job": 1, "edits": "all"})
    assert len(split.stage("downstream").jobs) == len(split.edits)
    report = split.stage("downstream_report").jobs[""]
    assert sorted(report.inputs["results"]) == sorted(j.outputs["results"] for j in split.stage("downstream").jobs.values())


def test_dag_writes_the_downstream_table_with_the_csp_edits(tiny_store, tiny_plan):
    """The shared tiny store (``tests/tiny_store.py``: a local task ``cloze``, ``downstream.edits:
    main``): every edit of the main masks table scored (Origin and both CSP prompts among them), the
    table of every edit in the masks report's order."""
    from memctl.masks.report import ROW_ORDER

    (masks_report,) = tiny_plan.stage("masks_report").jobs.values()
    main_edits = [e["edit"] for e in masks_report.settings["edits"] if "main" in e["tables"]]
    (job,) = tiny_plan.stage("downstream").jobs.values()
    scored = json.loads(job.args[job.args.index("--edits") + 1])
    assert [e["edit"] for e in scored] == main_edits
    # the masks report's order: its row order (ROW_ORDER), then the plan's (masks.report.main_table)
    rank = {label: i for i, label in enumerate(ROW_ORDER)}
    label = {e: tiny_plan.edits[e].label for e in main_edits}
    expected = sorted(main_edits, key=lambda e: rank.get(label[e], len(rank)))
    assert {"Origin", "CSP (down)", "CSP (up)"} <= set(label.values())
    (report,) = tiny_plan.stage("downstream_report").jobs.values()
    table = pd.read_parquet(tiny_store / report.outputs["parquet"])
    assert list(table["edit"]) == expected
    assert list(table["method"]) == [label[e] for e in expected]
    masks_table = pd.read_parquet(tiny_store / masks_report.outputs["table"])
    assert list(table["edit"]) == list(masks_table["edit"])  # the masks table's rows, in its order
    assert table["cloze"].between(0, 1).all() and list(table["Avg"]) == list(table["cloze"])
    assert verify(tiny_store / report.outputs["md"]) == []
    for out in (*report.outputs.values(), job.outputs["results"]):  # every one with a sidecar verifies
        if sidecar_path(tiny_store / out).exists():
            assert verify(tiny_store / out) == [], out


def test_local_tasks_skip_the_index_of_lm_evals_own_tasks(task_dir):
    """Tasks all found in downstream.include_path: lm-eval's index of its ~15,000 own task files is
    not built (~30 s per job on a CPU); a task outside it needs that index, so it is built."""
    from memctl.downstream import task_manager

    root, _ = task_dir
    local = task_manager(str(root), ["tiny_mc"])
    assert "tiny_mc" in local.all_tasks and len(local.all_tasks) < 10
