"""Mask-training checkpoints: safetensors + JSON only, never a pickle; exact resume; bad ones ignored."""

from __future__ import annotations

import json
import logging
import pathlib

import pytest
import torch

from memctl.masks.data import sequences_from_pairs
from memctl.masks.checkpoint import CHECKPOINT, CHECKPOINT_STATE, CHECKPOINT_TENSORS, LEGACY_CHECKPOINT
from memctl.masks.training import train_mask

LOGGER = "memctl.masks.training"
# 12 iterations do not train a mask to its target (on_unconverged: flag writes it anyway): these tests
# are about the checkpoints, not the mask.
SETTINGS = {"mode": "down", "lambda_s": 160, "steps": 12, "lr": 0.1, "batch_size": 4, "mem_batch_size": 4,
            "threshold": 6.0, "log_every": 3, "checkpoint_every": 4, "on_unconverged": "flag"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup():
    """A tiny random GPT-NeoX, calibration windows and a few 'memorized' sequences."""
    from conftest import tiny_architecture_model

    model = tiny_architecture_model("gpt_neox")
    gen = torch.Generator().manual_seed(3)
    calibration = torch.randint(0, 300, (16, 16), generator=gen)
    seqs = torch.randint(0, 300, (6, 16), generator=gen)
    memorized = sequences_from_pairs([s[:8].tolist() for s in seqs], [s[8:].tolist() for s in seqs])
    return model, calibration, memorized


def _train(setup, settings=None, **kwargs):
    model, calibration, memorized = setup
    return train_mask(model, calibration, memorized, {**SETTINGS, **(settings or {})}, progress=False, **kwargs)


def _same(a, b):
    assert a.masks.keys() == b.masks.keys()
    for name, mask in a.masks.items():
        assert torch.equal(mask, b.masks[name]), name
    assert a.log.equals(b.log)


@pytest.fixture(scope="module")
def whole(setup):
    return _train(setup)


def _interrupted(setup, work_dir, stop_after=6, settings=None):
    with pytest.raises(KeyboardInterrupt):
        _train(setup, settings, work_dir=work_dir, stop_after=stop_after)
    ckpt = work_dir / CHECKPOINT
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([CHECKPOINT_TENSORS, CHECKPOINT_STATE])
    return ckpt


class _Planted:
    """Unpickling this creates ``marker`` (what an attacker's code would do, harmlessly)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_planted_pickle_checkpoint_is_never_executed(setup, whole, tmp_path, caplog):
    marker = tmp_path / "pwned"
    # The plant is live: the loader the old code used would run it.
    probe = tmp_path / "probe.pt"
    torch.save({"format": "x", "payload": _Planted(tmp_path / "probe_marker")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe_marker").exists()

    work = tmp_path / "job"
    work.mkdir()
    torch.save({"format": "memctl-mask-checkpoint/1", "payload": _Planted(marker)}, work / LEGACY_CHECKPOINT)
    # ... and the same pickle where the new format's files go.
    (work / CHECKPOINT).mkdir()
    for name in (CHECKPOINT_TENSORS, CHECKPOINT_STATE):
        (work / CHECKPOINT / name).write_bytes((work / LEGACY_CHECKPOINT).read_bytes())
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = _train(setup, work_dir=work)
    assert not marker.exists()
    _same(result, whole)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(LEGACY_CHECKPOINT in m and "never loaded" in m for m in messages), messages
    assert any("ignoring checkpoint" in m for m in messages), messages
    assert not any("resuming" in r.getMessage() for r in caplog.records)


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(setup, whole, tmp_path, caplog):
    keep = {"keep_checkpoint": True}
    _interrupted(setup, tmp_path / "b", stop_after=6, settings=keep)
    state = json.loads((tmp_path / "b" / CHECKPOINT / CHECKPOINT_STATE).read_text())
    assert state["iteration"] == 4 and "lr" in state["optimizer_param_groups"][0]
    with caplog.at_level(logging.INFO, logger=LOGGER):
        resumed = _train(setup, keep, work_dir=tmp_path / "b")
    assert any("resuming down mask training at iteration 4" in r.getMessage() for r in caplog.records)
    _same(resumed, whole)
    # Logits and AdamW state at the end are identical too (the kept checkpoints of both runs).
    _same(_train(setup, keep, work_dir=tmp_path / "a"), whole)
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / CHECKPOINT / CHECKPOINT_TENSORS) for d in ("a", "b"))
    assert a.keys() == b.keys() and any(k.endswith("exp_avg_sq") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    states = [json.loads((tmp_path / d / CHECKPOINT / CHECKPOINT_STATE).read_text()) for d in ("a", "b")]
    costs = [state.pop("cost") for state in states]  # the run's history: wall time and segments differ
    assert states[0] == states[1]
    assert costs[0]["tokens_processed"] == costs[1]["tokens_processed"] == TOKENS_PER_RUN
    assert (costs[0]["segments"], costs[1]["segments"]) == (1, 2)


# What one iteration of SETTINGS reads (mode down: a calibration forward, then a memorized one): batch_size
# windows of 16 tokens and mem_batch_size sequences of 8 + 8 tokens (no padding), by hand.
TOKENS_PER_ITERATION = SETTINGS["batch_size"] * 16 + SETTINGS["mem_batch_size"] * (8 + 8)  # 64 + 64
TOKENS_PER_RUN = SETTINGS["steps"] * TOKENS_PER_ITERATION  # 12 x 128 = 1,536


def test_a_resumed_run_records_the_cost_of_the_whole_job(setup, whole, tmp_path):
    """Killed after 6 iterations (its last checkpoint at 4) and resumed: the tokens, forward passes and
    wall time recorded are the whole job's (4 iterations before the kill that count, 8 after), not the
    last segment's 8 x 128 = 1,024 tokens."""
    assert whole.cost["tokens_processed"] == TOKENS_PER_RUN == 1536
    assert whole.cost["forward_calls"] == 2 * SETTINGS["steps"] and whole.cost["segments"] == 1
    _interrupted(setup, tmp_path, stop_after=6)
    saved = json.loads((tmp_path / CHECKPOINT / CHECKPOINT_STATE).read_text())["cost"]
    assert saved["tokens_processed"] == 4 * TOKENS_PER_ITERATION and saved["forward_calls"] == 8
    assert saved["segments"] == 1 and saved["devices"] == ["cpu"]
    resumed = _train(setup, work_dir=tmp_path)
    _same(resumed, whole)
    cost = resumed.cost
    assert cost["tokens_processed"] == whole.cost["tokens_processed"] == 1536
    assert cost["forward_calls"] == whole.cost["forward_calls"] == 24
    assert cost["segments"] == 2 and cost["devices"] == ["cpu", "cpu"] and cost["resumed_at_iteration"] == 4
    # wall time adds up: the first segment's (to its checkpoint) is part of the total
    assert cost["earlier_wall_time_s"] == saved["wall_time_s"] and cost["wall_time_s"] >= saved["wall_time_s"]


def test_a_resumed_train_mask_job_records_the_whole_cost_in_its_sidecar(tiny_model_dir, tmp_path, monkeypatch):
    """The same through ``memctl train-mask``: the first job is interrupted after 6 of 12 iterations
    (checkpoint at 4), the rerun resumes; its delta's sidecar records 12 iterations' tokens, as the
    uninterrupted job's does, and a wall time that includes the first job's."""
    import numpy as np
    import pandas as pd
    from safetensors.torch import save_file

    from memctl.cli import main
    from memctl.masks import training
    from memctl.store import read_sidecar

    gen = np.random.default_rng(0)
    save_file({"windows": torch.from_numpy(gen.integers(1, 250, size=(16, 24)))}, str(tmp_path / "cal.safetensors"))
    pd.DataFrame({"candidate_id": [f"m{i}" for i in range(6)], "prefix_ids": list(gen.integers(1, 250, size=(6, 8))),
                  "suffix_ids": list(gen.integers(1, 250, size=(6, 8)))}).to_parquet(tmp_path / "mem.parquet")
    from memctl.masks.settings import resolve_mask_job

    # the job as the planner writes it (memctl train-mask reads a resolved job back, fills nothing)
    settings = resolve_mask_job({**SETTINGS, "keep_checkpoint": False}).to_dict()

    def run(out):
        main(["train-mask", "--model", str(tiny_model_dir), "--threads", "1",
              "--model-settings", json.dumps({"source": "local", "dtype": "float32", "device": "cpu"}),
              "--calibration", str(tmp_path / "cal.safetensors"), "--memorized", str(tmp_path / "mem.parquet"),
              "--settings", json.dumps(settings), "--label", "Ours (down)", "--out", str(out / "delta.safetensors"),
              "--log", str(out / "train_log.parquet")])
        return read_sidecar(out / "delta.safetensors")

    whole = run(tmp_path / "whole")
    real = training.train_mask
    monkeypatch.setattr(training, "train_mask", lambda *a, **k: real(*a, **k, stop_after=6))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "job")
    first = json.loads((tmp_path / "job" / CHECKPOINT / CHECKPOINT_STATE).read_text())["cost"]
    monkeypatch.setattr(training, "train_mask", real)
    resumed = run(tmp_path / "job")
    # 12 iterations x (4 windows x 24 tokens + 4 sequences x (8 + 8) tokens) = 12 x 160
    assert whole["cost"]["tokens_processed"] == resumed["cost"]["tokens_processed"] == 12 * (4 * 24 + 4 * 16) == 1920
    assert first["tokens_processed"] == 4 * 160
    assert resumed["cost"]["forward_calls"] == whole["cost"]["forward_calls"] == 24
    assert resumed["cost"]["segments"] == 2 and resumed["cost"]["resumed_at_iteration"] == 4
    assert resumed["wall_time_s"] >= first["wall_time_s"]
    assert not (tmp_path / "job" / CHECKPOINT).exists()


