"""The papers' presets (config/presets/): schema-valid, the per-model values of the papers, planned.

Each preset is loaded through the schema (``extends:`` resolved) and planned with the real model's
dimensions, written here from the architectures' published configs (the hub is not reachable), so
layer sweeps, shards and the resource estimates see the real shapes. One preset is dry-run by
Snakemake (marked slow).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from memctl.config import load_config
from memctl.lab import ModelDims
from memctl.plan import build_plan

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "config" / "presets"

_NEO = {"vocab_size": 50257, "context_length": 2048, "model_type": "gpt_neo", "fused_qkv": False,
        "tied_embeddings": True, "learned_positions": True}
_PYTHIA = {"vocab_size": 50304, "context_length": 2048, "model_type": "gpt_neox"}
_OLMO = {"vocab_size": 100352, "context_length": 4096, "model_type": "olmo2", "gated_mlp": True, "fused_qkv": False}
#: preset -> (hub id, revision, dims, masks lr, lambda_s up, lambda_s down, threshold t)
EXPECTED = {
    "gpt-neo-125m": ("EleutherAI/gpt-neo-125m", "main", ModelDims(hidden_size=768, num_layers=12, intermediate_size=3072,
                                                                   num_heads=12, **_NEO), 3e-3, 160, 120, 4.0),
    "gpt-neo-1.3b": ("EleutherAI/gpt-neo-1.3B", "main", ModelDims(hidden_size=2048, num_layers=24,
                                                                   intermediate_size=8192, num_heads=16, **_NEO),
                     3e-3, 160, 120, 2.0),
    "gpt-neo-2.7b": ("EleutherAI/gpt-neo-2.7B", "main", ModelDims(hidden_size=2560, num_layers=32,
                                                                   intermediate_size=10240, num_heads=20, **_NEO),
                     3e-3, 160, 120, 2.0),
    "pythia-410m": ("EleutherAI/pythia-410m", "step143000", ModelDims(hidden_size=1024, num_layers=24,
                                                                      intermediate_size=4096, num_heads=16, **_PYTHIA),
                    2e-3, 240, 160, 2.0),
    "pythia-1.4b": ("EleutherAI/pythia-1.4b", "step143000", ModelDims(hidden_size=2048, num_layers=24,
                                                                      intermediate_size=8192, num_heads=16, **_PYTHIA),
                    2e-3, 240, 160, 2.0),
    "pythia-2.8b": ("EleutherAI/pythia-2.8b", "step143000", ModelDims(hidden_size=2560, num_layers=32,
                                                                      intermediate_size=10240, num_heads=32, **_PYTHIA),
                    2e-3, 240, 160, 1.5),
    "olmo2-1b": ("allenai/OLMo-2-0425-1B", "main", ModelDims(hidden_size=2048, num_layers=16, intermediate_size=8192,
                                                             num_heads=16, num_kv_heads=16, **_OLMO),
                 None, None, None, None),
    "olmo2-7b": ("allenai/OLMo-2-1124-7B", "main", ModelDims(hidden_size=4096, num_layers=32, intermediate_size=11008,
                                                             num_heads=32, num_kv_heads=32, **_OLMO),
                 None, None, None, None),
}


def test_every_preset_file_is_listed():
    assert sorted(p.stem for p in PRESETS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_is_valid_and_planned_with_the_papers_values(name):
    hub_id, revision, dims, lr, up, down, t = EXPECTED[name]
    cfg = load_config(PRESETS / f"{name}.yaml")
    assert cfg["model"]["source"] == "hub" and cfg["model"]["name_or_path"] == hub_id
    assert cfg["model"]["revision"] == revision and cfg["resources"]["gpu"] is True
    plan = build_plan(cfg, dims)
    assert plan.model.tag.endswith(f"@{revision}")
    assert plan.results == f"results/tables/{name}"
    if lr is not None:  # the pruning paper's LM extraction benchmark, appendix E
        assert (cfg["extract"]["prefix_len"], cfg["extract"]["suffix_len"]) == (50, 50)
        assert cfg["candidates"]["source"] == "npy" and cfg["heldout"]["hf_name"] == "wikitext"
        assert cfg["calibration"]["hf_name"] == "allenai/c4"
        assert cfg["candidates"]["source_tokenizer"] == ("gpt2" if "pythia" in name else None)
        masks = {job.settings["mode"]: job.settings for job in plan.stage("train_mask").jobs.values()}
        assert sorted(masks) == ["down", "none", "up"]
        assert all(s["lr"] == lr and s["sparsity"] == 0.3 and s["weight_decay"] == 0.001 for s in masks.values())
        assert masks["up"]["lambda_s"] == up and masks["down"]["lambda_s"] == down
        assert masks["down"]["threshold"] == t
        assert len(plan.stage("prune_baseline").jobs) == 3
        assert not plan.stage("apply_edit").jobs  # no curvature edits in this paper's setting
    else:  # the loss-curvature paper on OLMo-2
        assert (cfg["extract"]["prefix_len"], cfg["extract"]["suffix_len"]) == (64, 48)
        assert cfg["extract"]["ood_group"] == "quotes" and cfg["extract"]["ood_suffix_len"] == 8
        windows = -(-cfg["curvature"]["data"]["max_tokens"] // cfg["calibration"]["context_length"])
        assert windows <= cfg["calibration"]["max_windows"]  # 2M tokens are there to collect
        edits = [j.settings for j in plan.stage("apply_edit").jobs.values()]
        assert {"method": "kfac", "layers": [0, 1, 2], "strength": 0.8} in [
            {k: e[k] for k in ("method", "layers", "strength")} for e in edits]
        per_layer = {e["layers"][0] for e in edits if e["method"] == "kfac" and len(e["layers"]) == 1}
        assert per_layer == set(range(dims.num_layers))
        shards = cfg["curvature"]["data"]["shards"]
        assert len(plan.stage("collect_kfac").jobs) == shards == (4 if name == "olmo2-7b" else 1)
        assert len(plan.stage("balanced_subnet").jobs) == 1 and not plan.stage("train_mask").jobs


@pytest.mark.slow
def test_snakemake_dry_run_of_a_preset(tmp_path):
    """``snakemake -n`` plans every job of the Pythia-1.4B preset (its data file stands in as a
    tiny array; nothing is loaded)."""
    data = tmp_path / "data" / "lm-extraction-benchmark"
    data.mkdir(parents=True)
    np.save(data / "train_dataset.npy", np.zeros((4, 200), dtype=np.uint16))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n", "--cores", "1",
           "all", "--configfile", str(PRESETS / "pythia-1.4b.yaml")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    for rule in ("extract", "train_mask", "prune_baseline", "csp", "evaluate", "masks_report"):
        assert f"rule {rule}:" in out or f"{rule} " in out, rule
