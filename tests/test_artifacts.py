"""Atomic writes, provenance sidecars, `memctl verify` and group permissions, in one process.

Killed processes and concurrent writers are in tests/test_integrity.py.
"""

import json
import os
import socket
import stat
import subprocess
import time

import pandas as pd
import pytest

from memctl import store
from memctl.cli import main
from memctl.store import atomic, leftovers
from memctl.store import provenance as store_provenance
from memctl.store import (
    LOCK_NAME,
    Provenance,
    atomic_path,
    hash_path,
    leftover,
    leftovers_of,
    share_with_group,
    sidecar_path,
    verify,
    verify_paths,
    write_parquet,
    write_text,
)


def listing(directory):
    """Entries of a directory, without the lock file that renames leave behind."""
    return sorted(p.name for p in directory.iterdir() if p.name != LOCK_NAME)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def host():
    return leftovers.host_tag()


@pytest.fixture
def umask():
    """Set this process's umask for one test; the old one comes back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def test_failed_write_leaves_no_artifact(tmp_path):
    target = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_temporary_names_say_who_writes_them(tmp_path):
    with atomic_path(tmp_path / "a.txt") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".a.txt.tmp-{os.getpid()}@{host()}-")
        lo = leftover(tmp)
        assert (lo.artifact, lo.pid, lo.host, lo.alive) == ("a.txt", os.getpid(), host(), True)
        assert not lo.stale
        tmp.write_text("x")
    assert listing(tmp_path) == ["a.txt"]


def test_failed_directory_write_keeps_the_old_directory(tmp_path):
    target = tmp_path / "model"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "w.bin").write_text("v1")
    with pytest.raises(RuntimeError), atomic_path(target, directory=True) as tmp:
        (tmp / "w.bin").write_text("v2-partial")
        raise RuntimeError("killed")
    assert (target / "w.bin").read_text() == "v1"
    assert listing(tmp_path) == ["model"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "move-aside"])
def test_directory_is_replaced_whole(tmp_path, monkeypatch, exchange):
    """A rewrite replaces the whole directory (no file of the old version survives), with the
    atomic swap and with the fallback for filesystems without it."""
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "model"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "a.bin").write_text("v1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_text("v1")
    with atomic_path(target, directory=True) as tmp:
        (tmp / "a.bin").write_text("v2")
    assert sorted(p.name for p in target.rglob("*")) == ["a.bin"]
    assert (target / "a.bin").read_text() == "v2"
    assert listing(tmp_path) == ["model"]


def test_provenance_sidecar_and_verify(tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("input")
    out = tmp_path / "t.parquet"
    prov = Provenance("unit", {"k": 1}, {"source": inp, "hub": "EleutherAI/pythia-70m"})
    write_parquet(pd.DataFrame({"a": [1, 2]}), out)
    prov.write(out, extra={"n": 2})
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["stage"] == "unit" and meta["settings"] == {"k": 1}
    assert meta["inputs"]["source"]["sha256"] == hash_path(inp)
    assert meta["inputs"]["hub"] == {"ref": "EleutherAI/pythia-70m"}
    assert {"python", "torch", "transformers", "memctl"} <= set(meta["versions"])
    assert meta["code_version"].startswith("0.1.0")
    assert meta["host"] == socket.gethostname() and meta["wall_time_s"] >= 0 and meta["started"]
    assert set(store.REQUIRED_FIELDS) <= set(meta)
    assert meta["n"] == 2 and meta["sha256"] == hash_path(out) and meta["artifact"] == "t.parquet"
    assert verify(out) == []

    out.write_bytes(out.read_bytes()[:-3])  # truncated: corrupt
    (problem,) = verify(out)
    assert problem.startswith(f"{out}: corrupt: sha256") and "differs" in problem
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(tmp_path)])
    assert exit_.value.code == 1


def test_sidecar_is_written_before_the_rename(tmp_path, monkeypatch):
    """With ``provenance=`` the artifact never exists without its sidecar."""
    out = tmp_path / "t.parquet"
    seen = []
    rename = atomic._rename_into_place

    def spy(tmp, final, directory):
        seen.append((sidecar_path(final).exists(), final.exists()))
        return rename(tmp, final, directory)

    monkeypatch.setattr(atomic, "_rename_into_place", spy)
    prov = Provenance("unit", {"k": 2})
    write_parquet(pd.DataFrame({"a": [1, 2, 3]}), out, provenance=prov)
    with atomic_path(tmp_path / "model", directory=True, provenance=prov, extra={"kind": "dir"}) as tmp:
        (tmp / "w.bin").write_bytes(b"\0" * 100)
    assert seen == [(True, False), (True, False)]
    assert verify(out) == [] and verify(tmp_path / "model") == []
    assert json.loads(sidecar_path(tmp_path / "model").read_text())["kind"] == "dir"
    # Provenance.write afterwards (to add what the stage learnt) reuses the checksum and agrees.
    prov.write(out, extra={"rows": 3})
    assert json.loads(sidecar_path(out).read_text())["rows"] == 3 and verify(out) == []


def test_provenance_write_rehashes_an_artifact_replaced_meanwhile(tmp_path, monkeypatch):
    """If another writer renames a new version in while the checksum is computed, the sidecar
    describes what is in place when it is written, not what was hashed."""
    out = tmp_path / "t.txt"
    write_text(out, "first")
    real_hash = store_provenance.hash_path
    calls = []

    def racing_hash(path, *a, **kw):
        digest = real_hash(path, *a, **kw)
        if not calls:
            calls.append(path)
            write_text(out, "second, from another writer")  # lands after our read
        return digest

    monkeypatch.setattr(store_provenance, "hash_path", racing_hash)
    Provenance("unit", {}).write(out)
    monkeypatch.undo()
    assert json.loads(sidecar_path(out).read_text())["sha256"] == hash_path(out)
    assert verify(out) == []


def make_store(tmp_path):
    """A store with one example of every problem `memctl verify` must report."""
    store = tmp_path / "store"
    prov = Provenance("unit", {"k": 1})
    arts = {}
    for name in ["good", "truncated", "flipped", "no_sidecar", "bad_sidecar", "thin_sidecar"]:
        arts[name] = store / "stage-ab12" / f"{name}.parquet"
        write_parquet(pd.DataFrame({"x": list(range(50))}), arts[name], provenance=prov)
    model = store / "demo" / "model-cd34"
    with atomic_path(model, directory=True, provenance=prov) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (model / ".snakemake_timestamp").touch()  # Snakemake's marker: not part of the artifact

    data = arts["truncated"].read_bytes()
    arts["truncated"].write_bytes(data[:-10])
    data = bytearray(arts["flipped"].read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit
    arts["flipped"].write_bytes(bytes(data))
    sidecar_path(arts["no_sidecar"]).unlink()
    sidecar_path(arts["bad_sidecar"]).write_text('{"stage": "unit", "sha2')
    meta = json.loads(sidecar_path(arts["thin_sidecar"]).read_text())
    del meta["versions"], meta["code_version"]
    sidecar_path(arts["thin_sidecar"]).write_text(json.dumps(meta))
    model_file = model / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])

    orphan = store / "stage-ab12" / "gone.parquet"
    write_parquet(pd.DataFrame({"x": [1]}), orphan, provenance=prov)
    orphan.unlink()
    dead = store / "stage-ab12" / f".killed.parquet.tmp-{dead_pid()}@{host()}-abcd1234"
    dead.write_bytes(b"half a table")
    dead_dir = store / "demo" / f".model-ef56.tmp-{dead_pid()}@{host()}-k2j3h4g5"
    dead_dir.mkdir()
    (dead_dir / "config.json").write_text("{")
    bare = store / "demo" / "tokenizer-9a9a"  # a directory artifact killed before its sidecar
    bare.mkdir()
    (bare / "tokenizer.json").write_text("{}")

    # Not artifacts: Snakemake's logs and benchmarks, hidden files, the lock files.
    (store / "logs" / "extract").mkdir(parents=True)
    (store / "logs" / "extract" / "ab12.log").write_text("log")
    (store / "benchmarks").mkdir()
    (store / "benchmarks" / "x.tsv").write_text("s\n1\n")
    (store / ".nfs000000001").write_text("")
    expected = {
        arts["truncated"]: "corrupt",
        arts["flipped"]: "corrupt",
        arts["no_sidecar"]: "incomplete: no provenance sidecar",
        sidecar_path(arts["bad_sidecar"]): "corrupt sidecar",
        sidecar_path(arts["thin_sidecar"]): "incomplete sidecar, lacks versions, code_version",
        model: "corrupt",
        orphan: "incomplete: missing, but its sidecar",
        dead: "leftover of an interrupted write of killed.parquet",
        dead_dir: "leftover of an interrupted write of model-ef56",
        bare: "incomplete: directory without provenance sidecar tokenizer-9a9a.meta.json",
    }
    return store, arts, expected


def test_verify_reports_every_problem_once_naming_its_path(tmp_path, capsys):
    store, arts, expected = make_store(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(store)])
    assert exit_.value.code == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"checked 9 artifacts: {len(expected)} problems"
    problems = lines[:-1]
    assert len(problems) == len(expected)
    for path, words in expected.items():
        (line,) = [p for p in problems if p.startswith(f"{path}: ")]
        assert words in line, line
    assert verify(arts["good"]) == []


def test_verify_single_artifacts_and_exit_codes(tmp_path, capsys):
    store, arts, _ = make_store(tmp_path)
    assert main(["verify", str(arts["good"]), str(sidecar_path(arts["good"]))]) is None
    assert capsys.readouterr().out.strip() == "checked 2 artifacts: 0 problems"
    with pytest.raises(SystemExit):
        main(["verify", str(arts["good"]), str(store / "stage-ab12" / "never-written.parquet")])
    out = capsys.readouterr().out
    assert f"{store / 'stage-ab12' / 'never-written.parquet'}: missing" in out
    # An artifact's own check includes leftovers of interrupted writes of it.
    killed = store / "stage-ab12" / "killed.parquet"
    write_parquet(pd.DataFrame({"x": [1]}), killed, provenance=Provenance("unit", {}))
    assert len(leftovers_of(killed)) == 0  # the dead writer's temporary was cleaned up by the write
    dead = store / "stage-ab12" / f".killed.parquet.tmp-{dead_pid()}@{host()}-zzzz0000"
    dead.write_bytes(b"")
    (problem,) = verify(killed)
    assert problem.startswith(f"{dead}: leftover")


def test_write_in_progress_is_a_note_not_a_problem(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    Provenance("unit", {}).write(tmp_path / "a.txt")
    (tmp_path / f".b.txt.tmp-{os.getpid()}@{host()}-abcdefgh").write_text("b")
    report = verify_paths([tmp_path])
    assert report.problems == [] and report.checked == 1
    (note,) = report.notes
    assert "in progress" in note and str(os.getpid()) in note


def test_next_write_removes_leftovers_of_dead_writers_only(tmp_path, monkeypatch):
    monkeypatch.setenv(store.STALE_ENV, "600")
    final = tmp_path / "t.txt"
    names = {
        "dead here": f".t.txt.tmp-{dead_pid()}@{host()}-aaaaaaaa",
        "dead here, dir": f".t.txt.old-{dead_pid()}@{host()}-bbbbbbbb",
        "alive here": f".t.txt.tmp-{os.getpid()}@{host()}-cccccccc",
        "other host, fresh": ".t.txt.tmp-1@elsewhere-dddddddd",
        "other host, old": ".t.txt.tmp-1@elsewhere-eeeeeeee",
        "old naming, old": ".t.txt.tmp-ffffffff",
        "another artifact": f".t.txt.bak.tmp-{dead_pid()}@{host()}-gggggggg",
    }
    for what, name in names.items():
        p = tmp_path / name
        if "dir" in what:
            p.mkdir()
            (p / "t.txt").write_text("old")
        else:
            p.write_text(what)
        if "old" in what:
            os.utime(p, (time.time() - 3600, time.time() - 3600))
    write_text(final, "new")
    kept = {what for what, name in names.items() if (tmp_path / name).exists()}
    assert kept == {"alive here", "other host, fresh", "another artifact"}


def test_files_and_directories_are_group_writable(tmp_path, umask):
    """Everything a write creates gets the umask's mode plus group rw (dirs: rwx)."""
    prov = Provenance("unit", {})
    for mask, file_mode, dir_mode in [(0o022, 0o664, 0o775), (0o077, 0o660, 0o770), (0o002, 0o664, 0o775)]:
        umask(mask)
        root = tmp_path / f"umask{mask:03o}"
        root.mkdir()
        write_parquet(pd.DataFrame({"a": [1]}), root / "new" / "nested" / "t.parquet", provenance=prov)
        with atomic_path(root / "new" / "model", directory=True) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "w.bin").write_bytes(b"w")
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "run.sh", 0o755)
        prov.write(root / "new" / "model")
        files = [root / "new/nested/t.parquet", sidecar_path(root / "new/nested/t.parquet"),
                 root / "new/model/sub/w.bin", sidecar_path(root / "new/model"), root / "new/nested" / LOCK_NAME]
        dirs = [root / "new", root / "new/nested", root / "new/model", root / "new/model/sub"]
        assert {str(p.relative_to(root)): oct(mode(p)) for p in files} == {
            str(p.relative_to(root)): oct(file_mode) for p in files
        }
        assert {str(p.relative_to(root)): oct(mode(p)) for p in dirs} == {
            str(p.relative_to(root)): oct(dir_mode) for p in dirs
        }
        assert mode(root / "new/model/run.sh") == file_mode | (0o755 & ~mask)  # executable stays so
        assert mode(root) == 0o777 & ~mask  # existing directories are left alone


def test_directories_keep_the_setgid_bit_of_the_store(tmp_path, umask):
    umask(0o022)
    store = tmp_path / "store"
    store.mkdir()
    os.chmod(store, 0o2775)
    with atomic_path(store / "demo" / "model", directory=True) as tmp:
        (tmp / "sub").mkdir()
    for d in [store / "demo", store / "demo/model", store / "demo/model/sub"]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o2775, d


def test_share_with_group_clears_only_the_group_bits_of_the_umask(umask):
    umask(0o027)
    assert share_with_group() == 0o027
    assert store.current_umask() == 0o007
    umask(0o077)
    share_with_group()
    assert store.current_umask() == 0o007
    umask(0o022)
    share_with_group()
    assert store.current_umask() == 0o002
