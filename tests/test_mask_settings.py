"""A train-mask job's settings (and a prune or sample-memories job's): resolved once by the planner
into a frozen MaskJob (PruneJob, OwnMemories), carried as ``--settings`` JSON, read back by the
command (keys and types checked, nothing filled)."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from memctl import lab
from memctl.config import ConfigError, read_yaml, workflow_config
from memctl.masks.settings import (
    MaskJob,
    OwnMemories,
    PruneJob,
    fragment,
    mask_job_schema,
    prune_job_schema,
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
