"""memctl.lab: model sizes from HF configs, per-stage memory estimates, install-profile."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ARCHITECTURES, tiny_architecture_config, tiny_architecture_model

from memctl import lab
from memctl.architectures import linear_targets
from memctl.cli import main

REPO = Path(__file__).resolve().parents[1]

GPT_NEO_125M = {"model_type": "gpt_neo", "hidden_size": 768, "num_layers": 12, "num_heads": 12,
                "intermediate_size": None, "vocab_size": 50257, "max_position_embeddings": 2048}
GPT_NEO_1_3B = {**GPT_NEO_125M, "hidden_size": 2048, "num_layers": 24, "num_heads": 16}
PYTHIA_1_4B = {"model_type": "gpt_neox", "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
               "intermediate_size": 8192, "vocab_size": 50304, "max_position_embeddings": 2048,
               "tie_word_embeddings": False}


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_matrix_shapes_from_the_config_match_the_model(kind):
    """The config-only view agrees with the architecture registry on the real module tree."""
    dims = lab.model_dims(tiny_architecture_config(kind))
    model = tiny_architecture_model(kind)
    targets = linear_targets(model)
    assert sorted((t.layer, t.group, t.role, t.d_in, t.d_out) for t in targets) == sorted(dims.matrices())
    assert dims.gated_weights() == sum(t.d_in * t.d_out for t in targets)
    assert dims.gated_weights(groups=["mlp"], layers=[-1]) == sum(
        t.d_in * t.d_out for t in targets if t.group == "mlp" and t.layer == dims.num_layers - 1
    )
    actual = sum(p.numel() for p in model.parameters())
    if kind in ("gpt_neox", "gpt2"):
        assert dims.num_parameters == actual
    else:  # bias-free projections / extra norms: close, not exact
        assert abs(dims.num_parameters - actual) / actual < 0.05


def test_model_dims_from_a_model_directory(tiny_model_dir):
    dims = lab.model_dims(tiny_model_dir)
    assert (dims.model_type, dims.hidden_size, dims.num_layers, dims.intermediate_size) == ("gpt_neox", 32, 2, 64)
    assert lab.model_dims(tiny_model_dir / "config.json") == dims
    assert lab.model_dims(dims) is dims


def test_demo_dims_match_the_demo_model():
    from memctl.demo.pretrain import model_config

    cfg = yaml.safe_load((REPO / "tests" / "tiny_config.yaml").read_text())
    dims = lab.demo_dims(cfg["demo"])
    hf = model_config(cfg["demo"]["architecture"], cfg["demo"]["tokenizer"]["vocab_size"], 0)
    assert dims == lab.model_dims(hf.to_dict())
    assert lab.workflow_model_dims(cfg) == dims


def test_reference_sizes():
    """Gated weight counts of ../shared/notes/reference-facts.md, and Pythia-1.4B's parameter count."""
    assert round(lab.model_dims(GPT_NEO_125M).gated_weights() / 1e6, 1) == 84.9
    neo = lab.model_dims(GPT_NEO_1_3B)
    assert round(neo.gated_weights() / 1e9, 2) == 1.21
    assert round(neo.num_parameters / 1e9, 2) == 1.32
    assert lab.model_dims(PYTHIA_1_4B).num_parameters == 1_414_647_808
    # mask logits + AdamW state: 16 bytes per gated weight, ~19 GB for GPT-Neo-1.3B
    parts = lab.estimate_memory(GPT_NEO_1_3B, "train_mask", {}).parts
    assert parts["mask logits+adamw"] == 16 * neo.gated_weights()
    assert round(parts["mask logits+adamw"] / 1e9) == 19


def test_kfac_factor_bytes_by_hand():
    dims = lab.ModelDims(vocab_size=10, hidden_size=4, num_layers=3, intermediate_size=8, num_heads=2)
    # one MLP per layer: up (4 -> 8), down (8 -> 4): (16 + 64) * 4 bytes each
    assert lab.kfac_factor_bytes(dims, groups=["mlp"]) == 3 * 2 * (16 + 64) * 4
    assert lab.kfac_factor_bytes(dims, groups=["mlp"], layers=[0]) == 2 * (16 + 64) * 4
    # qkv (4 -> 12) and o (4 -> 4)
    assert lab.kfac_factor_bytes(dims, groups=["attention"], layers=[-1]) == (16 + 144) * 4 + (16 + 16) * 4
    parts = lab.estimate_memory(dims, "collect_kfac", {"curvature": {"modules": {"groups": ["mlp"]}}}).parts
    assert parts["kfac factors"] == lab.kfac_factor_bytes(dims, groups=["mlp"])