def test_a_low_rank_run_resumes_exactly(setup, tmp_path):
    settings = {"logit_rank": 2, "mode": "up"}
    _interrupted(setup, tmp_path, stop_after=9, settings=settings)
    resumed = _train(setup, settings, work_dir=tmp_path)
    assert not (tmp_path / CHECKPOINT).exists()  # removed after success (keep_checkpoint false)
    _same(resumed, _train(setup, settings))


def _truncate(ckpt):
    path = ckpt / CHECKPOINT_TENSORS
    path.write_bytes(path.read_bytes()[:100])


def _flip_a_byte(ckpt):  # a tensor changed behind the checksum's back
    path = ckpt / CHECKPOINT_TENSORS
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _garbage_json(ckpt):
    (ckpt / CHECKPOINT_STATE).write_text("{not json")


def _missing_json(ckpt):
    (ckpt / CHECKPOINT_STATE).unlink()


def _edit_json(**changes):
    def edit(ckpt):
        state = json.loads((ckpt / CHECKPOINT_STATE).read_text())
        state.update(changes)
        (ckpt / CHECKPOINT_STATE).write_text(json.dumps(state))
    return edit


def _bad_group(ckpt):
    state = json.loads((ckpt / CHECKPOINT_STATE).read_text())
    state["optimizer_param_groups"][0]["betas"] = "rm -rf /"
    (ckpt / CHECKPOINT_STATE).write_text(json.dumps(state))


