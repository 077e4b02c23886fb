"""Curvature stage commands end to end on the tiny model, config expansion, and the report."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from memctl import architectures as arch
from memctl.cli import main
from memctl.config import ConfigError, validate_config
from memctl.curvature import report, settings
from memctl.curvature.store import load_eigen, load_factors
from memctl.edits import apply_delta, load_delta
from memctl.store import hash_path, verify

COLLECT = {"data": {"max_tokens": 150, "batch_size": 2, "labels": "sampled", "seed": 5},
           "modules": {"groups": ["mlp", "attention"], "layers": None, "roles": None}}


@pytest.fixture(scope="module")
def windows_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "windows.safetensors"
    ids = np.random.default_rng(0).integers(1, 250, size=(12, 16))
    save_file({"windows": torch.from_numpy(ids)}, str(path))
    return path


def _collect(model_dir, windows, out, extra=()):
    main(["kfac-collect", "--model", str(model_dir), "--model-settings", '{"source": "local", "device": "cpu"}',
          "--threads", "1", "--windows", str(windows), "--settings", json.dumps(COLLECT), "--out-dir", str(out), *extra])


@pytest.fixture(scope="module")
def kfac_run(tmp_path_factory, tiny_model_dir, windows_file):
    root = tmp_path_factory.mktemp("kfac")
    _collect(tiny_model_dir, windows_file, root / "full")
    main(["kfac-decompose", "--factors", str(root / "full" / "factors"), "--threads", "1", "--out-dir", str(root / "eig")])
    return root


def test_collect_uses_the_token_budget_and_is_byte_deterministic(kfac_run, tiny_model_dir, windows_file):
    fac = load_factors(kfac_run / "full" / "factors")
    assert fac.tokens == 10 * 15  # ceil(150 / 16) = 10 windows, 15 predicting positions each
    summary = pd.read_parquet(kfac_run / "full" / "summary.parquet")
    assert len(summary) == len(fac.targets) == 2 * 4  # qkv, o, up, down in each of 2 layers
    assert (summary["trace_A"] > 0).all() and (summary["trace_G"] > 0).all()
    _collect(tiny_model_dir, windows_file, kfac_run / "again")
    assert hash_path(kfac_run / "again" / "factors") == hash_path(kfac_run / "full" / "factors")
    for art in ("full/factors", "full/summary.parquet", "eig/eigen", "eig/summary.parquet"):
        assert verify(kfac_run / art) == [], art


def test_sharded_collection_merges_into_the_single_pass(kfac_run, tiny_model_dir, windows_file, tmp_path):
    for i in range(2):
        _collect(tiny_model_dir, windows_file, tmp_path / f"s{i}", ["--shard", f"{i}/2"])
    main(["kfac-merge", "--inputs", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out-dir", str(tmp_path / "m")])
    merged, full = load_factors(tmp_path / "m" / "factors"), load_factors(kfac_run / "full" / "factors")
    assert load_factors(tmp_path / "s0" / "factors").tokens == 5 * 15 and merged.tokens == full.tokens
    for key, ref in full.G.items():
        torch.testing.assert_close(merged.G[key], ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    assert verify(tmp_path / "m" / "factors") == []


def test_decomposition_summary_has_top_eigenvalues(kfac_run):
    summary = pd.read_parquet(kfac_run / "eig" / "summary.parquet")
    eig = load_eigen(kfac_run / "eig" / "eigen", layers=[1])
    up = next(t for t in eig.targets if t.role == "up")
    row = summary[summary["module"] == up.name].iloc[0]
    assert row["top_mu_G"][0] == pytest.approx(float(eig.G[up.name].values[0]))
    assert row["top_lambda_A"][0] == pytest.approx(float(eig.A[up.input_key].values[0]))
    # eigenvalues are those of the mean factor: they sum to its trace
    assert float(eig.A[up.input_key].values.sum()) == pytest.approx(row["trace_A"], rel=1e-5)


@pytest.mark.parametrize("bad, named", [({"strength": 1.5}, "strength"), ({"strength": 0}, "strength"),
                                       ({"method": "pca"}, "method"), ({"layers": []}, "layers")])
def test_edit_command_rechecks_a_spec_given_by_hand(tiny_model_dir, tmp_path, capsys, bad, named):
    spec = {"method": "svd", "layers": [1], "roles": None, "groups": ["mlp"], "strength": 0.5, "label": "x", **bad}
    out = tmp_path / "delta.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["curvature-edit", "--model", str(tiny_model_dir), "--model-settings", '{"source": "local"}',
              "--settings", json.dumps(spec), "--out", str(out)])
    assert exc.value.code == 2 and f"--settings.{named}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("method,strength", [("kfac", 0.8), ("kfac_factor", 0.8), ("kfac_pairwise", 0.5), ("svd", 0.25)])
def test_edit_command_writes_a_delta_that_patches_the_model(kfac_run, tiny_model_dir, tiny_model, tmp_path, method, strength):
    import copy

    from memctl.curvature.edit import edit_matrix

    spec = {"method": method, "layers": [1], "roles": ["up", "down"], "groups": ["mlp"], "strength": strength, "label": "x"}
    out = tmp_path / "delta.safetensors"
    main(["curvature-edit", "--model", str(tiny_model_dir), "--model-settings", '{"source": "local"}',
          "--eigen", str(kfac_run / "eig" / "eigen"), "--edit-id", "e1", "--settings", json.dumps(spec), "--out", str(out)])
    delta = load_delta(out)
    targets = arch.linear_targets(tiny_model, groups=["mlp"], layers=[1])
    assert delta.params == sorted(t.param_name for t in targets)
    assert delta.metadata["edit_id"] == "e1" and delta.metadata["spec"] == spec
    eig = load_eigen(kfac_run / "eig" / "eigen", layers=[1])
    model = apply_delta(copy.deepcopy(tiny_model), out)
    for t in targets:
        W = arch.weight(tiny_model, t).double()
        ref, _ = edit_matrix(method, W, strength, eig.A[t.input_key], eig.G[t.name])
        torch.testing.assert_close(arch.weight(model, t).double(), ref, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(arch.weight(model, t).double(), W, atol=1e-4)
    layer0 = arch.linear_targets(tiny_model, groups=["mlp"], layers=[0])[0]
    assert torch.equal(arch.weight(model, layer0), arch.weight(tiny_model, layer0))
    assert verify(out) == []


def test_non_finite_factors_stop_the_decomposition_naming_the_module(kfac_run, tmp_path, capsys):
    src = kfac_run / "full" / "factors" / "layer-001.safetensors"
    (tmp_path / "factors").mkdir()
    tensors = load_file(str(src))
    with safe_open(str(src), framework="pt") as fh:
        header = fh.metadata()
    name = next(k for k in tensors if k.startswith("G/") and k.endswith("dense_4h_to_h"))
    tensors[name][0, 0] = float("inf")
    save_file(tensors, str(tmp_path / "factors" / src.name), metadata=header)
    with pytest.raises(SystemExit) as exc:
        main(["kfac-decompose", "--factors", str(tmp_path / "factors"), "--out-dir", str(tmp_path / "eig")])
    assert exc.value.code == 2
    assert f"G of {name[2:]} has 1 non-finite entries" in capsys.readouterr().err
    assert not (tmp_path / "eig").exists()


# --------------------------------------------------------------------------- config expansion


def _curv(**section):
    return validate_config({"curvature": section})["curvature"]


def test_sweeps_expand_into_one_edit_per_layer_and_per_strength():
    curv = _curv(
        modules={"layers": [0, 1, 2]},
        edits=[{"method": "kfac", "layers": [0], "strength": 0.8}],
        sweeps={"per_layer": {"methods": ["kfac_pairwise", "svd"]},
                "strength": {"layers": [0, 1], "kfac_pairwise": [0.3, 0.6], "svd": [0.2], "kfac": [0.8], "kfac_factor": [0.8]}},
    )
    specs = settings.expand_edits(curv, n_layers=4)
    per_layer = [s for s in specs if len(s["layers"]) == 1 and s["method"] != "kfac"]
    assert [(s["method"], s["layers"], s["strength"]) for s in per_layer] == [
        ("kfac_pairwise", [0], 0.6), ("kfac_pairwise", [1], 0.6), ("kfac_pairwise", [2], 0.6),
        ("svd", [0], 0.2), ("svd", [1], 0.2), ("svd", [2], 0.2)]
    sweep = [(s["method"], s["strength"]) for s in specs if s["layers"] == [0, 1]]
    assert sweep == [("kfac", 0.8), ("kfac_factor", 0.8), ("kfac_pairwise", 0.3), ("kfac_pairwise", 0.6), ("svd", 0.2)]
    assert [s["label"] for s in specs if s["layers"] == [0, 1]][:2] == ["K-FAC", "K-FAC (per factor)"]
    assert len(specs) == 1 + 6 + 5
    ids = [settings.edit_id(s, "up") for s in specs]
    assert len(set(ids)) == len(ids) and all(i.replace("-", "").replace("_", "").isalnum() for i in ids)
    assert settings.edit_id(specs[0], "up") != settings.edit_id(specs[0], "other-upstream")
    assert settings.edit_id({**specs[0], "label": "renamed"}, "up") == ids[0]


def test_duplicate_edits_collapse():
    curv = _curv(edits=[{"method": "svd", "layers": [1], "strength": 0.2}], sweeps={"per_layer": {"methods": ["svd"], "layers": [1]}})
    assert len(settings.expand_edits(curv, n_layers=2)) == 1


@pytest.mark.parametrize("section,message", [
    ({"edits": [{"method": "kfac", "layers": [5]}]}, "curvature.edits[0].layers: layers [5] out of range"),
    ({"modules": {"layers": [0]}, "edits": [{"method": "kfac", "layers": [1]}]},
     "curvature.edits[0].layers: layers [1] have no K-FAC factors"),
    ({"edits": [{"method": "kfac_pairwise", "roles": ["q"]}]}, "curvature.edits[0].roles: roles ['q'] are not collected"),
    ({"spectrum": {"bands": [0.5, 0.25]}}, "curvature.spectrum.bands"),
])
def test_bad_edit_settings_fail_naming_the_key(section, message):
    curv = _curv(**section)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        settings.check(curv)
        settings.expand_edits(curv, n_layers=2)


@pytest.mark.parametrize("section,key", [
    ({"data": {"labels": "argmax"}}, "curvature.data.labels"),
    ({"edits": [{"method": "svd", "strength": 1.5}]}, "curvature.edits.0.strength"),
    ({"edits": [{"method": "lora"}]}, "curvature.edits.0.method"),
    ({"sweeps": {"strength": {"rho": [0.5]}}}, "curvature.sweeps.strength"),
    ({"data": {"max_tokens": 0}}, "curvature.data.max_tokens"),
])
def test_schema_rejects_bad_values_naming_the_key(section, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config({"curvature": section})


# ------------------------------------------------------------------------------------ report


def _metrics(rows):
    base = {"model": "m", "n_examples": 10, "exact_er": 0.0, "fractional_er": 0.0, "avg_levenshtein": 0.0, "mem_loss": 1.0}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_edit_table_has_specs_ratios_forms_and_the_paper_marks():
    metrics = _metrics([
        {"edit": "none", "method": "Origin", "heldout_ppl": 10.0, "strict_accuracy": 1.0, "loose_accuracy": 1.0},
        {"edit": "k1", "method": "K-FAC", "heldout_ppl": 11.0, "strict_accuracy": 0.2, "loose_accuracy": 0.5},
        {"edit": "k2", "method": "K-FAC", "heldout_ppl": 12.0, "strict_accuracy": 0.0, "loose_accuracy": 0.1},
        {"edit": "k3", "method": "K-FAC", "heldout_ppl": 30.0, "strict_accuracy": 0.0, "loose_accuracy": 0.0},
        {"edit": "s1", "method": "SVD", "heldout_ppl": 11.3, "strict_accuracy": 0.6, "loose_accuracy": 0.8},
        {"edit": "orphan", "method": "SVD", "heldout_ppl": 11.3, "strict_accuracy": 0.6, "loose_accuracy": 0.8},
    ])
    spec = lambda m, s, layers=(0,): {"method": m, "layers": list(layers), "roles": None, "strength": s}  # noqa: E731
    specs = {"k1": spec("kfac", 0.8, (0, 1, 2)), "k2": spec("kfac_pairwise", 0.5), "k3": spec("kfac_factor", 0.3),
             "s1": spec("svd", 0.2, (0, 1, 2))}
    table = report.edit_table(metrics, specs)
    assert len(table) == 5  # an edit without a spec (not a curvature edit) is left out
    by = table.set_index("edit")
    assert by["ppl_ratio"].tolist() == pytest.approx([1.0, 1.2, 3.0, 1.1, 1.13])
    assert by.loc["k2", "form"] == "pairwise" and by.loc["k3", "form"] == "per-factor" and by.loc["s1", "kind"] == "svd"
    assert by.loc["k1", "paper_label"] == "K-FAC (paper: 80% energy, MLPs 0-2)"
    assert by.loc["s1", "paper_label"] == "SVD (paper: top 20%, MLPs 0-2)" and by.loc["k2", "paper"] == ""
    md = report.curvature_markdown(table, {"max_ppl_ratio": 1.5, "min_ndcg10": None})
    assert "| K-FAC | pairwise | k2 | 0 | all | 0.5 |  | 12.00 | 1.200 |" in md
    assert "| K-FAC | per-factor | k3 |" in md and "| K-FAC | projector | k1 | 0,1,2 | all | 0.8 | setting |" in md
    # no validation slice in these metrics: nothing is chosen, the test split is never read instead
    assert "the memorized track has no validation slice" in md and "suppresses more" not in md
    assert math.isnan(table["ndcg10"].iloc[0])  # column shown as '-' until evaluate provides it


# ------------------------------------------------------------------------------------ DAG paths


def _planned_outputs(tmp_path, name, curvature):
    """Output paths of the curvature jobs a dry run of the tiny config plans (from an empty dir)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((repo / "tests" / "tiny_config.yaml").read_text())
    cfg["curvature"] = curvature
    work = tmp_path / name
    (work / "config").mkdir(parents=True)
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(work), "-n",
         "results/tables/curvature.md"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs, rule = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith(("rule ", "localrule ")):
            rule = line.split()[1].rstrip(":")
        elif line.strip().startswith("output:") and rule in {"collect_kfac", "decompose_kfac", "apply_edit", "kfac_spectrum"}:
            jobs.setdefault(rule, set()).update(p.strip() for p in line.split(":", 1)[1].split(","))
    return jobs


