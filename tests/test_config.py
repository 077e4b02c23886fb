"""The schema rejects bad configs with a message naming the key, before any job runs."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from memctl.config import (
    ConfigError,
    load_config,
    parse_settings,
    prefix_suffix_lengths,
    settings_hash,
    validate_config,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "config" / "config.yaml"


def default_raw():
    return yaml.safe_load(DEFAULT.read_text())


def test_default_config_is_valid_and_filled():
    cfg = load_config(DEFAULT)
    assert cfg["model"]["source"] == "demo"
    assert cfg["model"]["trust_remote_code"] is False
    assert cfg["demo"]["train"]["warmup_steps"] >= 0  # a schema default, not in the yaml
    assert prefix_suffix_lengths(cfg["extract"]) == (32, 32)


def test_workflow_schema_is_the_package_schema():
    workflow_schema = ROOT / "workflow" / "schemas" / "config.schema.yaml"
    package_schema = ROOT / "src" / "memctl" / "schemas" / "config.schema.yaml"
    assert workflow_schema.read_text() == package_schema.read_text()


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c["extract"].update(prefx_len=3), "extract: Additional properties are not allowed ('prefx_len'"),
        (lambda c: c["extract"].update(batch_size="big"), "extract.batch_size: 'big' is not of type 'integer'"),
        (lambda c: c["extract"].update(preset="10/10"), "extract.preset: '10/10' is not one of"),
        (lambda c: c["demo"]["canaries"].update(copies=[0, 2]), "demo.canaries.copies.0: 0 is less than the minimum of 1"),
        (lambda c: c["model"].update(dtype="fp8"), "model.dtype: 'fp8' is not one of"),
        (lambda c: c.update(modle={}), "<top level>: Additional properties are not allowed ('modle'"),
        (lambda c: c["model"].update(source="hub"), "model.name_or_path: required when model.source is not 'demo'"),
        (lambda c: c["candidates"].update(source="npy"), "candidates.path: required when candidates.source is 'npy'"),
    ],
)
def test_bad_values_are_named(mutate, expected):
    cfg = default_raw()
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert expected in str(err.value)


def test_unknown_key_lists_allowed_keys():
    cfg = default_raw()
    cfg["evaluate"]["batchsize"] = 4
    with pytest.raises(ConfigError, match=r"allowed keys: batch_size, heldout_batch_size, loose_threshold"):
        validate_config(cfg)


def test_explicit_lengths_override_preset():
    assert prefix_suffix_lengths({"preset": "32/32", "prefix_len": 50, "suffix_len": 50}) == (50, 50)
    assert prefix_suffix_lengths({"preset": "64/48"}) == (64, 48)


def test_settings_hash_is_stable_and_order_free():
    assert settings_hash({"a": 1, "b": [1, 2]}) == settings_hash({"b": [1, 2], "a": 1})
    assert settings_hash({"a": 1}) != settings_hash({"a": 2})
    assert len(settings_hash({})) == 10


def test_parse_settings_errors_name_the_problem(tmp_path):
    assert parse_settings('{"a": 1}') == {"a": 1}
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_settings("{a: 1")
    with pytest.raises(ConfigError, match="settings file not found"):
        parse_settings(f"@{tmp_path / 'missing.yaml'}")


def dry_run(cfg: dict, path: Path) -> subprocess.CompletedProcess:
    """`snakemake -n` of the repo's workflow with ``cfg`` written to ``path`` as the config file."""
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.slow  # starts Snakemake (a workflow parse: 5-30 s)
def test_snakemake_refuses_a_bad_config_before_scheduling(tmp_path):
    bad = default_raw()
    bad["extract"]["batch_size"] = -1
    proc = dry_run(bad, tmp_path / "bad.yaml")
    assert proc.returncode != 0
    assert "extract.batch_size: -1 is less than the minimum of 1" in proc.stdout + proc.stderr


@pytest.mark.slow  # starts Snakemake (a workflow parse: 5-30 s)
def test_snakemake_refuses_kfac_second_moments_with_the_sequential_form(tmp_path):
    """Caught when the DAG is built, not by every Wanda / SparseGPT job failing hours later."""
    cfg = default_raw()
    cfg.setdefault("pruning", {}).update(second_moments="kfac", forms=["sequential", "one_pass"])
    proc = dry_run(cfg, tmp_path / "kfac.yaml")
    assert proc.returncode != 0
    assert "pruning.second_moments: 'kfac' works with pruning.forms: [one_pass] only" in proc.stdout + proc.stderr
    cfg["pruning"]["forms"] = ["one_pass"]
    ok = dry_run(cfg, tmp_path / "kfac.yaml")
    assert ok.returncode == 0, ok.stderr[-3000:]