def _a_file(ckpt):
    import shutil

    shutil.rmtree(ckpt)
    ckpt.write_text("not a directory")


CORRUPTIONS = {
    "truncated tensors": _truncate,
    "tensor changed": _flip_a_byte,
    "garbage json": _garbage_json,
    "missing json": _missing_json,
    "other format": _edit_json(format="memctl-mask-checkpoint/1"),
    "iteration past the end": _edit_json(iteration=10**6),
    "bad log": _edit_json(log=[{"iteration": "x", "evil": 1}]),
    "bad optimizer group": _bad_group,
    "bad cost": _edit_json(cost={"tokens_processed": -1}),
    "no cost (format /2)": _edit_json(format="memctl-mask-checkpoint/2", cost=None),
    "format /3 (settings hashed the old way)": _edit_json(format="memctl-mask-checkpoint/3"),
    "a file": _a_file,
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
def test_a_corrupted_checkpoint_is_ignored_with_a_warning(setup, whole, tmp_path, caplog, corrupt):
    corrupt(_interrupted(setup, tmp_path))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = _train(setup, work_dir=tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ignoring checkpoint" in m and "from scratch" in m for m in warnings), warnings
    assert not any("resuming" in r.getMessage() for r in caplog.records)
    _same(result, whole)
    assert not (tmp_path / CHECKPOINT).exists()


def test_a_checkpoint_of_other_settings_is_ignored(setup, tmp_path, caplog):
    _interrupted(setup, tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        other = _train(setup, {"seed": 1}, work_dir=tmp_path)
    assert any("other settings" in r.getMessage() for r in caplog.records)
    _same(other, _train(setup, {"seed": 1}))


def test_a_failed_checkpoint_write_leaves_the_previous_one_whole(setup, whole, tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = []

    def failing(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:  # the checkpoint at iteration 8 dies half-written
            pathlib.Path(filename).write_bytes(b"half")
            raise OSError("disk full")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        _train(setup, work_dir=tmp_path)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert [p.name for p in tmp_path.iterdir() if CHECKPOINT in p.name] == [CHECKPOINT]  # no temporary left
    assert json.loads((tmp_path / CHECKPOINT / CHECKPOINT_STATE).read_text())["iteration"] == 4
    _same(_train(setup, work_dir=tmp_path), whole)
