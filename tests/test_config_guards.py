"""Configs that would cost the user their files, or compute, are refused before any job runs, with a
message naming the file, the key and the value (issue 21, items 1, 5 and 6):

- ``root`` / ``results_dir`` at ``/``, a system directory, the home directory, the project checkout or
  an ancestor of it, or a tables directory holding the store (the project tree is hashed before and
  after: nothing in it changes);
- a file given to ``extends:`` (or as the config) that is not a YAML mapping: a binary, a list, text
  that is not YAML;
- a local model directory without ``config.json``;
- JSON lines / text with a UTF-8 byte-order mark (read, as without one);
- counts past their bounds, and numbers YAML reads as text (``1e12``) or as floats (``1.0e+12``);
- YAML with a key twice; two edits with one label.
"""

from __future__ import annotations

import hashlib
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from memctl import lab
from memctl.cli import main
from memctl.config import (
    ConfigError,
    load_config,
    load_schema,
    parse_settings,
    validate_config,
    workflow_config,
)
from memctl.plan import build_plan

REPO = Path(__file__).resolve().parents[1]
TINY = Path(__file__).with_name("tiny_config.yaml")


def tiny_raw() -> dict:
    return yaml.safe_load(TINY.read_text())


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of the project checkout (Snakefile, workflow/, config/, envs/) and a user's notes."""
    proj = tmp_path / "project"
    proj.mkdir()
    shutil.copy(REPO / "Snakefile", proj / "Snakefile")
    for name in ("workflow", "config", "envs"):
        shutil.copytree(REPO / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    (proj / "notes.md").write_text("my notes\n")
    return proj


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (and the list of directories): what must not change."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def dry_run(project: Path, config: Path) -> subprocess.CompletedProcess:
    """``snakemake -n`` of the project copy, run from it, with ``config`` as the config file."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(config)],
                          cwd=project, capture_output=True, text=True, timeout=300, env=env)


# ------------------------------------------------------------------------ where the store may live


def _guard_cases(project: Path, home: Path) -> dict[str, tuple[dict, str]]:
    (project / "etc-link").symlink_to("/etc")
    return {
        "results_dir .": ({"results_dir": "."},
                          f"results_dir: '.' (resolves to {project}) is the project checkout {project}: the store would "
                          "hold its files"),
        "root .": ({"root": ".", "results_dir": "/tmp/elsewhere-tables"}, f"root: '.' (resolves to {project}) is the "
                                                                          f"project checkout {project}"),
        "root /": ({"root": "/"}, "root: '/' is the filesystem root /; point root at a directory of its own"),
        "root /etc": ({"root": "/etc"}, "root: '/etc' is the system directory /etc"),
        "root in /usr": ({"root": "/usr/local/memctl"}, "root: '/usr/local/memctl' is inside the system directory /usr"),
        "results_dir /var": ({"results_dir": "/var"}, "results_dir: '/var' is the system directory /var"),
        "root a symlink to /etc": ({"root": "etc-link/memctl"},
                                   "root: 'etc-link/memctl' (resolves to /etc/memctl) is inside the system directory /etc"),
        "root the project": ({"root": str(project)}, f"root: '{project}' is the project checkout {project}"),
        "root above the project": ({"root": str(project.parent)},
                                   f"root: '{project.parent}' is an ancestor of the project checkout {project}"),
        "root the home directory": ({"root": str(home)}, f"root: '{home}' is your home directory {home}"),
        "results_dir is the store": ({"root": "store", "results_dir": "store"},
                                     "results_dir: 'store' is the store itself (root: 'store')"),
        "results_dir holds the store": ({"root": "out/store", "results_dir": "out"},
                                        "results_dir: 'out' holds the whole store (root: 'out/store')"),
    }


GUARD_CASES = ["results_dir .", "root .", "root /", "root /etc", "root in /usr", "results_dir /var",
               "root a symlink to /etc", "root the project", "root above the project", "root the home directory",
               "results_dir is the store", "results_dir holds the store"]


@pytest.mark.parametrize("case", GUARD_CASES)
def test_a_store_over_the_project_or_the_system_is_refused_naming_key_value_and_reason(case, project, tmp_path,
                                                                                        monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(project)
    cases = _guard_cases(project, home)
    assert sorted(cases) == sorted(GUARD_CASES)
    before = tree_hashes(project)
    changes, expected = cases[case]
    raw = {**tiny_raw(), **changes}
    with pytest.raises(ConfigError) as err:
        validate_config(raw, workdir=project, basedir=project)
    assert expected in str(err.value)
    # the same from the working directory alone (memctl validate-config, the plan's own check)
    with pytest.raises(ConfigError, match="a directory of its own"):
        validate_config(raw)
    before.pop("etc-link")  # made by _guard_cases
    after = tree_hashes(project)
    after.pop("etc-link")
    assert after == before


def test_a_store_inside_the_project_or_elsewhere_is_fine(project, tmp_path, monkeypatch):
    monkeypatch.chdir(project)
    for changes in ({}, {"root": str(tmp_path / "store"), "results_dir": str(tmp_path / "tables")},
                    {"root": "/tmp/memctl-store-x", "results_dir": "results/tables"}):
        cfg = validate_config({**tiny_raw(), **changes}, workdir=project, basedir=project)
        assert cfg["root"] == changes.get("root", "results")


def test_the_checkout_memctl_runs_from_is_protected_from_anywhere(tmp_path, monkeypatch):
    """From a working directory that is no project, the checkout this memctl is installed from
    (editable) is still refused as a store."""
    import memctl.config

    if Path(memctl.config.__file__).resolve().parents[2] != REPO:
        pytest.skip("memctl is not installed editable from this checkout")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"root: '{REPO}' is the project checkout {REPO}"):
        validate_config({**tiny_raw(), "root": str(REPO)})
    # (a checkout cloned straight into /tmp has a system directory as its parent: refused as that)
    reason = "(an ancestor of the project checkout|the system directory)"
    with pytest.raises(ConfigError, match=f"results_dir: '{re.escape(str(REPO.parent))}' is {reason}"):
        validate_config({**tiny_raw(), "results_dir": str(REPO.parent)})


def test_the_plan_refuses_a_store_at_the_root_even_if_validation_was_skipped(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = validate_config(tiny_raw())
    for key, value, expected in (("root", "/", "root: '/' is the filesystem root /"),
                                 ("results_dir", ".", f"results_dir: '.' (resolves to {REPO}) is the project checkout")):
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            build_plan({**cfg, key: value}, lab.workflow_model_dims(cfg), python_version="3.11")


@pytest.mark.slow  # starts Snakemake (a workflow parse: 5-30 s)
@pytest.mark.parametrize("key, value", [("results_dir", "."), ("root", "/")])
def test_snakemake_refuses_the_store_before_any_job_and_the_project_is_untouched(key, value, project):
    bad = project / "bad.yaml"
    bad.write_text(f'extends: config/config.yaml\n{key}: "{value}"\n')
    before = tree_hashes(project)
    proc = dry_run(project, bad)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    reason = "is the project checkout" if value == "." else "is the filesystem root /"
    assert f"{key}: '{value}'" in out and reason in out, out[-3000:]
    assert "Job stats" not in out and "rule " not in out  # refused while parsing: no job planned
    assert tree_hashes(project) == before


def test_memctl_validate_config_refuses_root_etc(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    (project / "bad.yaml").write_text("extends: config/config.yaml\nroot: /etc\n")
    before = tree_hashes(project)
    with pytest.raises(SystemExit) as exc:
        main(["validate-config", "bad.yaml"])
    assert exc.value.code == 2
    assert "root: '/etc' is the system directory /etc" in capsys.readouterr().err
    assert tree_hashes(project) == before


# ------------------------------------------------------------------ files that are not a config


def _binary(path: Path) -> Path:
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    return path


NOT_A_CONFIG = {
    "a binary": (_binary, r"not a YAML config: not UTF-8 text \(byte 0x"),
    "a YAML list": (lambda p: p.write_text("- a\n- b\n") and p, "a config must be a mapping of sections, got list"),
    "not YAML": (lambda p: p.write_text("model: {source: [demo\n") and p, "not valid YAML"),
    "NUL bytes": (lambda p: p.write_bytes(b"model: {}\n\x00\x00") and p, "not valid YAML"),
}


@pytest.mark.parametrize("case", NOT_A_CONFIG)
def test_extends_of_a_file_that_is_not_a_config_names_it(case, tmp_path):
    make, expected = NOT_A_CONFIG[case]
    target = make(tmp_path / "base.yaml")
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {target}\n")
    with pytest.raises(ConfigError, match=rf"extends: {target}: {target}: .*{expected}"):
        load_config(child)
    with pytest.raises(ConfigError, match=rf"{target}: .*{expected}"):  # given as the config itself
        load_config(target)


@pytest.mark.skipif(not Path("/bin/ls").is_file(), reason="no /bin/ls")
def test_extends_bin_ls_is_a_message_not_a_unicode_error(tmp_path, capsys):
    child = tmp_path / "child.yaml"
    child.write_text("extends: /bin/ls\n")
    with pytest.raises(SystemExit) as exc:
        main(["validate-config", str(child)])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "memctl validate-config: error: extends: /bin/ls: " in err and "not UTF-8 text" in err
    assert "Traceback" not in err and "UnicodeDecodeError" not in err


# --------------------------------------------------------------------- a model that is not one


def _local_raw(model_dir: Path, data: Path) -> dict:
    data.mkdir(parents=True, exist_ok=True)
    (data / "c.jsonl").write_text(json.dumps({"tokens": list(range(1, 80))}) + "\n")
    (data / "wiki.txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    (data / "c4.txt").write_text("A stitch in time saves nine, and a rolling stone gathers no moss. " * 40)
    return {"root": str(data / "results"), "results_dir": str(data / "results" / "tables"),
            "model": {"source": "local", "name_or_path": str(model_dir)},
            "candidates": {"source": "jsonl", "path": str(data / "c.jsonl")},
            "heldout": {"source": "text", "path": str(data / "wiki.txt"), "max_windows": 4},
            "calibration": {"source": "text", "path": str(data / "c4.txt"), "max_windows": 4}}


MODEL_DIRS = {
    "no config.json": (lambda d: (d / "model.safetensors").write_bytes(b"{}"),
                       "has no config.json (the model's architecture and dimensions)"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{not json"), "config.json is not a readable JSON"),
    "config.json without dimensions": (lambda d: (d / "config.json").write_text('{"model_type": "gpt2"}'),
                                       "config.json has no hidden size, layer count, attention heads, vocabulary size"),
    "no such directory": (None, ": no such directory"),
}


@pytest.mark.parametrize("case", MODEL_DIRS)
def test_a_local_model_directory_without_its_config_is_refused_when_planning(case, tmp_path):
    make, expected = MODEL_DIRS[case]
    model = tmp_path / "my-model"
    if make is not None:
        model.mkdir()
        make(model)
    cfg = validate_config(_local_raw(model, tmp_path / "data"))
    with pytest.raises(ConfigError) as err:
        lab.workflow_model_dims(cfg)
    assert f"model.name_or_path: {model}" in str(err.value) and expected in str(err.value)


@pytest.mark.slow  # starts Snakemake (a workflow parse: 5-30 s)
def test_snakemake_names_a_model_directory_without_config_json(project, tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"{}")
    config = tmp_path / "local.yaml"
    config.write_text(yaml.safe_dump(_local_raw(model, tmp_path / "data")))
    proc = dry_run(project, config)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"model.name_or_path: {model} has no config.json" in out, out[-3000:]
    assert "Traceback" not in out and "Job stats" not in out
    assert not (tmp_path / "data" / "results").exists()


def test_a_command_names_a_model_directory_without_config_json(tmp_path, capsys):
    model = tmp_path / "my-model"
    model.mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["heldout", "--model", str(model), "--model-settings", '{"source": "local"}',
              "--settings", '{"source": "text", "path": "x.txt"}', "--out", str(tmp_path / "w.safetensors")])
    assert exc.value.code == 2
    assert f"{model}: no config.json in the model directory" in capsys.readouterr().err
    assert not (tmp_path / "w.safetensors").exists()


# ---------------------------------------------------------------------------- byte-order marks

BOM = b"\xef\xbb\xbf"


def test_jsonl_and_text_with_a_byte_order_mark_read_as_without(tmp_path, tiny_tokenizer):
    from memctl.data import build_candidates, heldout_texts

    rows = b"".join(json.dumps({"tokens": list(range(1 + i, 12 + i))}).encode() + b"\n" for i in range(3))
    (tmp_path / "plain.jsonl").write_bytes(rows)
    (tmp_path / "bom.jsonl").write_bytes(BOM + rows)
    tables = [build_candidates({"source": "jsonl", "path": str(tmp_path / name), "seed": 0}, tiny_tokenizer, 4, 3,
                               vocab_size=len(tiny_tokenizer)) for name in ("plain.jsonl", "bom.jsonl")]
    tables = [table.drop(columns="source") for table, _stats in tables]  # `source` names the file read
    pd.testing.assert_frame_equal(tables[0], tables[1])
    assert len(tables[1]) == 3
    text = "The quick brown fox. " * 5
    (tmp_path / "w.txt").write_bytes(BOM + text.encode())
    assert heldout_texts({"source": "text", "path": str(tmp_path / "w.txt")})[0] == [text]
    (tmp_path / "w.jsonl").write_bytes(BOM + json.dumps({"text": text}).encode() + b"\n")
    assert heldout_texts({"source": "jsonl", "path": str(tmp_path / "w.jsonl")})[0] == [text]


def test_a_config_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(BOM + TINY.read_bytes())
    assert load_config(path)["demo"]["train"]["steps"] == tiny_raw()["demo"]["train"]["steps"]


# ------------------------------------------------------------------------------ absurd counts


ABSURD = {
    # YAML 1.1 reads exponent numbers without a point and a sign as text
    "steps: 1e12": ("masks: {steps: 1e12}",
                    "masks.steps: '1e12' is not of type 'integer', 'null' (YAML reads 1e12 as text, not a number: write a "
                    "whole number (at most 10,000,000))"),
    "steps: 1.0e12": ("masks: {steps: 1.0e12}", "masks.steps: '1.0e12' is not of type 'integer', 'null' (YAML reads "
                                                "1.0e12 as text"),
    "steps: 1.0e+12": ("masks: {steps: 1.0e+12}", "masks.steps: 1000000000000.0 is greater than the maximum of 10000000"),
    "steps: 10**12": ("demo: {train: {steps: 1000000000000}}",
                      "demo.train.steps: 1000000000000 is greater than the maximum of 10000000"),
    "batch_size: 1e20": ("extract: {batch_size: 1e20}",
                         "extract.batch_size: '1e20' is not of type 'integer' (YAML reads 1e20 as text, not a number: "
                         "write a whole number (at most 1,048,576))"),
    "batch_size: 1.0e+20": ("evaluate: {batch_size: 1.0e+20}",
                            "evaluate.batch_size: 1e+20 is greater than the maximum of 1048576"),
    "a float count": ("masks: {log_every: 4.0}", "masks.log_every: 4.0 is not of type 'integer' (a count: write a whole "
                                                 "number (at most 10,000,000), e.g. 4, without a decimal point"),
    "lr: 1e-3": ("masks: {lr: 1e-3}", "masks.lr: '1e-3' is not of type 'number', 'null' (YAML reads 1e-3 as text, not "
                                      "a number: write 0.001)"),
    "a huge seed": ("masks: {seeds: [0, 99999999999]}", "masks.seeds.1: 99999999999 is greater than the maximum of "
                                                        "4294967295"),
}


@pytest.mark.parametrize("case", ABSURD)
def test_absurd_or_ambiguous_counts_are_refused_naming_the_key(case, tmp_path):
    text, expected = ABSURD[case]
    path = tmp_path / "absurd.yaml"
    path.write_text(f"extends: {TINY}\n{text}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"invalid {path}" in str(err.value)
    assert expected in str(err.value)


def _integers(node, path=()):
    if not isinstance(node, dict):
        return
    types = node.get("type") if isinstance(node.get("type"), list) else [node.get("type")]
    if "integer" in types:
        yield ".".join(path), node
    for name, sub in node.get("properties", {}).items():
        yield from _integers(sub, (*path, name))
    for key in ("items", "additionalProperties"):
        yield from _integers(node.get(key), (*path, key))
    for i, sub in enumerate(node.get("oneOf", [])):
        yield from _integers(sub, (*path, f"oneOf{i}"))


def test_every_count_in_the_schema_has_an_upper_bound():
    """Layer / block indices are checked against the model instead; max_memory takes sizes."""
    unbounded = [path for path, node in _integers(load_schema()) if "maximum" not in node
                 and not any(part in path for part in ("layers", "pairs", "max_memory"))]
    assert unbounded == []
    bounds = dict(_integers(load_schema()))
    assert bounds["masks.steps"]["maximum"] == bounds["demo.train.steps"]["maximum"] == bounds["csp.steps"]["maximum"] \
        == 10**7
    assert all(node["maximum"] == 2**20 for path, node in bounds.items() if path.endswith("batch_size"))


@pytest.mark.parametrize("path", sorted((REPO / "config").glob("*.yaml")) + sorted((REPO / "config" / "presets")
                                                                                  .glob("*.yaml")) + [TINY],
                         ids=lambda p: p.name)
def test_every_shipped_config_is_within_the_bounds(path):
    assert load_config(path)


# ----------------------------------------------------------------------------- duplicate keys


def test_a_config_with_a_key_twice_is_refused_naming_file_key_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("model: {source: demo}\nmasks:\n  steps: 100\n  lr: 0.01\n  steps: 200\n")
    with pytest.raises(ConfigError, match=rf"{path}: line 5: duplicate key 'steps' \(first at line 3\)"):
        load_config(path)
    top = tmp_path / "top.yaml"
    top.write_text("root: a\nroot: b\n")
    with pytest.raises(ConfigError, match=rf"{top}: line 2: duplicate key 'root' \(first at line 1\)"):
        load_config(top)
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {path}\n")
    with pytest.raises(ConfigError, match=rf"extends: {path}: {path}: line 5: duplicate key 'steps'"):
        load_config(child)
    settings = tmp_path / "settings.yaml"
    settings.write_text("steps: 1\nsteps: 2\n")
    with pytest.raises(ConfigError, match=rf"settings file {settings}: .*duplicate key 'steps'"):
        parse_settings(f"@{settings}")


@pytest.mark.slow  # starts Snakemake (a workflow parse: 5-30 s)
def test_snakemake_configfile_with_a_key_twice_is_refused(tmp_path):
    """Snakemake reads --configfile itself (the last of two keys wins); the workflow reads it again."""
    path = tmp_path / "dup.yaml"
    path.write_text("model: {source: demo}\nextract: {batch_size: 8, batch_size: 16}\n")
    with pytest.raises(ConfigError, match=rf"{path}: line 2: duplicate key 'batch_size'"):
        workflow_config({"model": {"source": "demo"}, "extract": {"batch_size": 16}}, [str(path)], {}, tmp_path, REPO)


def test_a_merged_key_may_be_overridden(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("x-base: &base {steps: 10, batch_size: 4}\nmasks: {<<: *base, steps: 20}\n"
                    "model: {source: demo}\n")
    raw = yaml.safe_load(path.read_text())
    raw.pop("x-base")
    p2 = tmp_path / "ok.yaml"
    p2.write_text(yaml.safe_dump(raw))
    assert load_config(p2)["masks"]["steps"] == 20
    from memctl.config import read_yaml

    assert read_yaml(path)["masks"] == {"steps": 20, "batch_size": 4}


# ----------------------------------------------------------------------------- edit labels


def test_two_edits_with_one_label_are_refused_naming_the_label_and_both(tmp_path):
    raw = tiny_raw()
    raw["curvature"]["edits"][0]["label"] = "mine"
    raw["curvature"]["edits"][2]["label"] = "mine"
    with pytest.raises(ConfigError, match=r"curvature.edits\[2\].label: 'mine' is also the label of "
                                          r"curvature.edits\[0\]: two edits with one label cannot be told apart"):
        validate_config(raw)
    raw["curvature"]["edits"][2]["label"] = "Origin"
    with pytest.raises(ConfigError, match=r"curvature.edits\[2\].label: 'Origin' is the label of the unedited model"):
        validate_config(raw)
    raw["curvature"]["edits"][2]["label"] = "K-FAC"  # an svd edit labelled like the K-FAC edits
    with pytest.raises(ConfigError, match=r"curvature.edits\[2\].label: 'K-FAC' is the label of kfac edits"):
        validate_config(raw)
    raw["curvature"]["edits"][2]["label"] = "SVD, mine"
    plan = build_plan(validate_config(raw), lab.workflow_model_dims(validate_config(raw)), python_version="3.11")
    assert {"mine", "SVD, mine"} <= {e.label for e in plan.edits.values()}
