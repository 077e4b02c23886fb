"""Stage commands fail on bad input with one clear line naming the file or key."""

import subprocess
import sys

import pandas as pd


def memctl(*args):
    return subprocess.run(
        [sys.executable, "-m", "memctl.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_missing_candidates_file_is_named(tmp_path, tiny_model_dir):
    missing = tmp_path / "nope.parquet"
    proc = memctl(
        "candidates", "--model", str(tiny_model_dir), "--settings", f'{{"source": "parquet", "path": "{missing}"}}',
        "--extract-settings", '{"preset": "32/32"}', "--out", str(tmp_path / "c.parquet"),
    )
    assert proc.returncode == 2
    assert f"memctl candidates: error: candidate file not found: {missing}" in proc.stderr
    assert not (tmp_path / "c.parquet").exists()


def test_bad_settings_json_is_reported(tmp_path, tiny_model_dir):
    proc = memctl(
        "extract", "--model", str(tiny_model_dir), "--candidates", str(tmp_path / "c.parquet"),
        "--settings", "{preset: 32/32", "--out-dir", str(tmp_path / "out"),
    )
    assert proc.returncode == 2
    assert "--settings is not valid JSON" in proc.stderr


def test_missing_model_directory_is_named(tmp_path):
    cands = tmp_path / "c.parquet"
    pd.DataFrame({"candidate_id": ["a"], "prefix_ids": [[1, 2]], "suffix_ids": [[3, 4]]}).to_parquet(cands)
    proc = memctl(
        "extract", "--model", str(tmp_path / "no-model"), "--model-settings", '{"source": "local"}',
        "--candidates", str(cands), "--settings", "{}", "--out-dir", str(tmp_path / "out"),
    )
    assert proc.returncode == 2
    assert f"model directory not found: {tmp_path / 'no-model'}" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_validate_config_command(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("model: {dtype: fp8}\n")
    proc = memctl("validate-config", str(bad))
    assert proc.returncode == 2
    assert "model.dtype: 'fp8' is not one of" in proc.stderr