@pytest.mark.slow  # starts Snakemake (a workflow parse: 5-30 s)
def test_changing_one_edit_changes_only_that_edit_path_and_data_changes_only_kfac(tmp_path):
    base = {"data": {"max_tokens": 3000}, "edits": [
        {"method": "kfac", "layers": [0], "strength": 0.8}, {"method": "svd", "layers": [0], "strength": 0.5}]}
    a = _planned_outputs(tmp_path, "a", base)
    changed = json.loads(json.dumps(base))
    changed["edits"][0]["strength"] = 0.7
    b = _planned_outputs(tmp_path, "b", changed)
    assert len(a["apply_edit"]) == 2
    assert a["collect_kfac"] == b["collect_kfac"] and a["decompose_kfac"] == b["decompose_kfac"]
    assert len(a["apply_edit"] & b["apply_edit"]) == 1  # the SVD edit keeps its path
    more_data = json.loads(json.dumps(base))
    more_data["data"]["max_tokens"] = 6000
    c = _planned_outputs(tmp_path, "c", more_data)
    assert not a["collect_kfac"] & c["collect_kfac"]
    svd = {p for p in a["apply_edit"] if "/svd-" in p}
    assert len(svd) == 1 and svd <= c["apply_edit"] and len(a["apply_edit"] & c["apply_edit"]) == 1


