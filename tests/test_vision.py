"""The vision track (memctl.vision): noised-label bookkeeping, the accuracies, K-FAC factors of a ViT
against an independent computation, a pruning baseline on the ViT, the imagefolder stand-in of the
ImageNet preset, and the vision branch of the DAG: what ``vision.only`` plans, and the vision
jobs of the shared tiny store (``tests/tiny_store.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tiny_store as ts
import torch

from memctl import architectures as arch
from memctl.config import ConfigError, load_config, validate_config
from memctl.vision import curvature, report
from memctl.vision.data import ImageSet, VisionDataError, build, label_table, noise_labels
from memctl.vision.model import accuracies, predict

REPO = Path(__file__).resolve().parents[1]


def data_settings(**kw):
    return validate_config({"vision": {"data": kw}})["vision"]["data"]


# ------------------------------------------------------------------------------ bookkeeping


def test_noise_is_an_exact_seeded_share_of_other_classes():
    true = np.arange(1000) % 10
    assigned, noised = noise_labels(true, 10, 0.1, seed=3)
    assert noised.sum() == 100  # exactly round(0.1 * 1000)
    assert (assigned[noised] != true[noised]).all()  # a noised label is never the true one
    assert (assigned[~noised] == true[~noised]).all()
    assert set(np.unique(assigned)) <= set(range(10))
    again, again_mask = noise_labels(true, 10, 0.1, seed=3)
    assert (again == assigned).all() and (again_mask == noised).all()
    other, other_mask = noise_labels(true, 10, 0.1, seed=4)
    assert not (other_mask == noised).all()
    # every other class is reachable: over many draws each of the 9 offsets occurs
    a, m = noise_labels(np.zeros(5000, dtype=int), 10, 0.5, seed=0)
    assert set(a[m]) == set(range(1, 10))
    assert noise_labels(true, 10, 0.0, seed=0)[1].sum() == 0
    with pytest.raises(ValueError, match="noise"):
        noise_labels(true, 10, 1.0, seed=0)


def test_label_table_noises_training_rows_only_and_keeps_true_labels():
    true = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 3)
    split = np.array(["train"] * 20 + ["selection"] * 5 + ["validation"] * 5, dtype=object)
    table = label_table(true, split, 10, 0.25, seed=1)
    assert list(table["true_label"]) == list(true)
    assert table["noised"].sum() == 5 and table.loc[table["noised"], "split"].eq("train").all()
    held = table[table["split"] != "train"]
    assert (held["label"] == held["true_label"]).all()
    assert (table["noised"] == (table["label"] != table["true_label"])).all()


def test_digits_source_splits_and_noise(tmp_path):
    images, table, info = build(data_settings(noise=0.1, validation_fraction=0.2, selection_fraction=0.5, seed=0))
    assert images.shape == (1797, 1, 8, 8) and float(images.min()) >= 0 and float(images.max()) <= 1
    counts = table["split"].value_counts().to_dict()
    assert counts == {"train": 1438, "selection": 180, "validation": 179}
    assert table["noised"].sum() == round(0.1 * 1438) == info["noised"]
    up, _, _ = build(data_settings(image_size=16, max_train=100, max_held_out=20))
    assert up.shape == (120, 1, 16, 16)
    with pytest.raises(VisionDataError, match="selection split is empty"):
        build(data_settings(max_held_out=2, selection_fraction=0.01))


# -------------------------------------------------------------------------------- the metric


def test_accuracies_on_a_hand_made_case():
    labels = pd.DataFrame({
        "index": range(8),
        "split": ["train"] * 5 + ["selection", "validation", "validation"],
        "true_label": [0, 1, 2, 3, 4, 5, 6, 7],
        "label": [9, 8, 2, 3, 4, 5, 6, 7],  # rows 0 and 1 noised (0 -> 9, 1 -> 8)
        "noised": [True, True, False, False, False, False, False, False],
    })
    pred = np.array([9, 1, 2, 0, 4, 5, 6, 0])
    acc = accuracies(pred, labels)
    # noised rows: row 0 predicts its noised label, row 1 its true label
    assert acc["memorization"] == 0.5 and acc["recovery"] == 0.5 and acc["n_memorization"] == 2
    assert acc["clean_train"] == pytest.approx(2 / 3)  # rows 2, 3, 4: 3 is wrong
    assert acc["selection"] == 1.0 and acc["validation"] == 0.5
    with pytest.raises(ValueError, match="predictions"):
        accuracies(pred[:3], labels)


def test_evaluation_can_score_a_seeded_sample_of_each_group():
    from memctl.vision.model import score_rows

    true = np.arange(400) % 10
    split = np.array(["train"] * 300 + ["selection"] * 40 + ["validation"] * 60, dtype=object)
    labels = label_table(true, split, 10, 0.1, seed=0)
    assert list(score_rows(labels, None, 0)) == list(range(400))
    rows = score_rows(labels, 25, 0)
    chosen = labels.iloc[rows]
    groups = chosen.groupby([chosen["split"], chosen["noised"]]).size().to_dict()
    assert groups == {("train", True): 25, ("train", False): 25, ("selection", False): 25, ("validation", False): 25}
    assert list(rows) == sorted(rows) and list(score_rows(labels, 25, 0)) == list(rows)


def test_best_edit_is_chosen_on_the_selection_slice_not_validation():
    rows = [
        {"edit": "none", "method": "none", "label": "Origin", "unit": "none", "layers": [], "strength": np.nan,
         "memorization": 0.9, "recovery": 0.05, "clean_train": 1.0, "selection": 0.80, "validation": 0.80},
    ]
    for s, sel, val, mem in ((0.5, 0.70, 0.95, 0.0), (0.9, 0.85, 0.60, 0.05), (0.95, 0.85, 0.70, 0.1)):
        rows.append({"edit": f"k{s}", "method": "kfac", "label": "K-FAC", "unit": "block", "layers": [0],
                     "strength": s, "memorization": mem, "recovery": 0.5, "clean_train": 1.0, "selection": sel,
                     "validation": val})
    for pair, sel in (([0, 1], 0.81), ([0, 2], 0.83)):
        rows.append({"edit": f"p{pair}", "method": "kfac", "label": "K-FAC", "unit": "pair", "layers": pair,
                     "strength": 0.9, "memorization": 0.2, "recovery": 0.4, "clean_train": 1.0, "selection": sel,
                     "validation": 0.9})
    table = report.edit_table(pd.DataFrame(rows))
    best = report.best_per_unit(table)
    block = best[best["blocks"] == "0"].iloc[0]
    assert block["strength"] == 0.95  # ties on selection go to the gentler edit; validation ignored
    pairs = report.best_pairs(best)
    assert list(pairs["blocks"]) == ["0+2"]
    # trade-off: lowest memorization among edits within 0.01 of the unedited selection accuracy (0.80);
    # strength 0.5 removes the most but falls to 0.70 on the selection slice
    trade = report.tradeoff(table, 0.01)
    assert trade[trade["blocks"] == "0"]["strength"].tolist() == [0.9]
    assert report.tradeoff(table, 0.2)[lambda d: d["blocks"] == "0"]["strength"].tolist() == [0.5]


def test_vision_verdicts_are_paired_tests_with_counts_not_a_strict_comparison():
    """40 noised images, 100 validation images. The unedited model memorizes 36 noised labels. K-FAC's
    best pair keeps 9 of them (27 lost, none gained: McNemar p = 2 / 2^27); SVD's keeps 10, so K-FAC
    removes one image more than SVD: the old strict '>' called that "more"; on the same images the
    discordant pair count is 1 vs 0, p = 1. Validation: 80 -> 82 of 100, 2 vs 0 discordant, p = 0.5."""
    from memctl.vision.model import hits

    def row(edit, method, unit, mem, val):
        return {"edit": edit, "method": method, "label": method, "unit": unit, "layers": [] if edit == "none" else [0, 1],
                "strength": np.nan if edit == "none" else 0.5, "memorization": mem / 40, "recovery": 0.0,
                "clean_train": 1.0, "selection": 0.8, "validation": val / 100, "n_memorization": 40, "n_validation": 100,
                "hits_memorization": [1] * mem + [0] * (40 - mem), "hits_validation": [1] * val + [0] * (100 - val),
                "hits_recovery": [0] * 40}

    table = report.edit_table(pd.DataFrame([row("none", "none", "none", 36, 80), row("k", "kfac", "pair", 9, 82),
                                            row("s", "svd", "pair", 10, 80)]))
    by = table.set_index("edit")
    assert by.loc["k", "memorization_count"] == "9/40" and by.loc["k", "memorization_vs_origin"] == "lower (p<0.001)"
    assert by.loc["k", "memorization_vs_origin_p"] == pytest.approx(2 / 2**27)
    assert by.loc["k", "validation_vs_origin"] == "no evidence of a difference (p=0.5)"
    assert by.loc["none", "validation_ci"] == "[0.708, 0.873]" and by.loc["none", "memorization_vs_origin"] == "-"
    assert by.loc["k", "clean_train_count"] == "-"  # neither outcomes nor n_clean_train: no count invented
    pairs = report.best_pairs(report.best_per_unit(table))
    lines = report.claim_lines(by.loc["none"].to_dict() | {"edit": "none"}, pairs)
    claim = lines[-1]
    assert "K-FAC's memorization against the unedited model's: lower (p<0.001)" in claim
    assert "K-FAC's validation accuracy against the unedited model's: no evidence of a difference (p=0.5)" in claim
    assert "K-FAC's memorization against SVD's (same noised images): no evidence of a difference (p=1)" in claim
    assert "memorization 0.900 (36/40) -> 0.225 (9/40), lower (p<0.001)" in lines[0]
    md = report.vision_markdown(table, report.best_per_unit(table), pairs, None, {})
    assert "| 9/40 | [0.108, 0.385] | lower (p<0.001) |" in md and "exact McNemar" in md
    # the evaluate stage's outcomes: one per image of each group, in row order
    labels = pd.DataFrame({"split": ["train", "train", "validation"], "noised": [True, False, False],
                           "label": [5, 1, 2], "true_label": [0, 1, 2]})
    out = hits(np.array([5, 1, 0]), labels)
    assert out["memorization"].tolist() == [1] and out["recovery"].tolist() == [0]
    assert out["clean_train"].tolist() == [1] and out["validation"].tolist() == [0] and out["selection"].tolist() == []


def test_units_and_edit_specs():
    assert curvature.units(3, "all") == [("block", [0]), ("block", [1]), ("block", [2]), ("pair", [0, 1]),
                                         ("pair", [0, 2]), ("pair", [1, 2])]
    assert curvature.units(12, [[0, -1], [11, 0]])[12:] == [("pair", [0, 11])]
    with pytest.raises(ValueError, match="one block twice"):
        curvature.units(4, [[1, 1]])
    edits = validate_config({"vision": {"edits": {"pairs": [], "strengths": {"svd": [0.1, 0.5]}}}})["vision"]["edits"]
    specs = curvature.edit_specs(edits, "svd", 2)
    assert [(s["layers"], s["strength"]) for s in specs] == [([0], 0.1), ([0], 0.5), ([1], 0.1), ([1], 0.5)]


# ---------------------------------------------------------------------- the ViT and its factors


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("vision") / "data"
    out.mkdir()
    images, table, info = build(data_settings(max_train=200, max_held_out=40, noise=0.1))
    table.to_parquet(out / "labels.parquet", index=False)
    (out / "info.json").write_text(json.dumps(info))
    save_file({"images": images.contiguous()}, str(out / "images.safetensors"))
    return out


def tiny_vit(images: ImageSet, seed=0, layers=2):
    from transformers import ViTForImageClassification

    from memctl.vision.model import vit_config

    torch.manual_seed(seed)
    arch_settings = {"patch_size": 4, "hidden_size": 16, "num_hidden_layers": layers, "num_attention_heads": 2,
                     "intermediate_size": 32}
    return ViTForImageClassification(vit_config(arch_settings, images)).eval()


def test_vit_matrices_go_through_the_shared_target_registry(digits_dir):
    model = tiny_vit(ImageSet(digits_dir))
    targets = arch.linear_targets(model)
    assert [(t.layer, t.role) for t in targets[:6]] == [(0, "q"), (0, "k"), (0, "v"), (0, "o"), (0, "up"), (0, "down")]
    down = next(t for t in targets if t.role == "down")
    assert (down.d_in, down.d_out) == (32, 16) and down.input_key == "layer0.mlp_hidden"
    assert arch.num_layers(model) == 2


def test_kfac_factors_of_the_vit_match_an_independent_computation(digits_dir):
    images = ImageSet(digits_dir)
    model = tiny_vit(images)
    targets = arch.linear_targets(model, groups=["mlp"])
    settings = {"seed": 0, "max_images": 24, "batch_size": 7, "labels": "empirical", "precision": "fp32"}
    factors = curvature.collect(model, images, targets, settings)
    rows = curvature.factor_rows(images, 24, 0)
    assert factors.tokens == 24 * 5  # 4 patches + CLS per 8x8 image with patch 4
    # independent: plain hooks, one forward/backward over all images, every position counted
    x = images.pixels(rows)
    y = torch.as_tensor(images.labels["label"].to_numpy()[rows])
    ins, outs = {}, {}
    def hook(name):
        def record(mod, args, out):
            ins[name] = args[0].detach()
            out.retain_grad()
            outs[name] = out
        return record

    hooks = [arch.module(model, t).register_forward_hook(hook(t.name)) for t in targets]
    torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y, reduction="sum").backward()
    for h in hooks:
        h.remove()
    for t in targets:
        a = ins[t.name].reshape(-1, t.d_in).double()
        g = outs[t.name].grad.reshape(-1, t.d_out).double()
        torch.testing.assert_close(factors.A[t.input_key].double(), a.T @ a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(factors.G[t.name].double(), g.T @ g, rtol=1e-4, atol=1e-7)
    model.zero_grad()
    # sampled labels: seeded, and a different seed draws other labels
    sampled = {**settings, "labels": "sampled"}
    one = curvature.collect(model, images, targets, sampled)
    two = curvature.collect(model, images, targets, sampled)
    other = curvature.collect(model, images, targets, {**sampled, "seed": 1})
    name = targets[-1].name
    assert torch.equal(one.G[name], two.G[name]) and not torch.equal(one.G[name], other.G[name])
    torch.testing.assert_close(one.A[targets[0].input_key], factors.A[targets[0].input_key])  # A ignores labels


def test_kfac_edit_and_pruning_baselines_on_the_vit(digits_dir, tmp_path):
    from memctl.curvature.edit import make_edit
    from memctl.curvature.decompose import decompose
    from memctl.edits import apply_delta, load_delta, save_delta
    from memctl.pruning.runner import prune_model

    images = ImageSet(digits_dir)
    model = tiny_vit(images)
    before = predict(model, images)
    mlp = arch.linear_targets(model, groups=["mlp"])
    factors = curvature.collect(model, images, mlp, {"seed": 0, "max_images": 32, "batch_size": 16,
                                                     "labels": "sampled", "precision": "fp32"})
    eig, _ = decompose(factors)
    # full energy keeps every direction: the K-FAC edit is the identity
    spec = {"method": "kfac", "layers": [0, 1], "roles": ["up", "down"], "groups": ["mlp"], "strength": 1.0}
    replace, _ = make_edit(model, spec, eig)
    for t in mlp:
        torch.testing.assert_close(replace[t.param_name], arch.weight(model, t).detach(), rtol=1e-5, atol=1e-6)
    # magnitude pruning of every attention and MLP matrix: exactly round(r * numel) zeros each
    pruned = tiny_vit(images)
    result = prune_model(pruned, {"method": "magnitude", "sparsity": 0.5, "groups": ["attention", "mlp"]},
                         progress=False)
    for t in arch.linear_targets(pruned):
        w = arch.weight(pruned, t)
        assert int((w == 0).sum()) == round(0.5 * w.numel()), t.name
    assert result.stats["sparsity"] == pytest.approx(0.5, abs=1e-3)
    # the delta (one format for every edit) reproduces the pruned model on a fresh copy
    path = save_delta(tmp_path / "magnitude.safetensors", masks=result.masks, metadata={"method": "magnitude"})
    fresh = apply_delta(tiny_vit(images), load_delta(path))
    assert (predict(fresh, images) == predict(pruned, images)).all()
    assert (predict(tiny_vit(images), images) == before).all()
    # Wanda from the vision K-FAC A factors (one-pass form): round(r * d_in) pruned per output row
    wanda = tiny_vit(images)
    prune_model(wanda, {"method": "wanda", "sparsity": 0.25, "groups": ["mlp"], "form": "one_pass",
                        "calibration_windows": 0, "batch_size": 1}, factors=factors.A, progress=False)
    for t in mlp:
        zeros = (arch.weight(wanda, t) == 0).sum(dim=1)
        assert (zeros == round(0.25 * t.d_in)).all(), t.name


def test_band_analysis_of_the_vit_matches_brute_force(digits_dir):
    """Fig. 2 on the ViT: memorized = noised rows predicted as their noised label, clean = the other
    training rows predicted correctly; the K-FAC band means equal a brute-force average of ||Z x||
    over every Fisher eigenpair ranked by lambda * mu."""
    from memctl.curvature.decompose import decompose

    images = ImageSet(digits_dir)
    model = tiny_vit(images)
    down = arch.linear_targets(model, groups=["mlp"], roles=["down"], layers=[1])
    factors = curvature.collect(model, images, down, {"seed": 0, "max_images": 48, "batch_size": 16,
                                                      "labels": "sampled", "precision": "fp32"})
    eig, _ = decompose(factors)
    # a "prediction" that makes 3 noised rows memorized and every clean row fitted
    lab = images.labels
    pred = lab["true_label"].to_numpy().copy()
    noised_rows = np.flatnonzero(lab["noised"].to_numpy())[:3]
    pred[noised_rows] = lab["label"].to_numpy()[noised_rows]
    mem, clean = curvature.memorized_and_clean(images, pred, 1000, 0)
    assert list(mem) == list(noised_rows)
    assert len(clean) == int(((lab["split"] == "train") & ~lab["noised"]).sum())
    settings = {"bands": [0.1, 0.25, 0.5], "positions": "all", "max_images": 8, "seed": 0}
    table = curvature.spectrum_table(model, eig, down, images, pred, settings)
    assert len(table) == 2 * 4 and set(table["basis"]) == {"K-FAC", "SVD"}
    t = down[0]
    lam, vecs = eig.A[t.input_key].values.double(), eig.A[t.input_key].vectors.double()
    mu = eig.G[t.name].values.double()
    products = (mu[:, None] * lam[None, :]).flatten()
    order = torch.sort(products, descending=True, stable=True).indices
    n = products.numel()
    states = curvature.capture_states(model, images, mem, down, "all")[t.name].double()
    assert states.shape == (3 * 5, t.d_in)
    proj = (states @ vecs).abs()  # |v_j . x| = ||u_i v_j^T x|| for every i
    for b, (lo, hi) in enumerate(((0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 1.0))):
        pairs = order[round(lo * n): round(hi * n)]
        brute = proj[:, pairs % t.d_in].mean(1).mean(0)
        got = table[(table["basis"] == "K-FAC") & (table["band_index"] == b)]["mean_norm_memorized"].iloc[0]
        assert got == pytest.approx(float(brute), rel=1e-5)
    cls = curvature.capture_states(model, images, mem, down, "cls")[t.name]
    torch.testing.assert_close(cls, states.float().reshape(3, 5, -1)[:, 0])


# ------------------------------------------------------------------------- the ImageNet preset


def write_imagefolder(root: Path, classes=("n01", "n02", "n03"), per_class=(4, 2), size=(20, 14)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class[0]), ("validation", per_class[1])):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{c}_{i}.JPEG", format="JPEG")
    return root


def test_imagenet_preset_validates_and_reads_an_imagefolder_stand_in(tmp_path):
    root = write_imagefolder(tmp_path / "imagenet")
    cfg = load_config(REPO / "config" / "vision-imagenet.yaml")
    vis = cfg["vision"]
    assert vis["enabled"] and vis["data"]["source"] == "imagefolder" and vis["data"]["image_size"] == 224
    assert vis["model"]["hidden_size"] == 768 and vis["model"]["num_hidden_layers"] == 12
    assert vis["data"]["noise"] == 0.1 and vis["train"]["weight_decay"] == 0.3
    from memctl import lab
    from memctl.plan import build_plan

    plan = build_plan(cfg, lab.workflow_model_dims(cfg), python_version="3.11")
    assert set(plan.targets) == set(plan.stage("vision_report").outputs.values())  # vision.only
    # the same data settings on a tiny stand-in in the same layout
    settings = dict(vis["data"], path=str(root), image_size=16, selection_fraction=0.5)
    images, table, info = build(settings)
    assert images is None and info["classes"] == ["n01", "n02", "n03"] and info["channels"] == 3
    assert table["split"].value_counts().to_dict() == {"train": 12, "selection": 3, "validation": 3}
    assert table["noised"].sum() == round(0.1 * 12)
    out = tmp_path / "data"
    out.mkdir()
    table.to_parquet(out / "labels.parquet", index=False)
    (out / "info.json").write_text(json.dumps(info))
    loaded = ImageSet(out)
    x = loaded.pixels([0, 13])
    assert x.shape == (2, 3, 16, 16) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert loaded.labels.loc[0, "file"].startswith("train/n01/")
    # training decodes on demand, in worker processes or not, to the same numbers
    from memctl.vision.model import train_vit

    arch_settings = {"patch_size": 8, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 16}
    train = validate_config({"vision": {"train": {"epochs": 2, "batch_size": 5, "eval_every": 1}}})["vision"]["train"]
    _, log0 = train_vit(loaded, arch_settings, {**train, "device": "cpu", "workers": 0})
    _, log2 = train_vit(loaded, arch_settings, {**train, "device": "cpu", "workers": 2})
    pd.testing.assert_frame_equal(log0, log2)
    with pytest.raises(VisionDataError, match="validation"):
        build(dict(settings, path=str(root / "train")))


def test_vision_commands_refuse_bad_input_in_one_line(tmp_path, capsys):
    from memctl.cli import main

    with pytest.raises(SystemExit) as err:
        main(["vision-data", "--settings", '{"source": "imagefolder"}', "--out-dir", str(tmp_path / "d")])
    assert err.value.code == 2
    assert "vision.data.path: required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["vision-data", "--settings", '{"noise": 2}', "--out-dir", str(tmp_path / "d")])
    assert err.value.code == 2 and "vision.data.noise" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["vision-train", "--data", str(tmp_path / "missing"), "--settings", '{"model": {}, "train": {}}',
              "--out-dir", str(tmp_path / "t")])
    assert err.value.code == 2 and "labels.parquet: not found" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "t").exists()


def test_bad_vision_config_is_refused_naming_the_key():
    from memctl import lab
    from memctl.plan import build_plan

    def plan(vision):
        cfg = validate_config({"vision": vision})
        return build_plan(cfg, lab.workflow_model_dims(cfg), python_version="3.11")

    with pytest.raises(ConfigError, match="vision.only"):
        plan({"only": True})
    with pytest.raises(ConfigError, match="vision.data.path"):
        plan({"enabled": True, "data": {"source": "imagefolder"}})
    with pytest.raises(ConfigError, match="vision.spectrum.roles"):
        plan({"enabled": True, "kfac": {"roles": ["up"]}, "edits": {"roles": ["up"]}})
    with pytest.raises(ConfigError, match="vision.data.noise"):
        validate_config({"vision": {"data": {"noise": 1.5}}})
    off = plan({})
    assert not any(s.startswith("vision") for s in off.stages)


# ------------------------------------------------------------------------------- the DAG


def vision_only_plans(tmp_path):
    """The shared tiny store's config (``tests/tiny_store.py``: the tiny config, ``TINY_VISION``,
    a local downstream task) planned with ``vision.only`` on and off."""
    from memctl import lab
    from memctl.plan import build_plan

    def plan(only):
        raw = ts.tiny_config(tmp_path)
        raw["vision"]["only"] = only
        cfg = validate_config(raw)
        return build_plan(cfg, lab.workflow_model_dims(cfg), python_version="3.11")

    return plan(True), plan(False)


def test_vision_only_plans_the_vision_track_alone(tmp_path):
    """``vision.only``: ``rule all`` asks for the vision report alone, so no language-model stage runs
    and no results table is written; the vision jobs are those of the same config with both tracks
    on (the shared tiny store's: what ``test_vision_branch_of_the_dag`` reads is what a vision-only
    run writes)."""
    alone, both = vision_only_plans(tmp_path)
    vision_stages = {s for s in both.stages if s.startswith("vision")}
    assert set(alone.targets) == set(alone.stage("vision_report").jobs[""].outputs.values())
    run = ts.needed(alone)  # the jobs `snakemake` runs
    assert {job.stage for job in run} == vision_stages
    assert f"{alone.results}/results.md" not in alone.artifacts()
    assert not any(p.startswith(f"{alone.results}/") and "/vision/" not in p for p in alone.artifacts())
    # with the language-model track on, its stages and tables are planned next to the same vision jobs
    assert f"{both.results}/results.md" in both.artifacts()
    assert {job.stage for job in ts.needed(both)} > vision_stages | {"report"}

    def vision_jobs(plan):
        return {(j.stage, j.key): (dict(j.outputs), j.args) for j in ts.needed(plan) if j.stage in vision_stages}

    assert vision_jobs(alone) == vision_jobs(both)
    # and the shared store's plan (its config/config.yaml, planned as Snakemake plans it) has those jobs
    assert vision_jobs(ts.plan_of(ts.make_workdir(tmp_path / "store"))) == vision_jobs(alone)


def files_under(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``root``: (size, mtime) of each, to see that nothing wrote there."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def test_vision_branch_of_the_dag(tiny_store):
    """The vision track's jobs of the shared tiny store (``tests/tiny_store.py``: ``TINY_VISION``)."""
    out = tiny_store / "results" / "tables" / "vision"
    for name in ("vision.md", "vision.html", "vision_blocks.png", "vision_spectrum.png", "vision_best.parquet"):
        assert (out / name).exists(), name
    edits = pd.read_parquet(out / "vision_edits.parquet")
    # 2 blocks + 1 pair, two strengths, two methods, and the unedited model
    assert len(edits) == 1 + 3 * 2 * 2
    assert set(edits["method"]) == {"none", "kfac", "svd"}
    best = pd.read_parquet(out / "vision_best.parquet")
    assert set(best["unit"]) == {"block", "pair", "best pair", "trade-off"}
    text = (out / "vision.md").read_text()
    assert "Per MLP block" in text and "Best pair" in text and "Claim" in text
    from memctl.store import verify

    sides = [*tiny_store.glob("results/vision/**/*.meta.json"), *out.glob("**/*.meta.json")]
    assert sides
    for side in sides:
        assert verify(side.with_name(side.name[: -len(".meta.json")])) == [], side


@pytest.mark.slow  # starts Snakemake (a workflow parse: 5-30 s)
def test_snakemake_on_the_store_reports_the_vision_track_and_writes_nothing(tiny_store, tmp_path):
    """Snakemake on the shared store, read only: nothing to do, and ``--report`` (the page written
    into ``tmp_path``) shows the vision category, its figure and page with their captions. Neither
    writes into ``results/`` (Snakemake's own records go to ``.snakemake/``)."""
    before = files_under(tiny_store / "results")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tiny_store), "--cores", "2"]
    again = subprocess.run([*cmd, "-n"], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "Nothing to be done" in again.stdout + again.stderr
    page = tmp_path / "report.html"
    proc = subprocess.run([*cmd, "--report", str(page)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    html = page.read_text()
    assert "Vision" in html and "vision_blocks.png" in html and "vision.html" in html
    assert "best pair of blocks" in html  # a caption from workflow/report/vision_blocks.rst
    after = files_under(tiny_store / "results")
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:10]