def test_memory_estimates_scale_with_model_and_attempt():
    cfg = {"model": {"dtype": "bfloat16"}, "extract": {"preset": "50/50"}}
    small = lab.estimate_mem_mb(GPT_NEO_125M, "extract", cfg)
    big = lab.estimate_mem_mb(GPT_NEO_1_3B, "extract", cfg)
    assert lab.BASE_MB < small < big
    assert lab.estimate_mem_mb(GPT_NEO_1_3B, "extract", cfg, attempt=2) == 2 * big
    assert big % lab.ROUND_MB == 0
    # fp32 weights take twice the bytes of bf16 ones
    fp32 = lab.estimate_memory(GPT_NEO_1_3B, "extract", {"model": {"dtype": "float32"}}).parts["weights"]
    assert fp32 == 2 * lab.estimate_memory(GPT_NEO_1_3B, "extract", cfg).parts["weights"]
    # on a GPU the host keeps the process and one staging copy of the weights; the rest is device memory
    est = lab.estimate_memory(GPT_NEO_1_3B, "train_mask", cfg, gpu=True)
    assert est.host_mb < lab.estimate_mem_mb(GPT_NEO_1_3B, "train_mask", cfg) and est.device_mb > est.host_mb
    # stages without a model need the process only; profile names and unknown names
    assert lab.estimate_mem_mb(GPT_NEO_1_3B, "report") == lab.estimate_mem_mb(GPT_NEO_125M, "candidates")
    assert lab.estimate_mem_mb(GPT_NEO_125M, "kfac", {}) == lab.estimate_mem_mb(GPT_NEO_125M, "collect_kfac", {})
    # every rule of the workflow is a stage name
    rules = re.findall(r"^\s*rule (\w+):", "\n".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk")), re.MULTILINE)
    assert len(rules) > 10
    for rule in rules:
        assert lab.estimate_mem_mb(GPT_NEO_125M, rule, cfg) >= lab.BASE_MB, rule
    with pytest.raises(ValueError, match="unknown stage"):
        lab.estimate_mem_mb(GPT_NEO_125M, "nonsense")
    from memctl.stages import STAGES

    for stage in STAGES:
        assert lab.estimate_mem_mb(PYTHIA_1_4B, stage, cfg) >= lab.BASE_MB
        assert lab.estimate_runtime_min(PYTHIA_1_4B, stage, cfg, gpu=True) >= 10
    assert lab.estimate_runtime_min(PYTHIA_1_4B, "train_mask", cfg) > lab.estimate_runtime_min(
        PYTHIA_1_4B, "train_mask", cfg, gpu=True)


def test_estimate_resources_command(capsys):
    main(["estimate-resources", str(REPO / "tests" / "tiny_config.yaml"), "--gpu"])
    out = capsys.readouterr().out
    assert "gpu=True" in out and "train_mask" in out and "demo_pretrain" in out


# ------------------------------------------------------------------------------ install-profile


def _profile(tmp_path, text="executor: slurm\njobs: 10\n"):
    src = tmp_path / "profiles" / "lab"
    src.mkdir(parents=True)
    (src / "config.yaml").write_text(text)
    return src


def test_install_profile_copies_and_is_idempotent(tmp_path):
    src = _profile(tmp_path)
    (src / "partitions.yaml").write_text("partitions: {}\n")
    dest = lab.install_profile(src, tmp_path / "cfg")
    assert dest == tmp_path / "cfg" / "lab"
    assert (dest / "partitions.yaml").read_text() == "partitions: {}\n"
    assert yaml.safe_load((dest / "config.yaml").read_text()) == {"executor": "slurm", "jobs": 10}
    assert lab.install_profile(src, tmp_path / "cfg") == dest  # the same again: nothing to do
    (src / "config.yaml").write_text("executor: slurm\njobs: 20\n")
    with pytest.raises(FileExistsError, match="--force"):
        lab.install_profile(src, tmp_path / "cfg")
    lab.install_profile(src, tmp_path / "cfg", force=True)
    assert yaml.safe_load((dest / "config.yaml").read_text())["jobs"] == 20


def test_install_profile_keeps_relative_paths_working(tmp_path):
    """Snakemake resolves a profile value naming a file in the profile directory against it: a file
    inside comes along, one outside is made absolute in the copy."""
    (tmp_path / "shared.yaml").write_text("x: 1\n")
    src = _profile(tmp_path, "executor: slurm\nslurm-partition-config: parts.yaml\nconfigfile: ../../shared.yaml\n")
    (src / "parts.yaml").write_text("partitions: {}\n")
    dest = lab.install_profile(src, tmp_path / "cfg")
    installed = yaml.safe_load((dest / "config.yaml").read_text())
    assert installed["slurm-partition-config"] == "parts.yaml" and (dest / "parts.yaml").exists()
    assert installed["configfile"] == str((tmp_path / "shared.yaml").resolve())
    with pytest.raises(ValueError, match="outside"):
        lab.install_profile(src, tmp_path / "links", link=True)


def test_install_profile_link(tmp_path):
    src = _profile(tmp_path)
    dest = lab.install_profile(src, tmp_path / "cfg", link=True)
    assert dest.is_symlink() and dest.resolve() == src.resolve()
    assert lab.install_profile(src, tmp_path / "cfg", link=True) == dest


def test_user_profile_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert lab.user_profile_dir() == tmp_path / "snakemake"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert lab.user_profile_dir() == Path.home() / ".config" / "snakemake"


@pytest.mark.slow  # starts Snakemake (a workflow parse: 5-30 s)
def test_installed_profiles_are_found_by_name(tmp_path):
    """`memctl install-profile` puts the repo's profiles where `snakemake --profile NAME` looks,
    from any working directory."""
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for name in ("slurm", "local"):
        subprocess.run([sys.executable, "-m", "memctl.cli", "install-profile", "--name", name],
                       cwd=REPO, env=env, check=True, capture_output=True)
    installed = tmp_path / "xdg" / "snakemake" / "slurm" / "config.yaml"
    assert yaml.safe_load(installed.read_text()) == yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = subprocess.run(
        [sys.executable, "-c", "from snakemake.cli import get_profile_dir; print(get_profile_dir('slurm')[1])"],
        cwd=elsewhere, env=env, check=True, capture_output=True, text=True,
    ).stdout.strip()
    assert Path(found) == installed
    # A real run by name (the local profile needs no cluster).
    (elsewhere / "Snakefile").write_text('rule all:\n    output: "done.txt"\n    shell: "echo ok > {output}"\n')
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--profile", "local", "all"],
                          check=False, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (elsewhere / "done.txt").read_text() == "ok\n"
