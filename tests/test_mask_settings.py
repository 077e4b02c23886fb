"""A train-mask job's settings (and a prune, sample-memories, balanced-subnet or csp job's): resolved
once by the planner into a frozen MaskJob (PruneJob, OwnMemories, BalancedSubnetJob, CspJob), carried
as ``--settings`` JSON, read back by the command (keys and types checked, nothing filled)."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest

from memctl import lab
from memctl.cli import main
from memctl.config import ConfigError, read_yaml, workflow_config
from memctl.masks.csp import CspJob
from memctl.masks.csp import job_schema as csp_job_schema
from memctl.masks.csp import resolve_job as resolve_csp_job
from memctl.masks.settings import (
    BalancedSubnetJob,
    MaskJob,
    OwnMemories,
    PruneJob,
    balanced_subnet_schema,
    fragment,
    mask_job_schema,
    prune_job_schema,
    resolve_balanced_subnet,
    resolve_mask_job,
    resolve_own_memories,
    resolve_prune_job,
)
from memctl.masks.training import resolve_budget
from memctl.plan import build_plan
from memctl.planning.core import as_json

REPO = Path(__file__).resolve().parents[1]
JOB = {"mode": "up", "lambda_s": 240, "steps": 60, "batch_size": 4}


def test_every_key_of_the_job_schema_is_a_typed_field():
    own = fragment("masks")["properties"]["own_memories"]
    for cls, schema in ((MaskJob, mask_job_schema()), (PruneJob, prune_job_schema()), (OwnMemories, own)):
        assert list(cls.__dataclass_fields__) == sorted(schema["properties"])  # in the JSON's order


def test_the_job_is_frozen_and_resolved_with_the_schema_defaults():
    job = resolve_mask_job(JOB)
    assert isinstance(job, MaskJob)
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.lr = 0.1
    assert (job.tau, job.offset, job.lr, job.steps, job.groups) == (0.4, 3.0, None, 60, ("attention", "mlp"))
    assert job["tau"] == 0.4 and dict(job)["steps"] == 60  # the read-only mapping view
    with pytest.raises(ConfigError, match=r"masks\.tau"):
        resolve_mask_job({**JOB, "tau": -1})  # limits: the schema's, at plan time


def test_the_json_keeps_every_value_and_its_type():
    job = resolve_mask_job(JOB)
    text = job.to_json()
    assert text == as_json(json.loads(text)) and '"lambda_s":240,' in text  # an integer stays one
    assert MaskJob.from_json(text) == job and MaskJob.from_json(text).to_json() == text


@pytest.mark.parametrize("change, named", [
    ({"tua": 0.4}, r"masks\.tua: unknown key; allowed keys: batch_size, bf16"),
    ({"tau": "0.4"}, r"masks\.tau: '0\.4' is not of type number"),
    ({"steps": 1.5}, r"masks\.steps: 1\.5 is not of type integer or null"),
    ({"keep_checkpoint": 1}, r"masks\.keep_checkpoint: 1 is not of type boolean"),
    ({"batch_size": True}, r"masks\.batch_size: True is not of type integer"),
    ({"groups": ["mlp", 3]}, r"masks\.groups: \['mlp', 3\] is not of type list of string"),
    ({"bf16": "yes"}, r"masks\.bf16: 'yes' is not of type boolean or 'auto'"),
    ({"tau": -1}, r"masks\.tau: -1 is less than"),  # the schema's limits, checked on reading too
    ({"gate": "coin"}, r"masks\.gate: 'coin' is not one of"),
])
def test_reading_a_job_back_refuses_a_bad_key_naming_it(change, named):
    planned = resolve_mask_job(JOB).to_dict()
    with pytest.raises(ConfigError, match=named):
        MaskJob.from_json(json.dumps({**planned, **change}))


def test_reading_a_job_back_fills_nothing():
    planned = resolve_mask_job(JOB).to_dict()
    del planned["tau"], planned["offset"]
    with pytest.raises(ConfigError, match=r"masks: missing keys offset, tau"):
        MaskJob.from_json(json.dumps(planned))
    with pytest.raises(ConfigError, match=r"masks: missing keys"):
        MaskJob.from_json(json.dumps(JOB))  # a hand-written partial job: resolve it first
    assert MaskJob.from_json(json.dumps({**resolve_mask_job(JOB).to_dict(), "bf16": "auto"})).bf16 == "auto"


def test_lr_null_is_derived_per_run_not_a_default():
    job = resolve_mask_job(JOB)
    run, info = resolve_budget(job, 16)
    assert job.lr is None and isinstance(run, MaskJob) and run.lr == info["lr"] and info["lr_rule"] != "set"
    assert dataclasses.replace(run, lr=None) == job  # only lr was derived (steps was set)


def test_prune_and_own_memories_jobs_read_back_the_same_way():
    job = resolve_prune_job({"method": "wanda", "sparsity": 0.3})
    assert isinstance(job, PruneJob) and job.form == "sequential" and PruneJob.from_json(job.to_json()) == job
    with pytest.raises(ConfigError, match=r"pruning\.damp: 'x' is not of type number"):
        PruneJob.from_json(json.dumps({**job.to_dict(), "damp": "x"}))
    own = resolve_own_memories({})
    assert own == OwnMemories(rows=256, seed=0) and own.to_json() == '{"rows":256,"seed":0}'
    with pytest.raises(ConfigError, match=r"masks\.own_memories: missing key seed"):
        OwnMemories.from_json('{"rows": 4}')


@pytest.mark.parametrize("config", ["tests/tiny_config.yaml", "config/config.yaml", "config/paper.yaml"])
def test_every_planned_job_reads_back_to_the_same_settings(config):
    path = REPO / config
    cfg = workflow_config(read_yaml(path), [str(path)], {}, REPO, REPO)
    plan = build_plan(cfg, lab.workflow_model_dims(cfg), python_version="3.11")
    for stage, cls, resolve in (("train_mask", MaskJob, resolve_mask_job), ("prune_baseline", PruneJob, resolve_prune_job),
                                ("sample_memories", OwnMemories, resolve_own_memories)):
        jobs = list(plan.stage(stage).jobs.values())
        assert jobs, stage
        for job in jobs:
            text = job.args[job.args.index("--settings") + 1]
            back = cls.from_json(text)
            assert back.to_json() == text == as_json(job.settings)
            assert back == resolve(json.loads(text))  # resolving again would change nothing
            assert f"--settings {shlex.quote(text)}" in job.command(2)


# ------------------------------------------------------------------- BalancedSubnet and CSP jobs


def _planned(stage):
    """The ``--settings`` texts of every planned ``stage`` job of the three configs."""
    texts = []
    for config in ("tests/tiny_config.yaml", "config/config.yaml", "config/paper.yaml"):
        path = REPO / config
        cfg = workflow_config(read_yaml(path), [str(path)], {}, REPO, REPO)
        plan = build_plan(cfg, lab.workflow_model_dims(cfg), python_version="3.11")
        for job in plan.stage(stage).jobs.values():
            text = job.args[job.args.index("--settings") + 1]
            assert text == as_json(job.settings) and f"--settings {shlex.quote(text)}" in job.command(2)
            texts.append(text)
    return texts


def test_balanced_subnet_and_csp_jobs_are_typed_fields_of_their_schemas():
    assert list(BalancedSubnetJob.__dataclass_fields__) == sorted(balanced_subnet_schema()["properties"])
    assert list(CspJob.__dataclass_fields__) == sorted(csp_job_schema()["properties"])
    bsn = resolve_balanced_subnet({})
    assert isinstance(bsn, BalancedSubnetJob) and bsn.roles == ("gate", "up", "down") and bsn.on_unconverged == "fail"
    down, up = (resolve_csp_job({"mode": m}) for m in ("down", "up"))
    assert isinstance(down, CspJob) and down.theta == 4.0 and down.to_dict()["theta"] == 4.0
    # mode up has no threshold: None, and no key in its JSON or mapping view (its hash and paths unchanged)
    assert up.theta is None and "theta" not in up.to_json() and "theta" not in up and len(up) == len(down) - 1
    assert resolve_csp_job({"mode": "up", "theta": 9.0}) == up


def test_planned_balanced_subnet_and_csp_jobs_read_back_to_the_same_settings():
    bsn = _planned("balanced_subnet")
    assert bsn
    for text in bsn:
        assert BalancedSubnetJob.from_json(text).to_json() == text
        assert BalancedSubnetJob.from_json(text) == resolve_balanced_subnet(json.loads(text))
    csp = _planned("csp")
    assert {json.loads(t)["mode"] for t in csp} == {"down", "up"}
    for text in csp:
        job = CspJob.from_json(text)
        assert job.to_json() == text and job == resolve_csp_job(json.loads(text))
        assert (job.theta is None) == (job.mode == "up") == ('"theta"' not in text)


BSN = resolve_balanced_subnet({"epochs": 1, "batch_size": 3, "ratio": 0.05, "lr": 10.0, "on_unconverged": "flag"})
CSP = {m: resolve_csp_job({"mode": m, "prompt_length": 3, "steps": 3, "batch_size": 4, "log_every": 2, "theta": 5.5})
       for m in ("down", "up")}


@pytest.mark.parametrize("command, planned, change, named", [
    ("balanced-subnet", BSN, {"ratio": -1}, r"pruning\.balanced_subnet\.ratio: -1 is less than or equal to the minimum"),
    ("balanced-subnet", BSN, {"roles": ["up", 1]}, r"pruning\.balanced_subnet\.roles: \['up', 1\] is not of type list"),
    ("balanced-subnet", BSN, {"ratoi": 0.1}, r"pruning\.balanced_subnet\.ratoi: unknown key"),
    ("csp", CSP["up"], {"theta": 4.0}, r"csp\.theta: not a setting of this job: mode up has no threshold"),
    ("csp", CSP["down"], {"theta": None}, r"csp\.theta: None is not of type 'number'"),
    ("csp", CSP["down"], {"lr": 0}, r"csp\.lr: 0 is less than or equal to the minimum of 0"),
    ("csp", CSP["down"], {"mode": "sideways"}, r"csp\.mode: 'sideways' is not of type 'down' or 'up'"),
])
def test_a_hand_edited_bsn_or_csp_job_is_refused_naming_the_key(command, planned, change, named, tmp_path, capsys):
    text = json.dumps({**planned.to_dict(), **change})
    cls = BalancedSubnetJob if command == "balanced-subnet" else CspJob
    with pytest.raises(ConfigError, match=named):
        cls.from_json(text)
    # the command refuses it before any model is loaded (there is none at --model)
    inputs = (["--forget", "f.parquet", "--retain", "r.parquet"] if command == "balanced-subnet"
              else ["--memorized", "m.parquet"])
    with pytest.raises(SystemExit) as err:
        main([command, "--model", str(tmp_path / "no-model"), *inputs, "--settings", text,
              "--out", str(tmp_path / "delta.safetensors"), "--log", str(tmp_path / "log.parquet")])
    assert err.value.code == 2 and re.search(named, capsys.readouterr().err)


def test_a_csp_down_job_without_theta_is_refused():
    planned = CSP["down"].to_dict()
    del planned["theta"]
    with pytest.raises(ConfigError, match=r"csp: missing key theta"):
        CspJob.from_json(json.dumps(planned))
    with pytest.raises(ConfigError, match=r"csp: missing keys"):
        CspJob.from_json(json.dumps({"mode": "up"}))  # a hand-written partial job: resolve it first


def test_the_bsn_and_csp_commands_do_not_resolve_the_job_again(tiny_model_dir, tmp_path, monkeypatch):
    """``memctl balanced-subnet`` / ``memctl csp`` train on the planned job as it reads back: neither
    command calls the resolver (the planner did, once); train_balanced_subnet gets the typed job."""
    import numpy as np
    import pandas as pd

    from memctl.edits import load_delta
    from memctl.masks import balanced_subnet, csp
    from memctl.masks import settings as mask_settings

    def refuse(*_a, **_k):
        raise AssertionError("a resolver called by the command")

    given = []
    monkeypatch.setattr(mask_settings, "resolve_balanced_subnet", refuse)
    monkeypatch.setattr(csp, "resolve_job", refuse)
    monkeypatch.setattr(balanced_subnet, "resolve_balanced_subnet", refuse)  # the trainer takes the typed job as is
    train = balanced_subnet.train_balanced_subnet
    monkeypatch.setattr(balanced_subnet, "train_balanced_subnet",
                        lambda model, forget, retain, job, **kw: given.append(job) or train(model, forget, retain, job, **kw))
    gen = np.random.default_rng(0)
    for name in ("memorized", "retain"):
        pd.DataFrame({"candidate_id": [f"{name}{i}" for i in range(6)],
                      "prefix_ids": list(gen.integers(1, 250, size=(6, 8))),
                      "suffix_ids": list(gen.integers(1, 250, size=(6, 8)))}).to_parquet(tmp_path / f"{name}.parquet")
    model = ["--model", str(tiny_model_dir), "--model-settings",
             json.dumps({"source": "local", "dtype": "float32", "device": "cpu"}), "--threads", "1"]
    runs = [("bsn", BSN, ["balanced-subnet", "--forget", str(tmp_path / "memorized.parquet"),
                          "--retain", str(tmp_path / "retain.parquet")])]
    runs += [(m, CSP[m], ["csp", "--memorized", str(tmp_path / "memorized.parquet")]) for m in ("down", "up")]
    for name, job, args in runs:
        out = tmp_path / name
        main([args[0], *model, *args[1:], "--settings", job.to_json(), "--out", str(out / "delta.safetensors"),
              "--log", str(out / "log.parquet")])
        assert load_delta(out / "delta.safetensors").metadata["settings"] == json.loads(job.to_json())
    assert given == [BSN] and isinstance(given[0], BalancedSubnetJob)
    assert "theta" not in load_delta(tmp_path / "up" / "delta.safetensors").metadata["settings"]
