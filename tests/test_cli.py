"""Stage commands: clear one-line errors on bad input, and the shared text / nDCG reference stages."""

import json

import pandas as pd
import pytest
from tiny_store import memctl_in_process


def memctl(*args):
    """``memctl ARGS``, run by the dispatcher in this process (exit code, stdout, stderr as a process's)."""
    return memctl_in_process(*args)


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


def test_calibration_and_ndcg_reference_commands(tmp_path, tiny_model_dir):
    """Calibration windows are a seeded random choice of full windows; the unedited model's own
    nDCG@10 against its reference is exactly 1, and an edit that changes the model lowers it."""
    import torch
    from safetensors.torch import load_file

    from memctl import architectures as arch
    from memctl.edits import save_delta
    from memctl.models import load_model

    text = tmp_path / "calib.txt"
    text.write_text("".join(f"{i}: the quick brown fox {i * 7} jumps over {i % 5} lazy dogs\n" for i in range(60)))
    settings = json.dumps({"source": "text", "path": str(text), "context_length": 16, "max_windows": 6, "seed": 1})
    for name in ("a", "b"):
        proc = memctl("calibration", "--model", str(tiny_model_dir), "--settings", settings, "--out", str(tmp_path / f"{name}.safetensors"))
        assert proc.returncode == 0, proc.stderr
    windows = load_file(tmp_path / "a.safetensors")["windows"]
    assert windows.shape == (6, 16) and torch.equal(windows, load_file(tmp_path / "b.safetensors")["windows"])
    assert len({tuple(w.tolist()) for w in windows}) == 6  # distinct windows, not one repeated

    ref = tmp_path / "top10.safetensors"
    proc = memctl("reference-topk", "--model", str(tiny_model_dir), "--heldout", str(tmp_path / "a.safetensors"),
                  "--settings", json.dumps({"ndcg_windows": 4}), "--out", str(ref))
    assert proc.returncode == 0, proc.stderr
    assert load_file(ref)["topk"].shape == (4, 16, 10)

    model = load_model(tiny_model_dir, {"source": "local"})
    target = arch.linear_targets(model, roles=["up"], layers=[0])[0]
    delta = save_delta(tmp_path / "delta.safetensors", replace={target.param_name: torch.zeros(target.d_out, target.d_in)})
    memorized = tmp_path / "mem.parquet"
    pd.DataFrame({"candidate_id": [0], "prefix_ids": [[5, 6, 7, 8]], "suffix_ids": [[9, 10]]}).to_parquet(memorized)
    ndcg = {}
    for edit, extra in (("none", []), ("zero-up", ["--delta", str(delta)])):
        out = tmp_path / edit
        proc = memctl("evaluate", "--model", str(tiny_model_dir), "--edit", edit, "--memorized", str(memorized),
                      "--heldout", str(tmp_path / "a.safetensors"), "--reference", str(ref),
                      "--settings", json.dumps({"ndcg_windows": 4}), "--out-dir", str(out), *extra)
        assert proc.returncode == 0, proc.stderr
        # held-out text windows (no --sequences reference here: the sequences column is NaN)
        ndcg[edit] = pd.read_parquet(out / "metrics.parquet")["ndcg10_text"].item()
    assert ndcg["none"] == pytest.approx(1.0)
    assert ndcg["zero-up"] < 0.99


# ------------------------------------------------------------------ registration (memctl.arguments)


def _planned_jobs(tmp_path):
    """(config, job) of every job the rules run for the tiny config, config/config.yaml and config/paper.yaml."""
    import tiny_store as ts

    from memctl import lab
    from memctl.config import read_yaml, workflow_config
    from memctl.plan import build_plan

    work = ts.make_workdir(tmp_path / "work")
    plans = {"tests/tiny_config.yaml": ts.plan_of(work)}
    for name in ("config/config.yaml", "config/paper.yaml"):
        path = ts.REPO / name
        cfg = workflow_config(read_yaml(path), [str(path)], {}, ts.REPO, ts.REPO)
        plans[name] = build_plan(cfg, lab.workflow_model_dims(cfg))
    for name, plan in plans.items():
        wanted = set(plan.artifacts())
        for job in plan.jobs():
            if wanted & set(job.outputs.values()):  # what `rule all` runs
                yield name, job


def test_every_stage_has_a_command_that_parses_its_rules_arguments(tmp_path):
    """Each planned job's command line, as its rule runs it, parses with the dispatcher's parser into
    the registry's subcommand and entry function; every stage of the registry is among them."""
    import shlex

    from memctl import stages
    from memctl.cli import build_parser

    parser, seen = build_parser(), set()
    for config, job in _planned_jobs(tmp_path):
        argv = shlex.split(job.command(threads=2))
        stage = stages.get(job.stage)
        assert argv[:2] == ["memctl", stage.command], (config, job.stage)
        args = parser.parse_args(argv[1:])
        assert (args.func.__module__, args.func.__name__) == (stage.module, stage.function), (config, job.stage)
        seen.add(job.stage)
    assert seen == set(stages.STAGES)


def test_subcommands_are_declared_through_the_one_helper():
    """No module adds a subparser or sets its function by hand: memctl.arguments.command does, and
    it is no stage's code."""
    from pathlib import Path

    import memctl

    src = Path(memctl.__file__).parent
    by_hand = [str(p.relative_to(src)) for p in sorted(src.rglob("*.py")) if p.name != "arguments.py"
               and (".add_parser(" in p.read_text(encoding="utf-8") or ".set_defaults(func=" in p.read_text(encoding="utf-8"))]
    assert by_hand == []
    # the command modules import it inside register(): how a command parses shapes no output, so it
    # stays out of every stage's code hash (memctl.stages.code_hash)
    from memctl import stages

    assert not [n for n in stages.STAGES if any(p.name == "arguments.py" for p in stages.code_files(n))]


def test_the_helper_builds_the_parser_argparse_would():
    import argparse

    from memctl.arguments import OUT_DIR, arg, command, settings_arg, threads_arg

    def run(args):
        return args

    by_hand = argparse.ArgumentParser(prog="m").add_subparsers()
    p = by_hand.add_parser("x", help="does x", description="long")
    p.add_argument("config")
    p.add_argument("--settings", required=True, help="JSON")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=run)
    helped = argparse.ArgumentParser(prog="m").add_subparsers()
    q = command(helped, "x", run, "does x", arg("config"), (settings_arg("JSON"), threads_arg()), OUT_DIR,
                description="long")
    assert q.format_help() == p.format_help()
    argv = ["c", "--settings", "{}", "--out-dir", "d"]
    assert vars(q.parse_args(argv)) == vars(p.parse_args(argv))
    assert helped.choices["x"] is q and by_hand._choices_actions[0].help == helped._choices_actions[0].help
