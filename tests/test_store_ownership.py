"""The store deletes only what it wrote, and uses nothing it cannot vouch for (issue 21, items 1, 2, 5).

Every case runs on a copy of a real tiny store: artifacts written by the store's own writers
(``write_parquet`` / ``atomic_path`` with a ``Provenance``) and by a real stage command
(``memctl demo-corpus``, run with the plan's arguments), then damaged by hand. Each asserts the
message and that nothing else changed: every file of the project tree is hashed before and after
(the lock files ``.memctl.lock`` that renames leave are the only entries that may appear).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tiny_store import memctl_in_process

from memctl.store import LOCK_NAME, Provenance, atomic_path, sidecar_path, verify, write_parquet, write_text
from memctl.store.leftovers import host_tag

TINY = Path(__file__).with_name("tiny_config.yaml")
BIN = Path(sys.executable).parent
ENV = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def memctl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``memctl ARGS`` in ``cwd``, run by the dispatcher in this process (exit code, stdout, stderr as a process's)."""
    return memctl_in_process(*args, cwd=cwd)


def tree(root: Path) -> dict[str, str]:
    """Every file (hidden ones too) and symlink under ``root``: relative path -> sha256 (a link:
    its target); directories as ``DIR``. The store's lock files are left out."""
    state = {}
    for dirpath, dirs, files in os.walk(root):
        here = Path(dirpath)
        for name in dirs:
            path = here / name
            state[str(path.relative_to(root))] = f"-> {os.readlink(path)}" if path.is_symlink() else "DIR"
        for name in files:
            if name == LOCK_NAME:
                continue
            path = here / name
            rel = str(path.relative_to(root))
            state[rel] = f"-> {os.readlink(path)}" if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def minus(state: dict[str, str], root: Path, removed: list[str]) -> dict[str, str]:
    """``state`` without the removed paths (and everything below removed directories)."""
    rels = [str(Path(p).resolve().relative_to(root.resolve())) if Path(p).is_absolute()
            else str((Path.cwd() / p).resolve().relative_to(root.resolve())) for p in removed]
    return {k: v for k, v in state.items() if not any(k == r or k.startswith(r + "/") for r in rels)}


