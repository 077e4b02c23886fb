"""Bad input fails at the first place that can tell, with a message naming the key or the file
(and row and column), and nothing is written: configs, data files, settings handed to commands,
a GPU asked for but absent, store paths with spaces and shell characters.

Corrupt artifacts and killed jobs are tests/test_integrity.py's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from memctl import lab
from memctl.cli import main
from memctl.config import ConfigError, check_model_fit, validate_config, validate_section
from memctl.data import DataError, build_candidates, heldout_texts
from memctl.plan import build_plan
from memctl.store import sidecar_path

TINY = Path(__file__).with_name("tiny_config.yaml")  # demo model: vocab 400, context 96
GPT2_EOS = 50256  # a GPT-2 id: past every tiny vocabulary, fits in uint16
P, S = 4, 3


def tiny_raw() -> dict:
    return yaml.safe_load(TINY.read_text())


def plan_of(raw: dict):
    cfg = validate_config(raw)
    return build_plan(cfg, lab.workflow_model_dims(cfg), python_version="3.11")


def write_npy(path: Path, arr) -> Path:
    np.save(path, np.asarray(arr))
    return path


def cli_error(capsys, *argv) -> str:
    """Run ``memctl argv`` in this process: it must exit 2 with one ``memctl <cmd>: error:`` line."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    line = next(x for x in err.splitlines() if x.startswith(f"memctl {argv[0]}: error:"))
    return line + "\n" + err[err.index(line) + len(line):]


# ------------------------------------------------------------------------------------- configs


def _npy_gpt2(tmp: Path) -> Path:
    return write_npy(tmp / "bench.npy", np.full((3, 12), GPT2_EOS, dtype=np.uint16))


def _npy_negative(tmp: Path) -> Path:
    arr = np.ones((3, 12), dtype=np.int64)
    arr[2, 5] = -7
    return write_npy(tmp / "neg.npy", arr)


