"""Two users, two working directories, one between-workflow cache (SNAKEMAKE_OUTPUT_CACHE): the
second run takes the demo model and the extraction from the cache instead of recomputing them,
with their provenance sidecars; a changed setting makes a new cache entry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from memctl.plan import EXTRACT_TABLES
from memctl.store import verify

REPO = Path(__file__).resolve().parents[1]
TINY = Path(__file__).with_name("tiny_config.yaml")


def run(workdir: Path, cache: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--cores", "2", *args, "--cache"]  # --cache last: it takes rule names as its own arguments
    env = dict(os.environ, SNAKEMAKE_OUTPUT_CACHE=str(cache),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:
        pytest.fail(f"snakemake failed:\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def user_dir(path: Path, extract: dict | None = None) -> Path:
    (path / "config").mkdir(parents=True)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["extract"].update(extract or {})
    (path / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return path


def ran(workdir: Path) -> set[str]:
    """Rules whose command ran in this working directory (each writes its output to a log; a job restored from
    the cache runs no command: its log, if Snakemake creates one, stays empty)."""
    return {p.parent.name for p in workdir.glob("results/logs/*/*.log") if p.stat().st_size > 0}


@pytest.mark.slow
def test_second_user_reuses_cached_model_and_extraction(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    alice, bob = user_dir(tmp_path / "alice"), user_dir(tmp_path / "bob")
    run(alice, cache, "extract")
    assert {"demo_pretrain", "extract"} <= ran(alice)
    entries = set(os.listdir(cache))
    assert entries  # model directory, sidecars and the extraction tables

    second = run(bob, cache, "extract")
    assert "from cache" in second
    assert "demo_pretrain" not in ran(bob) and "extract" not in ran(bob), second
    (a_dir,) = alice.glob("results/demo-*/extract-*")
    b_dir = bob / a_dir.relative_to(alice)
    for table in ("memorized", "memorized_test", "extraction"):
        pd.testing.assert_frame_equal(pd.read_parquet(a_dir / f"{table}.parquet"), pd.read_parquet(b_dir / f"{table}.parquet"))
        assert verify(b_dir / f"{table}.parquet") == []  # restored with its sidecar
    assert set(os.listdir(cache)) == entries  # nothing new stored

    # a changed extraction setting: a new entry for the extraction, the model still reused
    carol = user_dir(tmp_path / "carol", extract={"memorized_threshold": 0.9})
    run(carol, cache, "extract")
    assert "extract" in ran(carol) and "demo_pretrain" not in ran(carol)
    assert len(set(os.listdir(cache)) - entries) == 2 * len(EXTRACT_TABLES)  # the tables + their sidecars
