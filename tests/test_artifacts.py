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
    bare = store / "demo" / "tokenizer-9a9a"  # a directory artifact killed before Provenance.write stamped it
    with atomic_path(bare, directory=True) as tmp:
        (tmp / "tokenizer.json").write_text("{}")
    mine = store / "stage-ab12" / "notes.txt"  # a user's file beside the store's: not an artifact
    mine.write_text("mine")

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
        bare: "incomplete: directory without provenance sidecar tokenizer-9a9a.meta.json, memctl renamed it in"
              " without one",
    }
    return store, arts, expected


def test_verify_reports_every_problem_once_naming_its_path(tmp_path, capsys):
    store, arts, expected = make_store(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(store)])
    assert exit_.value.code == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"checked 9 artifacts: {len(expected)} problems; 1 unknown entries left alone"
    unknown = store / "stage-ab12" / "notes.txt"
    assert lines[-2] == f"{unknown}: unknown file, not written by memctl: left alone"
    problems = lines[:-2]
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
    # A name without pid@host does not say that memctl wrote it: never removed (a user's file).
    assert kept == {"alive here", "other host, fresh", "another artifact", "old naming, old"}


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


# ------------------------------------------------ a stage checks its inputs; verify --repair


def flip_byte(path, keep_mtime=False):
    """Flip one bit in the middle of ``path`` in place (same size, same inode); with
    ``keep_mtime`` its modification time is set back, as by a tool that preserves it."""
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(st.st_size // 2)
        byte = fh.read(1)
        fh.seek(st.st_size // 2)
        fh.write(bytes([byte[0] ^ 0x01]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:  # a write within the same timestamp tick would look unchanged: make the change visible
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def store_inputs(tmp_path):
    """A table, a model directory (config + weights), a user's file and a directory holding a table."""
    prov = Provenance("unit", {})
    table, model, corpus = tmp_path / "s" / "t.parquet", tmp_path / "s" / "model", tmp_path / "s" / "corpus"
    write_parquet(pd.DataFrame({"x": list(range(100))}), table, provenance=prov)
    with atomic_path(model, directory=True, provenance=prov) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    write_parquet(pd.DataFrame({"y": [1, 2]}), corpus / "train.parquet", provenance=prov)
    user = tmp_path / "user.jsonl"
    user.write_text('{"prefix": "a", "suffix": "b"}\n')
    return {"table": table, "model": model, "corpus": corpus, "user": user, "hub": "EleutherAI/pythia-70m"}


def test_sidecars_record_what_stages_need_to_trust_large_files(tmp_path):
    inputs = store_inputs(tmp_path)
    meta = json.loads(sidecar_path(inputs["table"]).read_text())
    st = inputs["table"].stat()
    assert meta["stat"] == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    files = json.loads(sidecar_path(inputs["model"]).read_text())["stat"]["files"]
    weights = inputs["model"] / "model.safetensors"
    assert set(files) == {"config.json", "model.safetensors"}
    assert files["model.safetensors"] == {"size": weights.stat().st_size, "mtime_ns": weights.stat().st_mtime_ns,
                                          "inode": weights.stat().st_ino, "sha256": hash_path(weights)}
    # stamped afterwards: the same record
    Provenance("unit", {}).write(inputs["table"])
    assert json.loads(sidecar_path(inputs["table"]).read_text())["stat"] == meta["stat"]
    prov = Provenance("unit", {}, inputs)  # every input sound: no error
    assert prov.inputs["table"]["sha256"] == hash_path(inputs["table"])
    assert prov.inputs["model"]["sha256"] == hash_path(inputs["model"])
    assert prov.inputs["hub"] == {"ref": "EleutherAI/pythia-70m"}


@pytest.mark.parametrize(
    "damage, refused",
    [
        ("flip a byte of the table", "table: corrupt: sha256"),
        ("truncate the table", "table: corrupt: sha256"),
        ("flip a byte of the model weights", "model: corrupt: sha256"),
        ("add a file to the model", "model: corrupt: sha256"),
        ("flip a byte of a table in an input directory", "train.parquet: corrupt: sha256"),
        ("delete the table, keep its sidecar", "table: incomplete: missing, but its sidecar"),
        ("garble the table's sidecar", "table.meta: corrupt sidecar"),
    ],
)
def test_a_stage_refuses_a_damaged_input_before_it_runs(tmp_path, capsys, damage, refused):
    from memctl.data import DataError
    from memctl.runner import stage

    inputs = store_inputs(tmp_path)
    table, weights = inputs["table"], inputs["model"] / "model.safetensors"
    names = {"table": table, "table.meta": sidecar_path(table), "model": inputs["model"],
             "train.parquet": inputs["corpus"] / "train.parquet"}
    if damage == "flip a byte of the table":
        flip_byte(table)
    elif damage == "truncate the table":
        table.write_bytes(table.read_bytes()[:-5])
    elif damage == "flip a byte of the model weights":
        flip_byte(weights)
    elif damage == "add a file to the model":
        (inputs["model"] / "extra.bin").write_bytes(b"x")
    elif damage == "flip a byte of a table in an input directory":
        flip_byte(inputs["corpus"] / "train.parquet")
    elif damage == "delete the table, keep its sidecar":
        table.unlink()
    else:
        sidecar_path(table).write_text('{"sha2')
    what, _, words = refused.partition(": ")
    ran = []
    with pytest.raises(DataError) as err, stage("evaluate", {}, inputs, outputs=[tmp_path / "out"]):
        ran.append(True)
    assert not ran  # refused before the stage's block
    assert str(err.value).startswith(f"{names[what]}: {words}") and "\n" not in str(err.value)
    if what == "model":  # which file of the directory
        assert ("; extra.bin was added" if "add" in damage else "; model.safetensors differs") in str(err.value)
    assert "memctl verify --repair" in str(err.value)
    with pytest.raises(store.IntegrityError):
        Provenance("unit", {}, inputs)
    assert Provenance("unit", {}, inputs, check=False).stage == "unit"


def test_large_unchanged_files_are_trusted_by_size_mtime_and_inode(tmp_path, monkeypatch):
    """Files over TRUST_STAT_OVER_BYTES (256 MiB; here every file) are not reread by a stage
    while their size, mtime and inode are those in the sidecar; a change of any is read whole.
    `memctl verify` always reads everything."""
    from memctl.store import check_input, hashing

    monkeypatch.setattr(hashing, "TRUST_STAT_OVER_BYTES", 0)
    inputs = store_inputs(tmp_path)
    model, table = inputs["model"], inputs["table"]
    reads = []
    real = hashing.hash_path
    monkeypatch.setattr(hashing, "hash_path", lambda p, *a, **kw: reads.append(p) or real(p, *a, **kw))
    assert check_input(model) == [] and check_input(table) == [] and reads == []  # nothing read

    flip_byte(model / "model.safetensors", keep_mtime=True)  # silent damage, stat unchanged
    assert check_input(model) == []  # the stage's cache trusts it ...
    (problem,) = verify(model)  # ... verify reads it
    assert problem.startswith(f"{model}: corrupt: sha256")
    flip_byte(model / "model.safetensors", keep_mtime=True)  # undone
    assert verify(model) == []

    flip_byte(model / "model.safetensors")  # mtime changed: read whole, refused
    reads.clear()
    (problem,) = check_input(model)
    assert problem.startswith(f"{model}: corrupt: sha256")
    assert set(reads) == {model / "model.safetensors"}  # (twice: again under the lock before refusing)
    flip_byte(model / "model.safetensors")  # content restored, mtime not: read, accepted
    assert check_input(model) == []
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[:-1])  # size changed
    assert check_input(model)[0].startswith(f"{model}: corrupt: sha256")
    (model / "model.safetensors").unlink()  # a copy (new inode) of the same content: read, accepted
    (model / "model.safetensors").write_bytes(weights)
    assert check_input(model) == []
    flip_byte(table, keep_mtime=True)
    os.utime(table, ns=(0, json.loads(sidecar_path(table).read_text())["stat"]["mtime_ns"]))
    assert check_input(table) == []  # same size, mtime and inode: trusted
    assert verify(table)[0].startswith(f"{table}: corrupt")


def test_verify_repair_removes_what_is_damaged_and_reports_it(tmp_path, capsys):
    store_dir, arts, expected = make_store(tmp_path)
    busy = store_dir / "stage-ab12" / f".good.parquet.tmp-{os.getpid()}@{host()}-inflight"
    busy.write_bytes(b"a live write")  # in progress here: a note, never removed
    elsewhere = store_dir / "stage-ab12" / ".other.parquet.tmp-1@elsewhere-fresh123"
    elsewhere.write_bytes(b"maybe a live write on another node")
    stray = tmp_path / "notes.txt"  # a file that is no artifact, in a directory memctl never wrote
    stray.write_text("mine")
    before = {p: p.read_bytes() for p in [arts["good"], sidecar_path(arts["good"]), stray]}

    with pytest.raises(SystemExit) as exit_:
        main(["verify", "--repair", str(store_dir), str(stray)])
    assert exit_.value.code == 1  # two problems are left, each saying why
    out = capsys.readouterr().out.strip().splitlines()
    removed = {line.removeprefix("removed ") for line in out if line.startswith("removed ")}
    side = lambda p: str(sidecar_path(p))  # noqa: E731
    by_kind = {words: path for path, words in expected.items()}
    model, orphan = by_kind["corrupt"], by_kind["incomplete: missing, but its sidecar"]
    model = next(p for p in expected if p.name == "model-cd34")
    want = {str(arts[name]) for name in ("truncated", "flipped", "bad_sidecar", "thin_sidecar")}
    want |= {side(arts[name]) for name in ("truncated", "flipped", "bad_sidecar", "thin_sidecar")}
    want |= {str(model), side(model), side(orphan)}  # a sidecar whose artifact is missing: the sidecar
    want |= {str(p) for p, words in expected.items() if "leftover" in words}
    assert removed == want
    assert all(not os.path.lexists(p) for p in removed)
    # Without a sidecar and without a plan naming them, the store cannot tell an artifact from a
    # file it did not write: left alone (tests/test_store_ownership.py removes them with the plan).
    bare = next(p for p, words in expected.items() if "directory without" in words)
    left = [line for line in out if ": not removed: " in line]
    assert [line.split(": not removed: ")[0] for line in left] == [str(bare), str(arts["no_sidecar"]), str(elsewhere)]
    assert f"{stray}: unknown file, not written by memctl: left alone" in out  # reported, not a problem
    assert out[-1].startswith(f"repair: removed {len(want)} paths, 3 problems left")
    assert f"{store_dir / 'stage-ab12' / 'notes.txt'}: unknown file, not written by memctl: left alone" in out
    assert {p: p.read_bytes() for p in before} == before and busy.exists()
    assert (store_dir / "stage-ab12" / "notes.txt").read_text() == "mine"
    assert arts["no_sidecar"].exists() and (bare / "tokenizer.json").exists()
    report = verify_paths([store_dir])
    assert sorted(p.split(": ")[0] for p in report.problems) == sorted(map(str, [bare, arts["no_sidecar"], elsewhere]))
    assert main(["verify", "--repair", str(arts["good"])]) is None  # nothing to repair: exit 0


def test_an_input_being_replaced_is_not_called_corrupt(tmp_path, monkeypatch):
    """A writer writes the new sidecar, then renames the new content in, both under the
    directory's lock: a stage reading between the two looks again under the lock."""
    import threading

    from memctl.store import check_input

    table = tmp_path / "t.parquet"
    write_parquet(pd.DataFrame({"x": [1]}), table, provenance=Provenance("unit", {}))
    renamed, looked = threading.Event(), threading.Event()
    real = atomic._rename_into_place

    def slow_rename(tmp, final, directory):
        looked.wait(5)  # the new sidecar is in place, the old content still is: the reader checks now
        time.sleep(0.2)
        garbage = real(tmp, final, directory)
        renamed.set()
        return garbage

    monkeypatch.setattr(atomic, "_rename_into_place", slow_rename)
    writer = threading.Thread(
        target=write_parquet, args=(pd.DataFrame({"x": [2]}), table), kwargs={"provenance": Provenance("unit", {})}
    )
    writer.start()
    while json.loads(sidecar_path(table).read_text())["sha256"] == hash_path(table):
        time.sleep(0.01)
    looked.set()
    assert check_input(table) == [] and renamed.is_set()
    writer.join()
    assert verify(table) == []