def removed_lines(out: str) -> list[str]:
    return [line.removeprefix("removed ") for line in out.splitlines() if line.startswith("removed ")]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def flip(path: Path) -> None:
    """Flip one bit in the middle of ``path`` (same size)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# ------------------------------------------------------------ a project whose results are its checkout


def project_checkout(base: Path) -> tuple[Path, dict[str, Path]]:
    """A project checkout that is also the results directory (``results_dir: .``) and holds the
    store (``root: results``): the project's own files, a user's notebook in ``results/tables/``
    (a directory the report writes into), and the store's artifacts written by its writers."""
    proj = base / "project"
    (proj / "src" / "analysis").mkdir(parents=True)
    (proj / "config").mkdir()
    (proj / ".git").mkdir()
    (proj / "Snakefile").write_text('include: "workflow/Snakefile"\n')
    (proj / "src" / "analysis" / "plots.py").write_text("import matplotlib\n")
    (proj / "config" / "config.yaml").write_text("root: results\nresults_dir: .\n")
    (proj / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (proj / "notes.md").write_text("what I tried on Tuesday\n")
    (proj / ".results.md.old-backup").write_text("my own hidden backup, named like a leftover\n")
    os.utime(proj / ".results.md.old-backup", (time.time() - 7200, time.time() - 7200))
    prov = Provenance("report", {"k": 1})
    table = pd.DataFrame({"edit": ["none", "svd"], "er": [1.0, 0.0]})
    # The report's outputs, in the checkout itself (results_dir: .), and in results/tables/.
    write_parquet(table, proj / "results.parquet", provenance=prov)
    write_text(proj / "results.md", "| edit | er |\n", provenance=prov)
    write_parquet(table, proj / "results" / "tables" / "results.parquet", provenance=prov)
    write_parquet(table, proj / "results" / "tables" / "by_copies.parquet", provenance=prov)
    notebook = proj / "results" / "tables" / "analysis.ipynb"
    notebook.write_text(json.dumps({"cells": [], "nbformat": 4}))
    # The store: a delta, an extraction table, a model directory.
    edit = proj / "results" / "demo-1a2b" / "edits" / "svd-3c4d"
    write_parquet(table, edit.parent.parent / "extract-5e6f" / "memorized.parquet", provenance=prov)
    with atomic_path(edit / "delta.safetensors", provenance=prov) as tmp:
        tmp.write_bytes(bytes(range(256)) * 16)
    model = proj / "results" / "demo" / "model-7a8b"
    with atomic_path(model, directory=True, provenance=prov) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    return proj, {"notebook": notebook, "edit": edit, "model": model}


def test_repair_in_a_checkout_that_is_the_results_dir_removes_only_what_the_store_wrote(tmp_path):
    proj, paths = project_checkout(tmp_path)
    edit, model = paths["edit"], paths["model"]
    # Damage: a corrupt table in the checkout, a corrupt delta, a deleted model file, a sidecar
    # whose artifact is gone, a dead writer's temporary, and a delta whose sidecar was deleted.
    flip(proj / "results.parquet")
    flip(edit / "delta.safetensors")
    (model / "model.safetensors").unlink()
    orphan = proj / "results" / "tables" / "by_copies.parquet"
    orphan.unlink()
    dead = proj / f".results.md.tmp-{dead_pid()}@{host_tag()}-k2j3h4g5"
    dead.write_text("half a report")
    memorized = edit.parent.parent / "extract-5e6f" / "memorized.parquet"
    flip(memorized)
    sidecar_path(memorized).unlink()
    before = tree(proj)

    repaired = memctl("verify", "--repair", proj)
    out = repaired.stdout
    assert repaired.returncode == 1, out  # what it cannot tell without the plan is left, each line says so
    want = [proj / "results.parquet", sidecar_path(proj / "results.parquet"), model, sidecar_path(model),
            sidecar_path(orphan), edit / "delta.safetensors", sidecar_path(edit / "delta.safetensors"), dead]
    assert sorted(removed_lines(out)) == sorted(map(str, want))
    # Everything else is as it was, byte for byte: the Snakefile, src/, config/, .git, the notes,
    # the notebook in results/tables/, the hidden backup, the sound artifacts, and the table
    # whose sidecar was deleted (without the plan: an artifact, or a file memctl did not write?).
    assert tree(proj) == minus(before, proj, [str(p) for p in want])
    for user_file in ["Snakefile", "src/analysis/plots.py", "config/config.yaml", ".git/HEAD", "notes.md",
                      ".results.md.old-backup", "results/tables/analysis.ipynb"]:
        assert (proj / user_file).is_file(), user_file
    assert memorized.exists()
    lines = out.splitlines()
    # The project's files in the checkout (a directory memctl writes into) and the notebook in
    # results/tables/: not in the store's record of what it wrote there, so unknown.
    for entry, kind in [("Snakefile", "file"), ("src", "directory"), ("config", "directory"), ("notes.md", "file"),
                        ("results/tables/analysis.ipynb", "file")]:
        assert f"{proj / entry}: unknown {kind}, not written by memctl: left alone" in lines, entry
    assert not any(x.startswith(str(proj / ".git")) for x in lines)
    # memctl wrote it as an artifact, its sidecar is gone: a problem; without the plan, left alone.
    (line,) = [x for x in lines if x.startswith(f"{memorized}: incomplete: no provenance sidecar")]
    assert "though memctl wrote it as an artifact (.memctl.lock lists it" in line
    (line,) = [x for x in lines if x.startswith(f"{memorized}: not removed: ")]
    assert "no sidecar, and no plan names it as an artifact" in line and "--configfile CONFIG" in line
    (line,) = [x for x in lines if x.startswith(f"{proj / '.results.md.old-backup'}: not removed: ")]
    assert "does not say which memctl process wrote it" in line
    assert lines[-1] == "repair: removed 8 paths, 2 problems left; the next run rebuilds what was removed"

    # Again: nothing more is removed.
    again = memctl("verify", "--repair", proj)
    assert removed_lines(again.stdout) == [] and tree(proj) == minus(before, proj, [str(p) for p in want])


def test_verify_of_the_checkout_reports_and_changes_nothing(tmp_path):
    proj, paths = project_checkout(tmp_path)
    before = tree(proj)
    checked = memctl("verify", proj)
    assert checked.returncode == 1  # the hidden file named like a leftover (of results.md, by an unknown writer)
    lines = checked.stdout.splitlines()
    (problem,) = [x for x in lines[:-1] if ": unknown " not in x]
    assert problem.startswith(f"{proj / '.results.md.old-backup'}: leftover or in-progress write of results.md")
    assert f"{proj / 'src'}: unknown directory, not written by memctl: left alone" in lines
    assert f"{paths['notebook']}: unknown file, not written by memctl: left alone" in lines
    assert lines[-1] == "checked 7 artifacts: 1 problems; 5 unknown entries left alone"
    assert tree(proj) == before


# ----------------------------------------------------------- a real stage's store, and the plan


def project_with_plan(base: Path) -> Path:
    """A project directory with the tiny config (store in ``store/``, tables in ``tables/``)."""
    cfg = yaml.safe_load(TINY.read_text())
    keep = {"model", "demo", "candidates", "extract", "heldout", "evaluate", "resources"}
    cfg = {key: value for key, value in cfg.items() if key in keep}
    cfg.update(root="store", results_dir="tables", masks={"enabled": False})
    proj = base / "proj"
    (proj / "config").mkdir(parents=True)
    (proj / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (proj / "prompts.jsonl").write_text('{"prefix": "a", "suffix": "b"}\n')  # the user's own input
    return proj


def plan_of(proj: Path):
    from memctl import lab
    from memctl.config import load_config
    from memctl.plan import build_plan

    cfg = load_config(proj / "config" / "config.yaml")
    return build_plan(cfg, lab.workflow_model_dims(cfg))


def run_job(proj: Path, job) -> subprocess.CompletedProcess:
    """The job's ``memctl`` command as the rule runs it, in the project directory."""
    from memctl import stages

    return memctl(stages.get(job.stage).command, *job.args, cwd=proj)


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    """The demo corpus job of the tiny plan, run once (a real stage: three tables and their
    sidecars); each test copies the project."""
    proj = project_with_plan(tmp_path_factory.mktemp("template"))
    plan = plan_of(proj)
    done = run_job(proj, plan.job("demo_corpus"))
    assert done.returncode == 0, done.stderr[-3000:]
    # The report's directory, with one of its tables (as the report stage writes it).
    write_parquet(pd.DataFrame({"er": [1.0]}), proj / "tables" / "results.parquet", provenance=Provenance("report", {}))
    return proj


@pytest.fixture
def proj(demo_store, tmp_path):
    copy = tmp_path / "proj"
    shutil.copytree(demo_store, copy, symlinks=True)
    return copy


def test_a_stage_refuses_an_artifact_whose_sidecar_was_deleted_and_repair_with_the_plan_removes_it(proj):
    plan = plan_of(proj)
    train = Path(plan.job("demo_corpus").outputs["train"])
    flip(proj / train)
    sidecar_path(proj / train).unlink()
    notebook = proj / "tables" / "analysis.ipynb"  # the user's, where the report writes
    notebook.write_text("{}")
    before = tree(proj)

    refused = run_job(proj, plan.job("demo_tokenizer"))
    assert refused.returncode == 2, refused.stderr[-3000:]
    (line,) = [x for x in refused.stderr.splitlines() if x.startswith("memctl demo-tokenizer: error: ")]
    assert line.startswith(f"memctl demo-tokenizer: error: {train}: incomplete: no provenance sidecar train.parquet"
                           ".meta.json, though memctl wrote it as an artifact (.memctl.lock lists it"), line
    assert "`memctl verify --repair --configfile CONFIG` removes it" in line
    assert "demo_tokenizer: started" not in refused.stderr and "Traceback" not in refused.stderr
    assert tree(proj) == before  # nothing written

    # Without the plan: reported, left alone.
    blind = memctl("verify", "--repair", "store", "tables", cwd=proj)
    assert blind.returncode == 1 and removed_lines(blind.stdout) == []
    assert f"{train}: not removed: no sidecar, and no plan names it" in blind.stdout
    assert f"{Path('tables') / 'analysis.ipynb'}: unknown file, not written by memctl: left alone" in blind.stdout
    assert tree(proj) == before

    # With the plan (its root and results_dir): the plan's artifact is removed, the notebook is unknown.
    checked = memctl("verify", "--configfile", "config/config.yaml", cwd=proj)
    assert checked.returncode == 1
    lines = checked.stdout.splitlines()
    (line,) = [x for x in lines if x.startswith(f"{train}: ")]
    assert "incomplete: no provenance sidecar train.parquet.meta.json (an artifact of the plan" in line
    assert f"{Path('tables') / 'analysis.ipynb'}: unknown file, not written by memctl (no sidecar, not an artifact" \
           " of the plan): left alone" in lines
    assert lines[-1] == "checked 4 artifacts: 1 problems; 1 unknown entries left alone"
    repaired = memctl("verify", "--repair", "--configfile", "config/config.yaml", cwd=proj)
    assert repaired.returncode == 0, repaired.stdout
    assert removed_lines(repaired.stdout) == [str(train)]
    assert tree(proj) == minus(before, proj, [str(proj / train)])
    assert notebook.read_text() == "{}"

    # The next run of the job rebuilds it; the stage then accepts it.
    assert run_job(proj, plan.job("demo_corpus")).returncode == 0
    assert verify(proj / train) == []
    clean = memctl("verify", "--configfile", "config/config.yaml", cwd=proj)
    assert clean.returncode == 0 and clean.stdout.splitlines()[-1].startswith("checked 4 artifacts: 0 problems")


def test_users_own_inputs_outside_the_store_are_accepted_and_a_directory_artifact_needs_its_sidecar(proj, tmp_path):
    from memctl.data import DataError
    from memctl.runner import stage

    plan = plan_of(proj)
    corpus = proj / Path(plan.job("demo_corpus").outputs["train"]).parent
    user_model = tmp_path / "my-model"
    user_model.mkdir()
    (user_model / "config.json").write_text("{}")
    before = tree(proj)
    inputs = {"jsonl": proj / "prompts.jsonl", "model": user_model, "corpus": corpus, "hub": "EleutherAI/pythia-70m"}
    with stage("candidates", {}, inputs) as prov:  # the user's files, a hub id, a sound container
        assert set(prov.inputs) == set(inputs)

    # The user's own file beside the store's tables (a directory memctl writes into): theirs, used.
    (corpus / "my-prompts.jsonl").write_text('{"prefix": "a", "suffix": "b"}\n')
    with stage("candidates", {}, {"corpus": corpus, "jsonl": corpus / "my-prompts.jsonl"}):
        pass
    # An artifact whose sidecar was deleted, and a directory artifact likewise, inside a
    # container: refused, each named.
    write_parquet(pd.DataFrame({"x": [1]}), corpus / "extra.parquet", provenance=Provenance("demo_corpus", {}))
    sidecar_path(corpus / "extra.parquet").unlink()
    model = proj / "store" / "demo" / "model-x"
    with atomic_path(model, directory=True, provenance=Provenance("demo_pretrain", {})) as tmp:
        (tmp / "model.safetensors").write_bytes(b"\0" * 64)
    sidecar_path(model).unlink()
    with pytest.raises(DataError) as err, stage("candidates", {}, {"corpus": corpus}):
        pass
    assert str(err.value).startswith(f"{corpus / 'extra.parquet'}: incomplete: no provenance sidecar")
    with pytest.raises(DataError) as err, stage("candidates", {}, {"store": proj / "store"}):
        pass
    message = str(err.value)
    assert message.startswith(f"{model}: incomplete: directory without provenance sidecar model-x.meta.json")
    assert "(and 1 more damaged inputs)" in message
    with pytest.raises(DataError) as err, stage("candidates", {}, {"model": model}):
        pass
    assert str(err.value).startswith(f"{model}: incomplete: directory without provenance sidecar")
    assert minus(tree(proj), proj, [str(model), str(corpus / "extra.parquet"), str(corpus / "my-prompts.jsonl")]) \
        == before


def test_a_store_directory_of_a_memctl_that_kept_no_record_refuses_what_lacks_a_sidecar(proj):
    """A lock file left by an older memctl is empty (no record of the names it wrote): any entry
    without a sidecar there may be an artifact that lost it: refused, flagged, not removed
    without the plan."""
    from memctl.data import DataError
    from memctl.runner import stage

    old = proj / "store" / "demo-1a2b" / "edits" / "svd-3c4d"
    old.mkdir(parents=True)
    (old / LOCK_NAME).touch()
    (old / "delta.safetensors").write_bytes(b"\0" * 64)
    before = tree(proj)
    with pytest.raises(DataError) as err, stage("evaluate", {}, {"delta": old / "delta.safetensors"}):
        pass
    assert str(err.value).startswith(f"{old / 'delta.safetensors'}: incomplete: no provenance sidecar"
                                     " delta.safetensors.meta.json, in a directory memctl writes artifacts into")
    repaired = memctl("verify", "--repair", "store", cwd=proj)
    assert repaired.returncode == 1
    delta = Path("store/demo-1a2b/edits/svd-3c4d/delta.safetensors")
    assert f"{delta}: not removed: no sidecar, and no plan names it as an artifact" in repaired.stdout
    assert tree(proj) == before


def test_verify_dot_and_an_empty_path(proj):
    before = tree(proj)
    here = memctl("verify", ".", cwd=proj / "store")
    assert here.returncode == 0, here.stdout + here.stderr
    assert here.stdout.splitlines()[-1] == "checked 3 artifacts: 0 problems"
    empty = memctl("verify", "", cwd=proj)
    assert empty.returncode == 2
    assert empty.stderr.strip() == ("memctl verify: error: an empty path ('') names no file; give an artifact or a"
                                    " directory (e.g. . for this one)")
    nothing = memctl("verify", cwd=proj)
    assert nothing.returncode == 2 and "--configfile CONFIG" in nothing.stderr
    dot = memctl("verify", "--repair", ".", cwd=proj)  # the project directory: its own files are unknown
    assert dot.returncode == 0, dot.stdout
    assert "config: unknown directory, not written by memctl: left alone" in dot.stdout
    assert "prompts.jsonl: unknown file, not written by memctl: left alone" in dot.stdout
    assert removed_lines(dot.stdout) == [] and "Traceback" not in dot.stderr
    assert tree(proj) == before


def test_repair_keeps_a_directory_artifact_holding_a_file_it_did_not_write(proj):
    model = proj / "store" / "demo" / "model-9f9f"
    with atomic_path(model, directory=True, provenance=Provenance("demo_pretrain", {})) as tmp:
        (tmp / "model.safetensors").write_bytes(b"\1" * 128)
    (model / "my-notes.txt").write_text("which checkpoint this was")
    # A file artifact replaced by a user's directory of the same name (its sidecar left behind).
    table = proj / "store" / "demo" / "table.parquet"
    write_parquet(pd.DataFrame({"x": [1]}), table, provenance=Provenance("unit", {}))
    table.unlink()
    table.mkdir()
    (table / "part-0.parquet").write_bytes(b"the user's own dataset")
    before = tree(proj)
    repaired = memctl("verify", "--repair", "store", cwd=proj)
    assert repaired.returncode == 1
    lines = repaired.stdout.splitlines()
    (line,) = [x for x in lines if x.startswith(f"{Path('store/demo/model-9f9f')}: corrupt: sha256")]
    assert "; my-notes.txt was added" in line
    assert (f"{Path('store/demo/model-9f9f')}: not removed: {Path('store/demo/model-9f9f/my-notes.txt')} is not the"
            " store's (put there after the artifact was written); move it out, then repair again") in lines
    assert any(x.startswith(f"{Path('store/demo/table.parquet')}: corrupt: sha256") for x in lines)
    assert (f"{Path('store/demo/table.parquet')}: not removed: {Path('store/demo/table.parquet/part-0.parquet')} is"
            " not the store's (put there after the artifact was written); move it out, then repair again") in lines
    assert removed_lines(repaired.stdout) == [] and tree(proj) == before