CONFIG_CASES = {
    # schema: keys, types, values
    "misspelt key": (lambda c, t: c["extract"].update(prefx_len=3),
                     r"extract: Additional properties are not allowed \('prefx_len'"),
    "negative batch": (lambda c, t: c["extract"].update(batch_size=-1),
                       r"extract.batch_size: -1 is less than the minimum of 1"),
    "gpu not a boolean": (lambda c, t: c["resources"].update(gpu="yes"), r"resources.gpu: 'yes' is not of type 'boolean'"),
    "fallback not a boolean": (lambda c, t: c["resources"].update(allow_cpu_fallback=1),
                               r"resources.allow_cpu_fallback: 1 is not of type 'boolean'"),
    "unknown preset": (lambda c, t: c["extract"].update(preset="10/10"), r"extract.preset: '10/10' is not one of"),
    # the model's dimensions
    "preset past the context": (lambda c, t: c["extract"].update(preset="64/48"),
                                r"extract: prefix_len \+ suffix_len = 64 \+ 48 = 112 tokens \(preset '64/48'\) exceed "
                                r"the model's context length of 96 \(demo.architecture.context_length\)"),
    "lengths past the context": (lambda c, t: c["extract"].update(prefix_len=90, suffix_len=10),
                                 r"= 100 tokens \(prefix_len / suffix_len\) exceed the model's context length of 96"),
    "held-out windows past the context": (lambda c, t: c["heldout"].update(context_length=200),
                                          r"heldout.context_length: 200 exceeds the model's context length of 96"),
    "npy ids past the vocabulary": (
        lambda c, t: c.update(candidates={"source": "npy", "path": str(_npy_gpt2(t))}),
        r"candidates.path: .*bench.npy row 0 column 0: token id 50256 is outside the model's vocabulary of 400 ids "
        r"\(0..399; 3 of 3 rows.*set candidates.source_tokenizer"),
    "negative npy ids": (lambda c, t: c.update(candidates={"source": "npy", "path": str(_npy_negative(t))}),
                         r"neg.npy row 2 column 5: token id -7 is outside the model's vocabulary of 400 ids"),
    # declared source against the file
    "jsonl source, parquet path": (lambda c, t: c.update(candidates={"source": "jsonl", "path": "data/c.parquet"}),
                                   r"candidates.source: 'jsonl', but candidates.path data/c.parquet is named like a "
                                   r"parquet file; set candidates.source: parquet"),
    "text source, npy path": (lambda c, t: c.update(heldout={"source": "text", "path": "wiki.npy"}),
                              r"heldout.source: 'text', but heldout.path wiki.npy is named like a npy file"),
    "file source without a path": (lambda c, t: c.update(calibration={"source": "parquet"}),
                                   r"calibration.path: required when calibration.source is 'parquet'"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_is_refused_at_validation_naming_the_key(case, tmp_path):
    mutate, expected = CONFIG_CASES[case]
    raw = tiny_raw()
    mutate(raw, tmp_path)
    with pytest.raises(ConfigError, match=expected):
        validate_config(raw)


PLAN_CASES = {
    "tag ..": (lambda c: c["model"].update(tag=".."), r"model.tag: '\.\.' is not a path-safe name"),
    "root with ..": (lambda c: c.update(root="results/../elsewhere"), r"root: .* contains '\.\.'"),
    "results_dir with ..": (lambda c: c.update(results_dir="../tables"), r"results_dir: .* contains '\.\.'"),
    "root with a newline": (lambda c: c.update(root="a\nb"), r"root: .* control character"),
}


@pytest.mark.parametrize("case", PLAN_CASES)
def test_bad_store_names_are_refused_when_planning(case):
    mutate, expected = PLAN_CASES[case]
    raw = tiny_raw()
    mutate(raw)
    with pytest.raises(ConfigError, match=expected):
        plan_of(raw)


def _local_raw(model_dir: Path, data: Path, **extract) -> dict:
    """A config for the tiny local model (vocab ~300, context 64) and local data files."""
    data.mkdir(parents=True, exist_ok=True)
    (data / "c.jsonl").write_text(json.dumps({"tokens": list(range(1, 80))}) + "\n")
    (data / "wiki.txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    (data / "c4.txt").write_text("A stitch in time saves nine, and a rolling stone gathers no moss. " * 40)
    return {
        "root": str(data / "results"), "results_dir": str(data / "results" / "tables"),
        "model": {"source": "local", "name_or_path": str(model_dir)},
        "candidates": {"source": "jsonl", "path": str(data / "c.jsonl")},
        "extract": {"preset": "32/32", **extract},
        "heldout": {"source": "text", "path": str(data / "wiki.txt"), "max_windows": 4},
        "calibration": {"source": "text", "path": str(data / "c4.txt"), "max_windows": 4},
    }


def test_a_local_models_context_is_checked_when_planning(tiny_model_dir, tmp_path):
    """A local model's dimensions come from its directory: the plan refuses a window past them."""
    raw = _local_raw(tiny_model_dir, tmp_path / "data", preset="50/50")
    cfg = validate_config(raw)  # the model's context is not in the config ...
    with pytest.raises(ConfigError, match=r"= 100 tokens \(preset '50/50'\) exceed the model's context length of 64 "
                                          rf"\(model.name_or_path {re.escape(str(tiny_model_dir))}\)"):
        build_plan(cfg, lab.workflow_model_dims(cfg))  # ... but in its directory
    check_model_fit(cfg, None)  # a hub model not in the cache: the candidates stage checks


def test_a_pipe_in_a_label_keeps_the_table_columns():
    """Edit labels are free text: a '|' neither breaks the plan nor shifts a markdown table's columns."""
    from memctl.report import markdown_table, split_row

    raw = tiny_raw()
    raw["curvature"]["edits"][0]["label"] = "K-FAC | strong"
    plan = plan_of(raw)
    assert "K-FAC | strong" in {e.label for e in plan.edits.values()}
    job = next(j for j in plan.jobs() if j.label == "K-FAC | strong")
    assert shlex.split(job.arg_string) == list(job.args)
    table = markdown_table(pd.DataFrame({"method": ["K-FAC | strong"], "x": [0.5]}),
                           [("method", "Method", "{}"), ("x", "X", "{:.3f}")])
    header, _, row = table.splitlines()
    assert split_row(row) == ["K-FAC | strong", "0.500"] and len(split_row(header)) == 2


# ------------------------------------------------------------------------------------ the GPU


def test_gpu_config_makes_jobs_require_a_gpu_unless_cpu_is_allowed():
    def model_settings(plan):
        jobs = [j for j in plan.jobs() if "--model-settings" in j.args]
        return {json.loads(j.args[j.args.index("--model-settings") + 1])["device"] for j in jobs}

    raw = tiny_raw()
    assert model_settings(plan_of(raw)) == {"auto"}
    raw["resources"]["gpu"] = True
    gpu = plan_of(raw)
    assert model_settings(gpu) == {"cuda"}
    raw["resources"]["allow_cpu_fallback"] = True
    fallback = plan_of(raw)
    assert model_settings(fallback) == {"auto"}
    # where artifacts go does not depend on the fallback (only on the GPU, as before)
    assert gpu.job("extract").outputs == fallback.job("extract").outputs
    raw["resources"]["allow_cpu_fallback"] = False
    raw["model"]["device"] = "cpu"  # an explicit device is kept
    assert model_settings(plan_of(raw)) == {"cpu"}


def test_a_job_that_needs_a_gpu_fails_without_one(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import torch

    from memctl.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"  # auto: the CPU is fine
    cands = tmp_path / "c.parquet"
    pd.DataFrame({"candidate_id": ["a"], "prefix_ids": [[1, 2, 3]], "suffix_ids": [[4, 5]]}).to_parquet(cands)
    err = cli_error(capsys, "extract", "--model", tiny_model_dir, "--model-settings",
                    json.dumps({"source": "local", "device": "cuda"}), "--candidates", cands, "--settings", "{}",
                    "--out-dir", tmp_path / "out")
    assert "model.device: 'cuda', but this job sees no usable CUDA GPU" in err
    assert "resources.allow_cpu_fallback: true" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- data files


def _rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path: Path, **columns) -> Path:
    pd.DataFrame(columns).to_parquet(path)
    return path


def _corrupt_parquet(path: Path) -> Path:
    _parquet(path, tokens=[list(range(10))] * 20)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_npy(path: Path) -> Path:
    write_npy(path, np.ones((100, 10), dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:300])
    return path


def _bench_dir(path: Path) -> Path:
    path.mkdir()
    write_npy(path / "train_prefix.npy", np.ones((4, 6), dtype=np.uint16))
    suffix = np.ones((4, 3), dtype=np.uint16)
    suffix[3, 1] = GPT2_EOS
    write_npy(path / "train_suffix.npy", suffix)
    return path


# name -> (source, make(tmp_path) -> path, extra settings, expected message)
DATA_CASES = {
    "id at the vocabulary size": (
        "jsonl", lambda t: _rows(t / "c.jsonl", [{"tokens": list(range(1, 9))}, {"tokens": [1, 2, 3, 4, 5, 6, 7, 300]}]),
        {}, r"c.jsonl row 1 column 'tokens': token id 300 at position 7 is out of range \(the model's vocabulary has "
            r"300 ids: 0..299\); ids written with another tokenizer"),
    "negative id": (
        "parquet", lambda t: _parquet(t / "c.parquet", prefix=[[1, 2, 3, 4], [5, -1, 6, 7]], suffix=[[1, 2, 3]] * 2),
        {}, r"c.parquet row 1 column 'prefix': token id -1 at position 1 is out of range"),
    "GPT-2 ids in a uint16 npy": (
        "npy", lambda t: write_npy(t / "train.npy", np.full((5, 10), GPT2_EOS, dtype=np.uint16)),
        {}, r"train.npy row 0 column 0: token id 50256 is out of range \(the model's vocabulary has 300 ids: 0..299; "
            r"5 of 5 rows have such ids\); ids written with another tokenizer .* set candidates.source_tokenizer"),
    "GPT-2 id in a benchmark directory": (
        "npy", lambda t: _bench_dir(t / "bench"), {}, r"train_suffix.npy row 3 column 1: token id 50256 is out of range"),
    "NaN inside an id list": (
        "parquet", lambda t: _parquet(t / "c.parquet", tokens=[[1.0, 2, 3, 4, 5, 6, 7], [1, 2, float("nan"), 4, 5, 6, 7]]),
        {}, r"c.parquet row 1 column 'tokens': position 2 is a missing value \(NaN / None / null\), not a token id"),
    "null inside an id list": (
        "jsonl", lambda t: _rows(t / "c.jsonl", [{"tokens": [1, 2, None, 4, 5, 6, 7]}]),
        {}, r"c.jsonl row 0 column 'tokens': position 2 is a missing value"),
    "float inside an id list": (
        "jsonl", lambda t: _rows(t / "c.jsonl", [{"prefix": [1, 2, 3, 4], "suffix": [5, 6.5, 7]}]),
        {}, r"c.jsonl row 0 column 'suffix': position 1 is the float 6.5, not a token id"),
    "string inside an id list": (
        "jsonl", lambda t: _rows(t / "c.jsonl", [{"tokens": [1, 2, "3", 4, 5, 6, 7]}]),
        {}, r"row 0 column 'tokens': position 2 is '3' \(a str\), not a token id"),
    "missing cell": (
        "jsonl", lambda t: _rows(t / "c.jsonl", [{"prefix": "The quick", "suffix": "brown fox jumps"}, {"prefix": None,
                                                                                                    "suffix": "x"}]),
        {}, r"c.jsonl row 1 column 'prefix': missing value"),
    "jsonl source on a parquet file": (
        "jsonl", lambda t: _parquet(t / "c.jsonl", tokens=[[1, 2, 3]]),
        {}, r"candidates.source is 'jsonl', but candidates.path .*c.jsonl is a parquet file; set candidates.source: "
            r"parquet"),
    "parquet source on a jsonl file": (
        "parquet", lambda t: _rows(t / "c.parquet", [{"tokens": [1, 2, 3]}]),
        {}, r"candidates.source is 'parquet', but candidates.path .*c.parquet is JSON lines; set candidates.source: "
            r"jsonl"),
    "npy source on a text file": (
        "npy", lambda t: (t / "c.npy").write_text("1 2 3\n") and t / "c.npy",
        {}, r"candidates.source is 'npy', but candidates.path .*c.npy is a text file"),
    "garbage parquet": (
        "parquet", lambda t: (t / "c.parquet").write_bytes(bytes(range(256)) * 4) and t / "c.parquet",
        {}, r"candidates.source is 'parquet', but candidates.path .*c.parquet is a binary file"),
    "truncated parquet": (
        "parquet", lambda t: _corrupt_parquet(t / "c.parquet"),
        {}, r"c.parquet: not a readable parquet file \(ArrowInvalid: "),
    "truncated npy": ("npy", lambda t: _truncated_npy(t / "c.npy"), {}, r"c.npy: not a readable .npy array"),
    "invalid JSON lines": (
        "jsonl", lambda t: (t / "c.jsonl").write_text('{"tokens": [1, 2, 3]}\n{"tokens": [1, 2\n') and t / "c.jsonl",
        {}, r"c.jsonl: not valid JSON lines"),
    "a JSON array, not lines": (
        "jsonl", lambda t: (t / "c.jsonl").write_text('[{"tokens": [1, 2, 3]}]') and t / "c.jsonl",
        {}, r"c.jsonl is a JSON array \(not JSON lines: one object per line\)"),
    "empty file": ("jsonl", lambda t: (t / "c.jsonl").write_text("") or t / "c.jsonl", {}, r"c.jsonl is an empty file"),
    "missing hf dataset": (
        "hf", lambda t: None, {"hf_name": "no-such-user/no-such-dataset"},
        r"candidates.hf_name: cannot load dataset 'no-such-user/no-such-dataset' \(config None, split 'train'\)"),
    "unloadable source tokenizer": (
        "jsonl", lambda t: _rows(t / "c.jsonl", [{"tokens": list(range(1, 9))}]), {"source_tokenizer": "/no/such/tok"},
        r"candidates.source_tokenizer: cannot load '/no/such/tok'"),
    "every row too short": (
        "jsonl", lambda t: _rows(t / "c.jsonl", [{"tokens": [1, 2]}] * 3),
        {}, r"c.jsonl: all 3 rows dropped \(3 shorter than 4 \+ 3 = 7 tokens\)"),
    "no id column values": (
        "parquet", lambda t: _parquet(t / "c.parquet", x=[1]), {}, r"c.parquet: need prefix/suffix columns"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_candidate_data_fails_naming_the_file(case, tmp_path, tiny_tokenizer):
    source, make, extra, expected = DATA_CASES[case]
    path = make(tmp_path)
    settings = {"source": source, "path": None if path is None else str(path), "seed": 0, **extra}
    with pytest.raises(DataError, match=expected):
        build_candidates(settings, tiny_tokenizer, P, S, vocab_size=len(tiny_tokenizer))


TEXT_CASES = {
    "text source on a parquet file": (
        {"source": "text"}, lambda t: _parquet(t / "wiki.txt", text=["a"]),
        r"heldout.source is 'text', but heldout.path .*wiki.txt is a parquet file"),
    "jsonl source on a text file": (
        {"source": "jsonl"}, lambda t: (t / "w.jsonl").write_text("plain text\n") and t / "w.jsonl",
        r"heldout.source is 'jsonl', but heldout.path .*w.jsonl is a text file"),
    "null text": ({"source": "jsonl"}, lambda t: _rows(t / "w.jsonl", [{"text": "a"}, {"text": None}]),
                  r"w.jsonl row 1 column 'text': a missing value \(null / NaN\), not text"),
    "number as text": ({"source": "parquet"}, lambda t: _parquet(t / "w.parquet", text=[1.5]),
                       r"w.parquet row 0 column 'text': float '1.5', not text"),
    "missing text file": ({"source": "text"}, lambda t: t / "nope.txt", r"heldout.path: text file not found"),
    "not UTF-8": ({"source": "text"}, lambda t: (t / "w.txt").write_bytes(b"caf\xe9 " * 10) and t / "w.txt",
                  r"w.txt is a binary file"),
}


@pytest.mark.parametrize("case", TEXT_CASES)
def test_bad_text_data_fails_naming_the_file(case, tmp_path):
    settings, make, expected = TEXT_CASES[case]
    with pytest.raises(DataError, match=expected):
        heldout_texts({**settings, "path": str(make(tmp_path))})


def test_dropped_rows_are_counted_warned_and_recorded(tmp_path, tiny_model_dir, caplog, capsys):
    """4 of 5 rows too short: a warning, the counts by reason in the stats and the sidecar."""
    long = list(range(1, 41))
    path = _rows(tmp_path / "c.jsonl", [{"prefix": long, "suffix": long}, {"prefix": [1, 2, 3], "suffix": long},
                                        {"prefix": long, "suffix": [1]}, {"prefix": long[:10], "suffix": long[:10]},
                                        {"prefix": "fox", "suffix": " jumps"}])
    out = tmp_path / "cands.parquet"
    with caplog.at_level(logging.WARNING, logger="memctl"):
        main(["candidates", "--model", str(tiny_model_dir), "--model-settings", '{"source": "local"}',
              "--settings", json.dumps({"source": "jsonl", "path": str(path)}),
              "--extract-settings", '{"preset": "32/32"}', "--out", str(out)])
    warning = [r for r in caplog.records if r.levelno == logging.WARNING and "dropped" in r.getMessage()]
    assert len(warning) == 1 and "dropped 4 of 5 rows" in warning[0].getMessage()
    meta = json.loads(sidecar_path(out).read_text())
    dropped = {"prefix_too_short": 3, "suffix_too_short": 1, "sequence_too_short": 0}
    assert meta["dropped"] == dropped and meta["stats"]["dropped"] == dropped
    assert meta["stats"]["rows"] == 5 and meta["stats"]["kept"] == 1
    assert len(pd.read_parquet(out)) == 1


def test_a_candidate_table_with_a_bad_id_is_never_written(tmp_path, tiny_model_dir, capsys):
    path = _rows(tmp_path / "c.jsonl", [{"tokens": list(range(1, 70))}, {"tokens": [GPT2_EOS] * 70}])
    out = tmp_path / "cands.parquet"
    err = cli_error(capsys, "candidates", "--model", tiny_model_dir, "--model-settings", '{"source": "local"}',
                    "--settings", json.dumps({"source": "jsonl", "path": str(path)}),
                    "--extract-settings", '{"preset": "32/32"}', "--out", out)
    assert f"{path} row 1 column 'tokens': token id 50256 at position 0 is out of range" in err
    assert not out.exists() and not sidecar_path(out).exists()
    # a window past the model's context (64), given by hand, fails before any data is read
    err = cli_error(capsys, "candidates", "--model", tiny_model_dir, "--model-settings", '{"source": "local"}',
                    "--settings", json.dumps({"source": "jsonl", "path": str(path)}),
                    "--extract-settings", '{"preset": "50/50"}', "--out", out)
    assert "extract: prefix_len + suffix_len = 50 + 50 = 100 tokens exceed the context length" in err
    assert not out.exists()


@pytest.mark.parametrize("table, expected", [
    ({"candidate_id": ["a", "b"], "prefix_ids": [[1, 2], [3, 4]], "suffix_ids": [[5, 6], [7, 5000]]},
     r"row 1 \(candidate b\) column 'suffix_ids': token id 5000 at position 1 is out of range"),
    ({"candidate_id": ["a"], "prefix_ids": [list(range(1, 41))], "suffix_ids": [list(range(1, 41))]},
     r"row 0 \(candidate a\): 40 prefix \+ 40 suffix = 80 tokens exceed the model's context length of 64"),
    ({"candidate_id": ["a"], "prefix_ids": [[1.0, float("nan")]], "suffix_ids": [[1, 2]]},
     r"column 'prefix_ids': position 1 is a missing value"),
    ({"candidate_id": ["a"], "tokens": [[1, 2]]}, r"not a candidate table: no prefix_ids / suffix_ids column"),
    (None, r"not a readable candidate table"),
])
def test_extract_rechecks_the_table_it_is_handed(table, expected, tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "cands.parquet"
    if table is None:
        path.write_bytes(b"PAR1" + bytes(range(200)))
    else:
        pd.DataFrame(table).to_parquet(path)
    err = cli_error(capsys, "extract", "--model", tiny_model_dir, "--model-settings", '{"source": "local"}',
                    "--candidates", path, "--settings", '{"preset": "32/32"}', "--out-dir", tmp_path / "out")
    assert path.name in err
    assert re.search(expected, err), err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ settings of commands


def _commands(tmp: Path, model: Path):
    m = ["--model", str(model), "--model-settings", '{"source": "local"}']
    f = str(tmp / "in")
    return {
        "candidates": (["candidates", *m, "--settings", '{"source": "npy"}', "--extract-settings", "{}", "--out", f],
                       "candidates.path: required when candidates.source is 'npy'"),
        "candidates lengths": (["candidates", *m, "--settings", "{}", "--extract-settings", '{"preset": null}',
                                "--out", f], "extract: set either preset or both prefix_len and suffix_len"),
        "extract": (["extract", *m, "--candidates", f, "--settings", '{"memorized_threshold": 2}', "--out-dir", f],
                    "extract.memorized_threshold: 2 is greater than the maximum of 1"),
        "heldout": (["heldout", *m, "--settings", '{"source": "text", "max_windows": 0}', "--out", f],
                    "heldout.max_windows: 0 is less than the minimum of 1"),
        "calibration": (["calibration", *m, "--settings", '{"source": "wiki"}', "--out", f],
                        "calibration.source: 'wiki' is not one of"),
        "reference-topk": (["reference-topk", *m, "--heldout", f, "--settings", '{"ndcg_windows": "all"}', "--out", f],
                           "evaluate.ndcg_windows: 'all' is not of type 'integer'"),
        "evaluate": (["evaluate", *m, "--memorized", f, "--heldout", f, "--settings", '{"loose": 0.5}', "--out-dir", f],
                     "evaluate: Additional properties are not allowed ('loose' was unexpected); allowed keys:"),
        "model settings": (["extract", "--model", str(model), "--model-settings", '{"dtype": "fp8"}',
                            "--candidates", f, "--settings", "{}", "--out-dir", f], "model.dtype: 'fp8' is not one of"),
        "kfac-collect data": (["kfac-collect", *m, "--windows", f, "--settings", '{"data": {"batch_size": 0}}',
                               "--out-dir", f], "curvature.data.batch_size: 0 is less than the minimum of 1"),
        "kfac-collect modules": (["kfac-collect", *m, "--windows", f, "--settings", '{"modules": {"groups": ["mlpp"]}}',
                                  "--out-dir", f], "curvature.modules.groups.0: 'mlpp' is not one of"),
        "kfac-collect keys": (["kfac-collect", *m, "--windows", f, "--settings", '{"data": {}, "max_tokens": 5}',
                               "--out-dir", f], "kfac-collect --settings: unexpected keys ['max_tokens']"),
        "kfac-spectrum": (["kfac-spectrum", *m, "--eigen", f, "--memorized", f, "--nonmemorized", f,
                           "--settings", '{"positions": "some"}', "--out", f], "curvature.spectrum.positions: 'some'"),
        "curvature-report": (["curvature-report", "--metrics", f, "--settings", '{"max_ppl_ratio": 0.5}',
                              "--out-dir", f], "curvature.report.max_ppl_ratio: 0.5 is less than or equal to"),
    }


COMMANDS = list(_commands(Path("x"), Path("m")))


@pytest.mark.parametrize("case", COMMANDS)
def test_every_command_rechecks_its_settings(case, tmp_path, tiny_model_dir, capsys):
    argv, expected = _commands(tmp_path, tiny_model_dir)[case]
    err = cli_error(capsys, *argv)
    assert expected in err
    assert not (tmp_path / "in").exists()


def test_validate_section_fills_defaults_and_names_the_key():
    assert validate_section("curvature.data", {"max_tokens": 10})["batch_size"] == 8
    assert validate_section("extract", {})["preset"] == "32/32"
    with pytest.raises(ConfigError, match=r"invalid curvature.modules settings:\n  curvature.modules.layers: \[\] "):
        validate_section("curvature.modules", {"layers": []})
    with pytest.raises(ConfigError, match="no config section 'curvature.nope'"):
        validate_section("curvature.nope", {})
    with pytest.raises(ConfigError, match="extract: settings must be a JSON object"):
        validate_section("extract", [1])


# ------------------------------------------------------------------------------------ paths


WEIRD = "a store; with $(touch PWNED) `touch PWNED` & 'quotes' \"dq\" *"


def test_a_root_with_spaces_and_shell_characters_survives_the_shell(tmp_path, tiny_model_dir):
    """Every argument of every job is quoted: the shell gives the command back word for word, and
    one stage command run through the shell writes where the plan says."""
    base = tmp_path / WEIRD
    raw = _local_raw(tiny_model_dir, base)
    plan = plan_of(raw)
    for job in plan.jobs():
        assert shlex.split(job.arg_string) == list(job.args), job.stage
        assert shlex.split(job.command(2))[-len(job.args):] == list(job.args), job.stage
    job = plan.job("heldout")
    out = Path(job.outputs["windows"])
    assert out.is_relative_to(base)
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["bash", "-c", job.command()], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.exists() and sidecar_path(out).exists()
    assert not list(tmp_path.glob("PWNED")) and not list(base.glob("PWNED"))


def test_text_stages_and_scorers_check_windows_against_the_model(tmp_path, tiny_model_dir, capsys):
    """Held-out / calibration windows longer than the model's context are refused where they are
    cut; windows a scorer is handed must fit the model too."""
    import torch
    from safetensors.torch import save_file

    text = tmp_path / "wiki.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 80)
    err = cli_error(capsys, "calibration", "--model", tiny_model_dir, "--model-settings", '{"source": "local"}',
                    "--settings", json.dumps({"source": "text", "path": str(text), "context_length": 100}),
                    "--out", tmp_path / "cal.safetensors")
    assert "calibration.context_length: 100 exceeds the context length of the model" in err
    assert not (tmp_path / "cal.safetensors").exists()
    windows = torch.ones(3, 16, dtype=torch.int64)
    windows[2, 7] = 5000
    save_file({"windows": windows}, str(tmp_path / "w.safetensors"))
    err = cli_error(capsys, "reference-topk", "--model", tiny_model_dir, "--model-settings", '{"source": "local"}',
                    "--heldout", tmp_path / "w.safetensors", "--settings", "{}", "--out", tmp_path / "ref.safetensors")
    assert "w.safetensors window 2 position 7: token id 5000 is outside the model's vocabulary" in err
    assert not (tmp_path / "ref.safetensors").exists()
