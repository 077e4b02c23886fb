"""The whole DAG on a tiny config: outputs, provenance, determinism, reruns and no-op reruns.

Most tests read the shared tiny store (fixture ``tiny_store``: every job of the tiny config's plan
run by hand, ``tests/tiny_store.py``). Tests of what Snakemake decides to rerun use a copy on which
Snakemake has recorded its metadata (``snakemake --touch --forceall``: the params and code hashes of
every job, as after a real run), so that a changed param or code hash is seen, not only a changed path.
"""

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
import yaml

from memctl.store import hash_path, verify

REPO = Path(__file__).resolve().parents[1]
TINY = Path(__file__).with_name("tiny_config.yaml")


def snakemake(workdir: Path, *args: str, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2", *args]
    # Rules call the `memctl` console script installed next to this Python.
    env = dict(os.environ if env is None else env,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        logs = "\n".join(p.read_text()[-3000:] for p in workdir.glob("results/logs/*/*.log"))
        pytest.fail(f"snakemake {' '.join(args)} failed:\n{proc.stderr[-5000:]}\n--- logs ---\n{logs}")
    return proc


@pytest.fixture(scope="module")
def tiny_run(tiny_store):
    """The shared tiny store, read only."""
    return tiny_store


@pytest.fixture(scope="module")
def recorded(tiny_store, tmp_path_factory):
    """A copy of the tiny store with Snakemake's metadata recorded for every job."""
    work = ts.copy(tiny_store, tmp_path_factory.mktemp("recorded") / "work")
    snakemake(work, "--touch", "--forceall", "--quiet")
    return work


def test_dag_produces_the_results_tables(tiny_run):
    tables = tiny_run / "results" / "tables"
    results = (tables / "results.md").read_text()
    assert "| Origin | none |" in results
    metrics = pd.read_parquet(tables / "results.parquet")
    assert metrics["heldout_ppl"].iloc[0] > 1
    assert metrics["n_examples"].iloc[0] > 0 and 0 <= metrics["exact_er"].iloc[0] <= 1
    by_copies = (tables / "extraction_by_copies.md").read_text()
    assert "canary-words" in by_copies and "corpus-window" in by_copies
    assert (tables / "extraction_by_copies.png").stat().st_size > 1000


def test_masks_table_has_the_csp_rows_and_the_cost_columns(tiny_run):
    table = pd.read_parquet(tiny_run / "results" / "tables" / "masks" / "table.parquet")
    rows = table.set_index("method")
    assert {"CSP (down)", "CSP (up)"} <= set(rows.index)
    assert rows.loc["CSP (down)", "sparsity"] == 0.0  # a soft prompt edits no weight
    trained = table[table["method"] != "Origin"]
    assert (trained["wall_time_s"] > 0).all() and set(trained["device"]) == {"cpu"}
    # 10 iterations x 4 er_train sequences of 64 tokens (tiny_config.yaml's csp section)
    assert rows.loc["CSP (up)", "tokens_processed"] == 10 * 4 * 64
    assert "| Wall time (s) | Device | Tokens |" in (tiny_run / "results" / "tables" / "masks" / "table.md").read_text()


def test_extraction_tables_are_consistent(tiny_run):
    (ext_dir,) = tiny_run.glob("results/demo-*/extract-*")
    ext = pd.read_parquet(ext_dir / "extraction.parquet")
    assert {"prefix_ids", "suffix_ids", "generated_ids", "exact_match", "match_positions", "levenshtein"} <= set(ext.columns)
    assert {"canary-words", "canary-digits", "corpus-window"} <= set(ext["group"])
    assert all(len(s) == 32 for s in ext["suffix_ids"])
    mem = pd.read_parquet(ext_dir / "memorized.parquet")
    non = pd.read_parquet(ext_dir / "nonmemorized.parquet")
    train = pd.read_parquet(ext_dir / "memorized_train.parquet")
    test = pd.read_parquet(ext_dir / "memorized_test.parquet")
    val = pd.read_parquet(ext_dir / "memorized_val.parquet")
    ood = pd.read_parquet(ext_dir / "ood.parquet")
    # the out-of-domain family (the quotes) is in no other table; every other candidate is in one
    assert len(ood) > 0 and set(ood["group"]) == {"canary-quotes"}
    assert len(mem) + len(non) + len(ood) == len(ext)
    dropped = json.loads((ext_dir / "extraction.parquet.meta.json").read_text())["dropped_for_test_overlap"]
    assert len(train) + len(val) + len(test) + dropped["memorized_train"] + dropped["memorized_val"] == len(mem)
    assert len(test) > 0
    # memorized_threshold 1.0 (default): memorized means the whole suffix came back exactly.
    assert mem["exact_match"].all() and not non["exact_match"].any()


def test_tiny_model_memorizes_by_copy_count(tiny_run):
    """Real memorization: canaries planted 16 times come back exactly, those planted once do not."""
    (ext_dir,) = tiny_run.glob("results/demo-*/extract-*")
    ext = pd.read_parquet(ext_dir / "extraction.parquet")
    canaries = ext[ext["group"].str.startswith("canary")]
    assert canaries.loc[canaries["planted_copies"] == 16, "exact_match"].all()
    assert not canaries.loc[canaries["planted_copies"] == 1, "exact_match"].any()


def test_every_artifact_has_sound_provenance(tiny_run):
    sidecars = list(tiny_run.glob("results/**/*.meta.json"))
    assert len(sidecars) >= 15
    for side in sidecars:
        artifact = side.with_name(side.name[: -len(".meta.json")])
        assert verify(artifact) == [], artifact


@pytest.mark.slow  # Snakemake on a copy of the tiny store with its metadata recorded
def test_second_run_does_nothing(recorded):
    proc = snakemake(recorded, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


@pytest.mark.slow  # Snakemake on a copy of the tiny store with its metadata recorded
def test_snakemake_report_shows_every_stage_with_captions(recorded, tmp_path):
    out = tmp_path / "report.html"
    snakemake(recorded, "--report", str(out))
    page = out.read_text()
    for category in ("Results", "Extraction", "Curvature", "Masks and pruning"):
        assert category in page
    for name in ("results.html", "extraction_by_copies.png", "curvature.html", "curvature_sweep.png", "table.html"):
        assert name in page
    assert "chosen by a rule declared in" in page  # a caption, rendered from workflow/report/


def scheduled(workdir: Path, tmp_path: Path, change=None, env: dict | None = None) -> dict[str, int]:
    """Jobs per rule that a dry run schedules after ``change(cfg)`` edits the workdir's config
    (``env``: the environment Snakemake runs in)."""
    cfg = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    if change:
        change(cfg)
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = snakemake(workdir, "-n", "--configfile", str(path), "--quiet", "rules", env=env).stdout
    jobs = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("job", "total", "all"):
            jobs[parts[0]] = int(parts[1])
    return jobs


@pytest.mark.slow  # Snakemake on a copy of the tiny store with its metadata recorded
def test_changing_evaluation_settings_reruns_only_evaluation(recorded, tmp_path):
    """Every edit is re-evaluated; the reports that read metrics follow; no edit or extraction reruns."""
    jobs = scheduled(recorded, tmp_path, lambda cfg: cfg["evaluate"].update(loose_threshold=0.5))
    assert set(jobs) == {"evaluate", "report", "curvature_report", "masks_report"}


@pytest.mark.slow  # Snakemake on a copy of the tiny store with its metadata recorded
def test_batch_sizes_rerun_nothing(recorded, tmp_path):
    """Batch sizes change speed and memory, not results: no job reruns (they reach the commands
    as flags from the rules' resources, outside the params)."""
    def change(cfg):
        cfg["extract"]["batch_size"] = 7
        cfg["evaluate"].update(batch_size=5, heldout_batch_size=3)

    assert scheduled(recorded, tmp_path, change) == {}


@pytest.mark.slow  # Snakemake on a copy of the tiny store with its metadata recorded
def test_changing_one_edit_strength_reruns_only_that_edit(recorded, tmp_path):
    def change(cfg):
        cfg["curvature"]["edits"][0]["strength"] = 0.7

    jobs = scheduled(recorded, tmp_path, change)
    assert jobs == {"apply_edit": 1, "evaluate": 1, "curvature_report": 1, "report": 1}


@pytest.mark.slow  # Snakemake on a copy of the tiny store with its metadata recorded
def test_changing_the_curvature_data_budget_reruns_the_curvature_stages_only(recorded, tmp_path):
    jobs = scheduled(recorded, tmp_path, lambda cfg: cfg["curvature"]["data"].update(max_tokens=2000))
    kfac_edits = sum(e["method"] != "svd" for e in yaml.safe_load(TINY.read_text())["curvature"]["edits"])
    # the tiny store collects in two shards (tests/tiny_store.py), merged into one set of factors
    assert jobs["collect_kfac"] == 2 and jobs["merge_kfac"] == 1 and jobs["decompose_kfac"] == 1
    assert jobs["apply_edit"] == kfac_edits  # SVD edits do not use the factors
    assert not {"extract", "candidates", "demo_pretrain", "train_mask", "prune_baseline", "balanced_subnet"} & set(jobs)


@pytest.mark.slow  # Snakemake on a copy of the tiny store with its metadata recorded
def test_editing_one_stage_module_reruns_that_stage_and_its_dependants(recorded, tmp_path):
    """Rules run `memctl` commands: each carries a hash of its stage's modules as a param. The
    edit is made to a copy of the package that Snakemake imports first (PYTHONPATH), never to the
    checkout: a test killed halfway leaves no change behind, and other test sessions never see it."""
    import shutil

    import memctl

    package = tmp_path / "package"
    shutil.copytree(Path(memctl.__file__).parent, package / "memctl", ignore=shutil.ignore_patterns("__pycache__"))
    module = package / "memctl" / "curvature" / "decompose.py"
    module.write_bytes(module.read_bytes() + b"\n# an edit to the decomposition code\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(package), os.environ.get("PYTHONPATH")])))
    jobs = scheduled(recorded, tmp_path, env=env)
    assert jobs["decompose_kfac"] == 1 and "collect_kfac" not in jobs
    assert {"apply_edit", "evaluate", "curvature_report", "report"} <= set(jobs)
    assert not {"extract", "train_mask", "prune_baseline", "demo_pretrain", "heldout"} & set(jobs)
    assert scheduled(recorded, tmp_path) == {}  # the checkout's code: nothing to do


@pytest.mark.slow
def test_same_config_gives_identical_artifacts(tiny_run, tmp_path):
    """Determinism: a second working directory with the same config reproduces every table."""
    other = tmp_path / "again"
    ts.build(other, yaml.safe_load((tiny_run / "config" / "config.yaml").read_text()))
    # train_log.parquet records tokens/s (wall-clock), everything else must match byte for byte.
    tables = sorted(
        p.relative_to(tiny_run) for p in tiny_run.glob("results/**/*.parquet") if p.name != "train_log.parquet"
    )
    assert len(tables) >= 12
    for rel in tables:
        if rel.parts[:3] == ("results", "tables", "masks"):
            # the masks tables carry each edit's measured wall time (the paper's cost column):
            # everything else in them must match exactly
            a, b = pd.read_parquet(tiny_run / rel), pd.read_parquet(other / rel)
            timed = [c for c in a.columns if c.startswith("wall_time")]
            pd.testing.assert_frame_equal(a.drop(columns=timed), b.drop(columns=timed), obj=str(rel))
            continue
        assert hash_path(tiny_run / rel) == hash_path(other / rel), rel
    (model,) = (p for p in tiny_run.glob("results/demo/model-*") if p.is_dir())
    assert hash_path(model / "model.safetensors") == hash_path(other / model.relative_to(tiny_run) / "model.safetensors")


@pytest.mark.slow  # a second store: every job of a local model's plan
def test_dag_on_a_local_hf_model_with_file_sources(tmp_path, tiny_model_dir, tiny_model, tiny_tokenizer):
    """The cluster path: model.source local (as a hub id would be), parquet candidates without
    exposure counts, held-out plain text. Suffixes that are the model's own greedy continuations
    must come out memorized, shifted ones not."""
    from memctl.generation import greedy_generate

    rng = np.random.default_rng(0)
    prefixes = rng.integers(1, 250, size=(12, 32))
    own = greedy_generate(tiny_model, list(prefixes), 32, tiny_tokenizer.pad_token_id, progress=False)
    suffixes = [own[i] if i % 2 == 0 else (own[i] + 1) % 250 for i in range(12)]
    pd.DataFrame(
        {"id": [f"s{i}" for i in range(12)], "prefix_ids": list(prefixes), "suffix_ids": suffixes}
    ).to_parquet(tmp_path / "cands.parquet")
    # one text for held-out and calibration, as `memctl init` writes it without --calibration: the
    # calibration stage drops the held-out windows (random words: no 16-token run repeats by chance)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=5)) for _ in range(600)]
    (tmp_path / "heldout.txt").write_text(" ".join(words))
    work = tmp_path / "work"
    (work / "config").mkdir(parents=True)
    cfg = {
        "model": {"source": "local", "name_or_path": str(tiny_model_dir)},
        "candidates": {"source": "parquet", "path": str(tmp_path / "cands.parquet")},
        "extract": {"preset": "32/32", "test_fraction": 0.5},
        "heldout": {"source": "text", "path": str(tmp_path / "heldout.txt"), "max_windows": 8},
        "calibration": {"source": "text", "path": str(tmp_path / "heldout.txt")},
        "resources": {"threads": 1},
        # One job of each edit family (every rule runs), a few steps each: this test is about the
        # model and data sources, not the methods' defaults (1000 mask steps per mode, sweeps).
        "curvature": {"data": {"max_tokens": 1000, "batch_size": 4},
                      "edits": [{"method": "kfac", "layers": [0], "strength": 0.8}]},
        # 4 steps cannot train a mask: flagged "did not converge" instead of failing the run
        "masks": {"modes": ["down"], "steps": 4, "batch_size": 4, "mem_batch_size": 4, "log_every": 2,
                  "checkpoint_every": 2, "on_unconverged": "flag",
                  "sweep": {"sparsities": [], "thresholds": [], "baselines": False}},
        "pruning": {"methods": ["wanda"], "calibration_windows": 4, "batch_size": 4, "block_size": 32,
                    "balanced_subnet": {"epochs": 1, "batch_size": 8, "on_unconverged": "flag"}},
    }
    ts.build(work, cfg)  # every job of the plan, by hand (tests/test_contracts.py: the rules run the same)
    (ext_dir,) = work.glob(f"results/{tiny_model_dir.name}/extract-*")
    assert sorted(pd.read_parquet(ext_dir / "memorized.parquet")["candidate_id"]) == sorted(
        f"s{i}" for i in range(0, 12, 2)
    )
    metrics = pd.read_parquet(work / "results" / "tables" / "results.parquet").iloc[0]
    assert metrics["model"] == tiny_model_dir.name and metrics["n_examples"] == 3
    assert metrics["exact_er"] == 1.0 and metrics["heldout_tokens"] > 0
    assert "| all | unknown | 12 | 0.500 |" in (work / "results" / "tables" / "extraction_by_copies.md").read_text()
    # the held-out windows (the text's first 8, of 64 - 20 tokens: CSP's prompt is reserved) are no
    # calibration text: the calibration windows (64 tokens) they cover, and the one they end in
    # (32 of its tokens are held-out text, more than a 16-token run), were dropped
    (held_dir,) = work.glob(f"results/{tiny_model_dir.name}/heldout-*")
    held = json.loads((held_dir / "windows.safetensors.meta.json").read_text())
    assert (held["windows"], held["context_length"]) == (8, 44)
    (cal_dir,) = work.glob(f"results/{tiny_model_dir.name}/calibration-*")
    prov = json.loads((cal_dir / "windows.safetensors.meta.json").read_text())
    assert prov["context_length"] == 64 and prov["dropped_for_heldout_overlap"]["windows"] == 8 * 44 // 64 + 1
    assert prov["windows"] == prov["dropped_for_heldout_overlap"]["of"] - 6 > 0