def test_spectrum_with_an_empty_memorized_set_writes_an_empty_table(tiny_model, tmp_path):
    from memctl.curvature.spectrum import plot_spectrum, spectrum_table
    from memctl.curvature.store import Eigen, Eigenbases

    targets = arch.linear_targets(tiny_model, roles=["down"], layers=[0])
    t = targets[0]
    eig = Eigenbases(targets, {t.input_key: Eigen(torch.arange(t.d_in, 0, -1.0), torch.eye(t.d_in))},
                     {t.name: Eigen(torch.arange(t.d_out, 0, -1.0) * 1.01, torch.eye(t.d_out))}, 1)
    non = pd.DataFrame({"prefix_ids": [[1, 2, 3]], "suffix_ids": [[4, 5]]})
    table = spectrum_table(tiny_model, eig, targets, non.iloc[:0], non, {})
    assert table.empty and "ratio_memorized_over_nonmemorized" in table.columns
    plot_spectrum(table, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000
    full = spectrum_table(tiny_model, eig, targets, non, non, {"bands": [0.5]})
    assert len(full) == 2 * 2 and np.allclose(full["ratio_memorized_over_nonmemorized"], 1.0)


def test_curvature_report_chooses_on_validation_and_tests_the_chosen_points(tmp_path):
    """The command end to end on constructed metrics, scores and deltas. Layer 0: (k1, s1) look best
    on the test split, (k2, s2) on the validation slice; the declared rule (PPL budget 1.5, no nDCG
    budget) picks (k2, s2) and tests them against each other and the unedited model on the same 20
    test sequences: SVD reproduces k2's 6 and 6 more, so McNemar has 0 vs 6 discordant, p = 2 / 2^6
    = 0.031; against the unedited model (20 of 20) k2 has 14 discordant, p = 2 / 2^14. The held-out
    windows 0-3 of 8 select (ratio = the edit's PPL ratio), 4-7 report (k2 and s2 both 1.0)."""
    from memctl.edits import save_delta

    val = {"none": 1.0, "k1": 0.5, "s1": 0.5, "k2": 0.1, "s2": 0.2}
    ppl = {"none": 10.0, "k1": 11.0, "s1": 11.2, "k2": 12.0, "s2": 12.2}
    strict = {"none": 20, "k1": 0, "s1": 2, "k2": 6, "s2": 12}
    paths = {"metrics": [], "scores": [], "deltas": []}
    for edit in strict:
        m = _metrics([{"edit": edit, "method": {"n": "Origin", "k": "K-FAC", "s": "SVD"}[edit[0]],
                       "heldout_ppl": ppl[edit], "strict_accuracy": strict[edit] / 20, "exact_er": strict[edit] / 20,
                       "loose_accuracy": strict[edit] / 20, "n_examples": 20, "val_n_examples": 20,
                       "val_exact_er": val[edit], "val_loose_accuracy": val[edit], "ndcg10_text": 0.95}])
        k = strict[edit]
        mem = pd.DataFrame({"track": "memorized", "candidate_id": [f"c{i}" for i in range(20)],
                            "exact_match": [i < k for i in range(20)], "n_match": [8 if i < k else 0 for i in range(20)],
                            "n_suffix": 8, "levenshtein_norm": [0.0 if i < k else 1.0 for i in range(20)],
                            "levenshtein_sim": [1.0 if i < k else 0.0 for i in range(20)],
                            "generated_ids": [[1, 2] for _ in range(20)]})
        held = pd.DataFrame({"track": "heldout", "window": range(8), "n_tokens": 63,
                             "nll_sum": [100.0 + (63 * math.log(ppl[edit] / 10.0) if w < 4 else 0.0) for w in range(8)]})
        (tmp_path / edit).mkdir()
        m.to_parquet(tmp_path / edit / "metrics.parquet")
        pd.concat([mem, held], ignore_index=True).to_parquet(tmp_path / edit / "scores.parquet")
        paths["metrics"].append(str(tmp_path / edit / "metrics.parquet"))
        paths["scores"].append(str(tmp_path / edit / "scores.parquet"))
        if edit != "none":
            spec = {"method": "svd" if edit[0] == "s" else "kfac", "layers": [0], "roles": None, "groups": ["mlp"],
                    "strength": {"1": 0.5, "2": 0.3}[edit[1]], "label": "x"}
            save_delta(tmp_path / edit / "delta.safetensors", replace={"w": torch.zeros(1)},
                       metadata={"edit_id": edit, "spec": spec})
            paths["deltas"].append(str(tmp_path / edit / "delta.safetensors"))
    out = tmp_path / "out"
    main(["curvature-report", "--metrics", *paths["metrics"], "--scores", *paths["scores"], "--deltas", *paths["deltas"],
          "--settings", json.dumps({"max_ppl_ratio": 1.5, "min_ndcg10": None}), "--out-dir", str(out)])
    md = (out / "curvature.md").read_text()
    assert "held-out windows 0-3 of 8 (selection) for the budget; windows 4-7 (report)" in md
    assert "| K-FAC | k2 | projector | 0 | 0.3 | 0.100 | 2/20 | 1.200 | 0.950 | within the budget |" in md
    assert "| SVD | s2 | svd | 0 | 0.3 | 0.200 | 4/20 | 1.220 | 0.950 | within the budget |" in md
    assert ("- Memorized track, test split (N=20): Exact ER 0.300 vs 0.600: K-FAC lower (p=0.031) (exact McNemar; "
            "0 sequences only K-FAC reproduces, 6 only SVD)") in md
    assert "| K-FAC (chosen) | k2 | projector | 0 | 0.3 | 0.300 | 6/20 | [0.119, 0.543] | lower (p<0.001) |" in md
    # report windows: every edit equals the unedited model there
    assert "| K-FAC (chosen) | k2 | yes | 1.200 | 1.000 | [1.000, 1.000] | no evidence of a difference (p=1) |" in md
    table = pd.read_parquet(out / "curvature_edits.parquet").set_index("edit")
    assert table.loc["k2", "sel_ppl_ratio"] == pytest.approx(1.2) and table.loc["k2", "report_ppl_ratio"] == pytest.approx(1.0)
    assert table.loc["k1", "within_budget"] == "yes"
    assert (out / "curvature_sweep.png").stat().st_size > 10_000 and (out / "curvature.html").exists()


def test_examples_show_prefix_suffix_and_each_chosen_edits_generation():
    """Appendix D table by hand: three memorized sequences; K-FAC changes c2's continuation, SVD
    none; c2 comes first, then the unchanged ones in candidate order, all decoded."""
    memorized = pd.DataFrame({"candidate_id": ["c1", "c2", "c3"], "prefix_ids": [[1, 2], [3, 4], [5, 6]],
                              "suffix_ids": [[7, 8], [9, 10], [11, 12]]})

    def gen(rows):
        return pd.DataFrame({"track": "memorized", "candidate_id": ["c1", "c2", "c3"], "generated_ids": rows})

    scores = {"none": gen([[7, 8], [9, 10], [11, 12]]), "k": gen([[7, 8], [0, 0], [11, 12]]),
              "s": gen([[7, 8], [9, 10], [11, 12]])}
    pair = [{"edit": "k", "kind": "kfac"}, {"edit": "s", "kind": "svd"}]
    decode = lambda ids: " ".join(f"t{int(i)}" for i in ids)  # noqa: E731
    table = report.examples(pair, scores, memorized, decode, n=2)
    assert table["candidate_id"].tolist() == ["c2", "c1"]
    first = table.iloc[0]
    assert (first["prefix"], first["suffix"], first["none"], first["k"], first["s"]) == ("t3 t4", "t9 t10", "t9 t10", "t0 t0", "t9 t10")
    md = report.examples_markdown(table, pair)
    assert "| c2 | t3 t4 | t9 t10 | t9 t10 | t0 t0 | t9 t10 |" in md and "K-FAC (k)" in md
