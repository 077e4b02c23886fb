"""Every supported model family through every model stage, offline, as ``model: {source: local}``.

For each family (GPT-NeoX / Pythia, GPT-Neo, GPT-2, Llama, OLMo-2, Qwen2, Mistral) a tiny
random-weight checkpoint built from the family's HF config class is saved with a tokenizer built
here, and the workflow's own plan (:func:`memctl.plan.build_plan`) for it is run job by job, in
dependency order, with exactly the ``memctl`` arguments Snakemake would pass (in-process, so
the family matrix stays within the CI budget): candidates, extract, held-out and calibration windows,
reference top-k, K-FAC collection (attention and MLP, so fused QKV and GPT-2's ``Conv1D`` are
covered) and decomposition, one edit of every curvature form (kfac, kfac_factor, kfac_pairwise,
svd), a trained mask, the three pruning baselines, BalancedSubnet and the evaluation of every
edit. The report stages read tables only and are left to the DAG tests. The whole DAG under
Snakemake runs on a local GPT-NeoX in tests/test_workflow.py.
"""

from __future__ import annotations

import json
import shlex

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_architecture_config

from memctl import architectures as arch
from memctl import stages as registry

FAMILIES = ["gpt_neox", "gpt_neo", "gpt2", "llama", "olmo2", "qwen2", "mistral"]
#: One more run of a family with the model placed by accelerate (``model.device_map``, budgeted by
#: ``max_memory``): every stage must work on a dispatched model (on the CPU here, the only device).
PLACED = "llama+device_map"
PLACEMENT = {"device_map": "auto", "max_memory": {"cpu": "2GiB"}}
#: Stages that read tables and write reports only: the DAG tests run them.
REPORTS = {"report", "curvature_report", "masks_report"}
EDIT_FORMS = ("kfac", "kfac_factor", "kfac_pairwise", "svd")
#: The language-model stages that load the model or its data (merge_kfac needs shards; kfac_spectrum,
#: the downstream tasks and the vision track are opt-in; reports read tables only).
MODEL_STAGES = {"candidates", "extract", "heldout", "calibration", "reference_topk", "collect_kfac", "decompose_kfac",
                "apply_edit", "train_mask", "prune_baseline", "balanced_subnet", "csp", "evaluate"}
CONTEXT = 64  #: the tiny models' learned positions (conftest.tiny_architecture_config)


def family_config(kind: str, vocab: int, eos: int):
    """A 2-layer, width-32 config of the family's HF config class (no hub access): the suite's one
    tiny model definition (``conftest.tiny_architecture_config``)."""
    return tiny_architecture_config(kind, vocab=vocab, eos=eos)


