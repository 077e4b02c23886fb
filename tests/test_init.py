"""`memctl init` on a tiny local model with its own tokenizer: the written config, its reasons,
its validation, and Snakemake planning the whole DAG from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_store import memctl_in_process

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
ENV = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def memctl(*args: str) -> subprocess.CompletedProcess:
    """``memctl ARGS``, run by the dispatcher in this process (exit code, stdout, stderr as a process's)."""
    return memctl_in_process(*args)


@pytest.fixture(scope="module")
def initialized(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("init")
    out = work / "mine.yaml"
    proc = memctl("init", "--model", str(tiny_model_dir), "--memories", str(EXAMPLES / "memories.jsonl"),
                  "--heldout", str(EXAMPLES / "heldout.txt"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return work, out, proc


def test_init_writes_a_valid_commented_config_with_sizes_from_the_data(initialized, tiny_model_dir):
    from memctl.config import load_config
    from memctl.stats import min_n_for_width

    work, out, proc = initialized
    assert f"wrote {out}" in proc.stdout
    text = out.read_text()
    cfg = load_config(str(out))
    assert cfg["model"]["source"] == "local" and Path(cfg["model"]["name_or_path"]) == tiny_model_dir.resolve()
    assert cfg["candidates"]["source"] == "jsonl" and cfg["heldout"]["source"] == "text"
    # 48 rows in 12 (group, copies) strata of 4: the default 1/15 rounds every stratum to 0; 0.4
    # (round(1.6) = 2 per stratum) is the first fraction that reaches half the candidates (24 < 104)
    assert cfg["extract"]["er_test_fraction"] == pytest.approx(0.4)
    assert "24 of 48 candidates in 12 (group, copies) strata" in text
    assert f"narrower than 0.2 from {min_n_for_width()} examples" in text and "the default 1/15 would give 0" in text
    assert cfg["extract"]["preset"] == "32/32" and "32/32 keeps 48 of 48 rows" in text  # the model's context is 64
    assert cfg["extract"]["validation_fraction"] == pytest.approx(0.3)  # 17 needed, 24 memorized at most half
    # a 2-layer model: the first block of 2 (never all of them)
    assert cfg["curvature"]["sweeps"]["strength"]["layers"] == [0]
    assert "the first 1 of 2 MLP blocks" in text
    assert cfg["resources"]["gpu"] is False and cfg["extract"]["batch_size"] == 64
    # a few memories may not move a trained baseline: it shows "did not converge" instead of failing the run
    assert cfg["masks"]["on_unconverged"] == "flag" and cfg["pruning"]["balanced_subnet"]["on_unconverged"] == "flag"
    assert text.count("#") > 20  # every choice has its reason beside it


def test_one_text_for_held_out_and_calibration_is_split_in_two(initialized, tiny_tokenizer):
    """No --calibration: the held-out file is both texts, so the held-out windows are its first half
    and calibration reads the other (the calibration stage drops every window sharing a run with a
    held-out one: tests/test_calibration.py); no edit is fitted on its own held-out text."""
    from memctl.config import load_config

    _, out, _ = initialized
    cfg = load_config(str(out))
    assert cfg["calibration"]["path"] == cfg["heldout"]["path"] == str((EXAMPLES / "heldout.txt").resolve())
    windows = len(tiny_tokenizer((EXAMPLES / "heldout.txt").read_text())["input_ids"]) // 64  # the model's context
    assert windows >= 32  # enough for 16 on each side
    assert cfg["heldout"]["context_length"] is None and cfg["calibration"]["context_length"] is None
    assert cfg["heldout"]["max_windows"] == windows // 2
    assert cfg["calibration"]["max_windows"] == windows - windows // 2
    assert "the calibration stage drops every" in out.read_text()


def test_init_refuses_to_overwrite_and_names_bad_input(initialized, tiny_model_dir, tmp_path):
    work, out, _ = initialized
    before = out.read_text()
    proc = memctl("init", "--model", str(tiny_model_dir), "--memories", str(EXAMPLES / "memories.jsonl"),
                  "--heldout", str(EXAMPLES / "heldout.txt"), "--out", str(out))
    assert proc.returncode == 2 and f"{out} exists" in proc.stderr and out.read_text() == before
    proc = memctl("init", "--model", str(tmp_path / "nowhere"), "--memories", str(EXAMPLES / "memories.jsonl"),
                  "--heldout", str(EXAMPLES / "heldout.txt"), "--out", str(tmp_path / "x.yaml"))
    assert proc.returncode == 2 and "nowhere" in proc.stderr and not (tmp_path / "x.yaml").exists()
    proc = memctl("init", "--model", str(tiny_model_dir), "--memories", str(EXAMPLES / "heldout.txt"),
                  "--heldout", str(EXAMPLES / "heldout.txt"), "--out", str(tmp_path / "x.yaml"))
    assert proc.returncode == 2 and "heldout.txt is text" in proc.stderr and not (tmp_path / "x.yaml").exists()


@pytest.mark.slow  # starts Snakemake (a workflow parse: 5-30 s)
def test_snakemake_plans_the_generated_config(initialized):
    work, out, _ = initialized
    assert memctl("validate-config", str(out)).stdout.strip() == f"{out}: valid"
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work),
                           "--cores", "1", "-n", "all", "--configfile", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    plan = proc.stdout + proc.stderr
    for rule in ("candidates", "extract", "heldout", "calibration", "collect_kfac", "apply_edit", "train_mask",
                 "evaluate", "report"):
        assert f"rule {rule}:" in plan or f"\n{rule} " in plan, rule


def test_npy_memories_take_the_benchmark_window(tiny_model_dir, tmp_path):
    from memctl.init import build_config

    text = build_config(str(tiny_model_dir), str(EXAMPLES / "lm-extraction-benchmark"), str(EXAMPLES / "heldout.txt"))
    cfg = yaml.safe_load(text)
    # the tiny model's 64-token context cannot hold 50/50: 32/32 is the window, the reason says so
    assert cfg["candidates"]["source"] == "npy" and cfg["extract"]["preset"] == "32/32"
    assert "50/50 exceeds the 64-token context" in text
