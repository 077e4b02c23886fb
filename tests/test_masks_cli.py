"""The masks commands end to end on the tiny model: deltas, logs, provenance, determinism, report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from memctl.cli import main
from memctl.edits import apply_delta, load_delta
from memctl.masks import report
from memctl.store import hash_path, verify

MODEL_SETTINGS = json.dumps({"source": "local", "dtype": "float32", "device": "cpu"})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks_data")
    gen = np.random.default_rng(0)
    save_file({"windows": torch.from_numpy(gen.integers(1, 250, size=(16, 24)))}, str(root / "calibration.safetensors"))
    for name, n in (("memorized_train", 6), ("nonmemorized", 6)):
        pd.DataFrame({
            "candidate_id": [f"{name}{i}" for i in range(n)],
            "prefix_ids": list(gen.integers(1, 250, size=(n, 8))),
            "suffix_ids": list(gen.integers(1, 250, size=(n, 8))),
        }).to_parquet(root / f"{name}.parquet")
    return root


def _run(*args):
    main(list(args))


def _train(tiny_model_dir, data, out, settings):
    _run("train-mask", "--model", str(tiny_model_dir), "--model-settings", MODEL_SETTINGS, "--threads", "1",
         "--calibration", str(data / "calibration.safetensors"), "--memorized", str(data / "memorized_train.parquet"),
         "--settings", json.dumps(settings), "--label", "Ours (up)", "--out", str(out / "delta.safetensors"),
         "--log", str(out / "train_log.parquet"))


SETTINGS = {"mode": "up", "lambda_s": 240, "steps": 6, "batch_size": 4, "mem_batch_size": 3, "lr": 0.3,
            "log_every": 2, "checkpoint_every": 3}


def test_train_mask_writes_a_sound_deterministic_delta(tiny_model_dir, tiny_model, data, tmp_path):
    _train(tiny_model_dir, data, tmp_path / "a", SETTINGS)
    _train(tiny_model_dir, data, tmp_path / "b", SETTINGS)
    for name in ("delta.safetensors", "train_log.parquet"):
        assert verify(tmp_path / "a" / name) == []
        assert hash_path(tmp_path / "a" / name) == hash_path(tmp_path / "b" / name)  # same settings + seed
    assert not (tmp_path / "a" / "checkpoint.pt").exists()
    delta = load_delta(tmp_path / "a" / "delta.safetensors")
    assert delta.metadata["mode"] == "up" and delta.metadata["label"] == "Ours (up)"
    assert abs(delta.metadata["sparsity"] - 0.3) <= 0.01 and not delta.replace
    kept = sum(int(m.sum()) for m in delta.masks.values())
    assert 1 - kept / sum(m.numel() for m in delta.masks.values()) == pytest.approx(delta.metadata["sparsity"])
    log = pd.read_parquet(tmp_path / "a" / "train_log.parquet")
    assert list(log["iteration"]) == [1, 2, 4, 6] and log["mem_loss"].notna().all()
    # the delta applies through the shared edit path: masked weights become exact zeros
    import copy

    edited = apply_delta(copy.deepcopy(tiny_model), delta)
    params = dict(edited.named_parameters())
    for name, mask in delta.masks.items():
        assert torch.all(params[name][~mask] == 0) and torch.all(params[name][mask] != 0)


def test_bad_settings_exit_early_naming_the_key(tiny_model_dir, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        _train(tiny_model_dir, data, tmp_path, {**SETTINGS, "tau": -1})
    assert err.value.code == 2
    assert "masks.tau" in capsys.readouterr().err
    assert not (tmp_path / "delta.safetensors").exists()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_command(tiny_model_dir, data, tmp_path, method):
    settings = {"method": method, "form": "sequential", "sparsity": 0.3, "block_size": 16, "calibration_windows": 8}
    args = ["prune", "--model", str(tiny_model_dir), "--model-settings", MODEL_SETTINGS, "--threads", "1",
            "--settings", json.dumps(settings), "--label", method, "--out", str(tmp_path / "delta.safetensors")]
    if method != "magnitude":
        args += ["--calibration", str(data / "calibration.safetensors")]
    _run(*args)
    assert verify(tmp_path / "delta.safetensors") == []
    sparsity, meta = report.delta_info(tmp_path / "delta.safetensors")
    assert abs(sparsity - 0.3) <= 0.01 and meta["method"] == method
    delta = load_delta(tmp_path / "delta.safetensors")
    assert bool(delta.replace) == (method == "sparsegpt") and bool(delta.masks) == (method != "sparsegpt")


def test_prune_needs_calibration(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run("prune", "--model", str(tiny_model_dir), "--model-settings", MODEL_SETTINGS, "--settings",
             json.dumps({"method": "wanda", "sparsity": 0.3}), "--out", str(tmp_path / "d.safetensors"))
    assert "needs --calibration" in capsys.readouterr().err


def test_balanced_subnet_command(tiny_model_dir, data, tmp_path):
    _run("balanced-subnet", "--model", str(tiny_model_dir), "--model-settings", MODEL_SETTINGS, "--threads", "1",
         "--forget", str(data / "memorized_train.parquet"), "--retain", str(data / "nonmemorized.parquet"),
         "--settings", json.dumps({"epochs": 2, "batch_size": 3, "ratio": 0.05}), "--out",
         str(tmp_path / "delta.safetensors"), "--log", str(tmp_path / "log.parquet"))
    sparsity, meta = report.delta_info(tmp_path / "delta.safetensors")
    assert sparsity == pytest.approx(0.05, abs=1e-3) and meta["method"] == "balanced_subnet"
    assert len(pd.read_parquet(tmp_path / "log.parquet")) == 4
    assert all(".mlp." in name for name in load_delta(tmp_path / "delta.safetensors").masks)


# ----------------------------------------------------------------------------------- report


def _metrics(edit, exact, ppl):
    return {"model": "m", "edit": edit, "method": edit, "n_examples": 10, "exact_er": exact, "fractional_er": exact,
            "mem_loss": 1 - exact, "mem_ppl": np.exp(1 - exact), "heldout_loss": np.log(ppl), "heldout_ppl": ppl}


def test_masks_report_tables_and_plots(tmp_path):
    from memctl.edits import save_delta

    mask = torch.ones(10, 10, dtype=torch.bool)
    mask[:3] = False  # 30% pruned
    save_delta(tmp_path / "up.safetensors", masks={"w": mask}, metadata={"mask_rule": "threshold"})
    replaced = torch.ones(4, 5)
    replaced[0] = 0  # 5 of 20 weights: 25% zeros
    save_delta(tmp_path / "sgpt.safetensors", replace={"w": replaced})
    rows = [_metrics("none", 0.9, 20.0), _metrics("up", 0.95, 22.0), _metrics("up4", 0.9, 25.0),
            _metrics("sgpt", 0.5, 21.0)]
    paths = []
    for row in rows:
        paths.append(tmp_path / f"{row['edit']}.parquet")
        pd.DataFrame([row]).to_parquet(paths[-1])
    spec = {"title": "T", "edits": [
        {"edit": "up", "series": "Ours (up)", "family": "ours", "mode": "up", "sparsity": 0.3,
         "delta": str(tmp_path / "up.safetensors"), "tables": ["main", "sparsity"]},
        {"edit": "none", "series": "Origin", "family": "origin", "delta": None, "tables": ["main"]},
        {"edit": "up4", "series": "Ours (up)", "family": "ours", "mode": "up", "sparsity": 0.4,
         "delta": str(tmp_path / "up.safetensors"), "tables": ["sparsity"]},
        {"edit": "sgpt", "series": "SparseGPT", "family": "baseline", "form": "sequential", "sparsity": 0.3,
         "delta": str(tmp_path / "sgpt.safetensors"), "tables": ["main"]},
    ]}
    out = tmp_path / "out"
    _run("masks-report", "--metrics", *map(str, paths), "--spec", json.dumps(spec), "--out-dir", str(out))
    table = pd.read_parquet(out / "table.parquet")
    assert list(table["method"]) == ["Origin", "SparseGPT", "Ours (up)"]  # the paper's row order
    assert list(table["sparsity"]) == pytest.approx([0.0, 0.25, 0.3])  # measured on the deltas
    md = (out / "table.md").read_text()
    assert "| Ours (up) | 3.091 | 22.00 | 0.950 | 0.950 | 0.050 | 1.051 | 0.300 |" in md
    assert "SparseGPT: form: sequential" in md and "Ours (up): final mask: threshold" in md
    ablation = pd.read_parquet(out / "ablation_sparsity.parquet")
    assert list(ablation["target_sparsity"]) == [0.3, 0.4]
    assert (out / "ablation_sparsity.png").stat().st_size > 5000
    assert not (out / "ablation_threshold.md").exists()
    assert verify(out / "table.md") == [] and verify(out / "ablation_sparsity.png") == []
    page = (out / "table.html").read_text()  # what `snakemake --report` shows: main and ablation tables
    assert "<td>Ours (up)</td><td>3.091</td><td>22.00</td>" in page and "Sparsity ablation" in page