@pytest.fixture(scope="module")
def family_run(request, tmp_path_factory, tiny_tokenizer_dir):
    """Plan and run every model stage for one family; returns (plan, work dir, model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memctl import lab
    from memctl.cli import main
    from memctl.config import load_config
    from memctl.generation import greedy_generate
    from memctl.plan import build_plan

    kind = request.param.partition("+")[0]
    placement = PLACEMENT if request.param == PLACED else {}
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp(f"family-{kind}")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(kind, len(tok), tok.eos_token_id)).eval()
    model_dir = tmp / f"tiny-{kind.replace('_', '-')}"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    # Candidates: even ones are the model's own greedy continuation (memorized by construction).
    rng = np.random.default_rng(0)
    prefixes = rng.integers(1, len(tok) - 1, size=(8, 16))
    own = greedy_generate(model, list(prefixes), 16, tok.pad_token_id, progress=False)
    suffixes = [own[i] if i % 2 == 0 else (own[i] + 1) % (len(tok) - 1) for i in range(8)]
    pd.DataFrame({"id": [f"s{i}" for i in range(8)], "prefix_ids": list(prefixes), "suffix_ids": suffixes}
                 ).to_parquet(tmp / "cands.parquet")
    (tmp / "text.txt").write_text("The quick brown fox jumps over the lazy dog. 0123456789 " * 30)
    (tmp / "c4.txt").write_text("A stitch in time saves nine, and a rolling stone gathers no moss. 42 " * 30)
    cfg_path = tmp / "config.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump({
        "root": str(tmp / "store"), "results_dir": str(tmp / "tables"),
        "model": {"source": "local", "name_or_path": str(model_dir), **placement},
        "candidates": {"source": "parquet", "path": str(tmp / "cands.parquet")},
        "extract": {"preset": None, "prefix_len": 16, "suffix_len": 16, "test_fraction": 0.5, "batch_size": 8},
        # held-out windows shorter than the context: the CSP soft prompt is prepended to them, and
        # GPT-Neo / GPT-2 have only CONTEXT learned positions (the plan refuses a prompt that does not fit)
        "heldout": {"source": "text", "path": str(tmp / "text.txt"), "context_length": CONTEXT - 8},
        "csp": {"prompt_length": 4, "steps": 2, "batch_size": 4},
        "calibration": {"source": "text", "path": str(tmp / "c4.txt")},
        "resources": {"threads": 1},
        "curvature": {
            "data": {"max_tokens": 256, "batch_size": 4},
            "modules": {"groups": ["attention", "mlp"]},
            "edits": [{"method": m, "layers": [0], "strength": 0.8} for m in EDIT_FORMS],
        },
        "masks": {"modes": ["down"], "steps": 2, "batch_size": 2, "mem_batch_size": 2, "log_every": 1,
                  "checkpoint_every": 2, "on_unconverged": "flag",
                  "sweep": {"sparsities": [], "thresholds": [], "baselines": False}},
        "pruning": {"methods": ["magnitude", "wanda", "sparsegpt"], "calibration_windows": 4, "batch_size": 4,
                    "block_size": 16,
                    "balanced_subnet": {"epochs": 1, "batch_size": 4, "on_unconverged": "flag"}},
    }))
    config = load_config(cfg_path)
    plan = build_plan(config, lab.workflow_model_dims(config))
    producer = {p: job for job in plan.jobs() for p in job.outputs.values()}
    done: set[tuple[str, str]] = set()

    def run(job):
        if (job.stage, job.key) in done:
            return
        for value in job.inputs.values():
            for path in value if isinstance(value, (list, tuple)) else [value]:
                if path in producer:
                    run(producer[path])
        main(shlex.split(job.command(threads=1))[1:])
        done.add((job.stage, job.key))

    needed = {}  # what the results tables need (demo stages are planned but not needed), reports left out
    for target in plan.targets:
        job = producer.get(target)
        if job is not None and job.stage not in REPORTS:
            needed[(job.stage, job.key)] = job
        elif job is not None:
            for value in job.inputs.values():
                for path in value if isinstance(value, (list, tuple)) else [value]:
                    if path in producer and producer[path].stage not in REPORTS:
                        needed[(producer[path].stage, producer[path].key)] = producer[path]
    for job in needed.values():
        run(job)
    return request.param, plan, model_dir, model, done


def pytest_generate_tests(metafunc):
    if "family_run" in metafunc.fixturenames:
        # The quick tier runs GPT-2 (Conv1D, fused attention; the shared tiny store runs GPT-NeoX);
        # every other family, and the placed model, in the full suite.
        params = [pytest.param(f, marks=() if f == "gpt2" else pytest.mark.slow) for f in [*FAMILIES, PLACED]]
        metafunc.parametrize("family_run", params, indirect=True, scope="module")


def test_every_model_stage_ran_and_wrote_sound_artifacts(family_run):
    from memctl.store import verify

    kind, plan, _, _, done = family_run
    ran = {stage for stage, _ in done}
    assert MODEL_STAGES <= ran, sorted(MODEL_STAGES - ran)
    assert all(registry.get(s) for s in ran)
    (collect,) = plan.stage("collect_kfac").jobs.values()
    loaded = json.loads(open(collect.outputs["factors"] + ".meta.json").read())["model_loaded"]
    assert loaded["devices"] == ["cpu"]
    # the device_map run: stages loaded the model through accelerate's placement
    assert loaded["device_map"] == plan.model.settings.get("device_map") == ("auto" if "+" in kind else None)
    for stage, key in done:
        for path in plan.stage(stage).jobs[key].outputs.values():
            if not path.endswith(".meta.json"):
                assert not verify(path), (kind, stage, path)


def test_every_edit_form_changed_the_targeted_matrices(family_run):
    from safetensors import safe_open

    kind, plan, _, model, _ = family_run
    targets = {t.param_name: t for t in arch.linear_targets(model)}
    assert {t.role for t in targets.values()} >= {"o", "down"}
    forms = set()
    for edit in plan.edits.values():
        if edit.info.get("family") != "curvature":
            continue
        forms.add(edit.info["method"])
        with safe_open(edit.delta, framework="pt") as fh:
            names = [k for k in fh.keys() if k.removeprefix("replace/") in targets]
            assert names, (kind, edit.id, list(fh.keys())[:5])
            for key in names:
                new = fh.get_tensor(key).float()
                old = model.get_parameter(key.removeprefix("replace/")).detach().float()
                assert new.shape == old.shape and targets[key.removeprefix("replace/")].layer == 0
                assert 0 < float((new - old).norm() / old.norm()) < 1.0, (kind, edit.id, key)
    assert forms == set(EDIT_FORMS)


def test_extraction_and_metrics_of_every_edit(family_run):
    kind, plan, _, _, _ = family_run
    (extract,) = plan.stage("extract").jobs.values()
    memorized = pd.read_parquet(extract.outputs["memorized"])
    assert sorted(memorized["candidate_id"]) == [f"s{i}" for i in range(0, 8, 2)], kind
    rows = pd.concat([pd.read_parquet(j.outputs["metrics"]) for j in plan.stage("evaluate").jobs.values()])
    assert len(rows) == len(plan.edits) >= 1 + len(EDIT_FORMS) + 1 + 3 + 1
    origin = rows[rows["edit"] == "none"].iloc[0]
    assert origin["exact_er"] == 1.0 and np.isfinite(origin["heldout_ppl"]), kind
    assert np.isfinite(rows["heldout_ppl"]).all(), rows[["edit", "heldout_ppl"]]


def test_memory_limited_placement_plan(tmp_path):
    """accelerate's plan for a budget that holds the embeddings and about one block on GPU 0: the
    first modules go there, the rest to the CPU, in layer order; nothing is loaded or needs a GPU."""
    from transformers import AutoModelForCausalLM

    from memctl.config import ConfigError
    from memctl.models import check_placement, placement_plan

    torch.manual_seed(0)
    cfg = family_config("llama", 300, 0)
    cfg.num_hidden_layers = 4
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path)
    sizes = {name: sum(p.numel() * 4 for p in mod.parameters()) for name, mod in model.model.layers.named_children()}
    embed = model.model.embed_tokens.weight.numel() * 4
    # accelerate keeps room for the largest module (here the 300 x 32 output head, as big as the
    # embeddings) on a device that spills over: this budget holds the embeddings and block 0
    budget = 2 * embed + int(1.5 * sizes["0"])
    plan = placement_plan(tmp_path, {"device_map": "auto", "max_memory": {"0": budget, "cpu": 2**30}})
    assert {k for k, d in plan.items() if d == 0} == {"model.embed_tokens", "model.layers.0"}
    assert all(plan[f"model.layers.{i}"] == "cpu" for i in (1, 2, 3)) and plan["lm_head"] == "cpu"
    assert embed + sizes["0"] <= budget < embed + sizes["0"] + sizes["1"] + embed  # block 1 did not fit
    with pytest.raises(ConfigError, match="model.max_memory needs model.device_map"):
        check_placement({"max_memory": {"cpu": "1GiB"}})
    with pytest.raises(ConfigError, match="model.max_memory: keys \\['gpu0'\\]"):
        check_placement({"device_map": "auto", "max_memory": {"gpu0": "1GiB"}})
    with pytest.raises(ConfigError, match="model.device_map: 'everywhere'"):
        check_placement({"device_map": "everywhere"})
