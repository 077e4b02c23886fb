"""Integrity of a shared store with real processes: SIGKILL mid-write, concurrent writers, and two
Snakemake runs (two working directories, one `root`) at once, then a killed DAG job and its rerun;
damaged inputs refused by the stages, `memctl verify --repair`, and what the next run rebuilds.

Kills are made deterministic by MEMCTL_TEST_PAUSE_BEFORE_RENAME (memctl/store/atomic.py): the writer prints
a line and sleeps between finishing its temporary and the rename; the test SIGKILLs it there. The
other points (after the sidecar, before Provenance.write) are reached by a writer that SIGKILLs
itself there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import tiny_store as ts
import yaml

from memctl.store import (
    LOCK_NAME,
    PAUSE_ENV,
    directory_lock,
    leftover,
    sidecar_path,
    verify,
    verify_paths,
)

REPO = Path(__file__).resolve().parents[1]
TINY = Path(__file__).with_name("tiny_config.yaml")
BIN = Path(sys.executable).parent
ENV = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
ENV.pop(PAUSE_ENV, None)

# One write of an artifact, killed (SIGKILL) where argv[4] says:
#   pause              - by the test, while paused between the finished temporary and the rename
#   after-sidecar      - by itself, once the sidecar of the new content is in place
#   before-provenance  - by itself, after the rename, before Provenance.write (stages that write
#                        first and stamp sidecars afterwards)
#   none               - not at all
WRITER = r"""
import os, signal, sys
from pathlib import Path
from memctl.store import Provenance, atomic, atomic_path

final, kind, content, kill = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if kill == "after-sidecar":
    atomic._rename_into_place = die
prov = Provenance("unit", {"content": content})
late = kill == "before-provenance"
with atomic_path(final, directory=kind == "dir", provenance=None if late else prov) as tmp:
    if kind == "dir":
        (tmp / "config.json").write_text(content)
        (tmp / "weights.bin").write_bytes(content.encode() * 100_000)
    else:
        tmp.write_bytes(content.encode() * 100_000)
if late:
    prov.write = die
    prov.write(final)
"""


def run_writer(final, kind, content, kill="none"):
    cmd = [sys.executable, "-c", WRITER, str(final), kind, content, kill]
    if kill != "pause":
        return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120, check=False).returncode
    proc = subprocess.Popen(cmd, env=dict(ENV, **{PAUSE_ENV: "120"}), stderr=subprocess.PIPE, text=True)
    wait_for_pause(proc, f"{PAUSE_ENV}: {final} is complete")
    proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=30)


def wait_for_pause(proc: subprocess.Popen, expected: str) -> None:
    """Read the writer's stderr until it says it is pausing before a rename (it sleeps there)."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if expected in line:
            return
    pytest.fail(f"no pause ({expected!r}); exit {proc.wait()}:\n{''.join(seen)[-3000:]}")


def memctl(*argv, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``memctl ARGV`` (in ``cwd``) in this process (``tiny_store.memctl_in_process``). Only what is
    about processes (kills, concurrent writers and runs) runs a process of its own."""
    return ts.memctl_in_process(*argv, cwd=cwd)


def memctl_verify(path) -> subprocess.CompletedProcess:
    return memctl("verify", path)


def content_of(final, kind):
    return (final / "config.json").read_text() if kind == "dir" else final.read_bytes()[:2].decode()


def entries(directory):
    return sorted(p.name for p in directory.iterdir() if p.name != LOCK_NAME)


@pytest.mark.parametrize(
    "kind, overwrite, kill",
    [
        ("file", False, "pause"),
        ("file", True, "pause"),
        ("dir", False, "pause"),
        ("dir", True, "pause"),
        ("file", True, "after-sidecar"),
        ("dir", False, "after-sidecar"),
        ("file", False, "before-provenance"),
        ("dir", True, "before-provenance"),
    ],
)
def test_sigkill_mid_write_leaves_nothing_accepted_and_the_rerun_completes(tmp_path, kind, overwrite, kill):
    final = tmp_path / "stage-1a2b" / ("model" if kind == "dir" else "table.bin")
    if overwrite:
        assert run_writer(final, kind, "v1") == 0
        assert verify(final) == []

    assert run_writer(final, kind, "v2", kill) == -signal.SIGKILL
    problems = verify_paths([final.parent]).problems
    assert problems, "a killed write must not verify clean"
    assert all(line.startswith(str(final.parent) + "/") for line in problems), problems
    # What a later run would read under the final name is never the new content without its
    # matching sidecar: either the old artifact (still described by its own sidecar) or nothing.
    if kill == "pause":
        assert not final.exists() if not overwrite else content_of(final, kind) == "v1"
        assert any("leftover of an interrupted write" in p for p in problems), problems
        if overwrite:
            assert verify(final)[0].startswith(str(tmp_path / "stage-1a2b" / f".{final.name}.tmp-"))
        else:
            assert f"{final}: missing" in verify(final)
    elif kill == "after-sidecar":
        if overwrite:
            assert content_of(final, kind) == "v1"
            assert any(p.startswith(f"{final}: corrupt: sha256") for p in problems), problems
        else:
            assert not final.exists()
            assert any(p.startswith(f"{final}: incomplete: missing, but its sidecar") for p in problems), problems
    else:  # renamed, sidecar never (re)written: flagged until the job is rerun
        assert content_of(final, kind) == "v2"
        words = "corrupt: sha256" if overwrite else "incomplete: no provenance sidecar"
        assert any(p.startswith(f"{final}: {words}") for p in problems), problems
    cli = memctl_verify(tmp_path)
    assert cli.returncode == 1
    assert [line.split(" (")[0] for line in cli.stdout.strip().splitlines()[:-1]] == [p.split(" (")[0] for p in problems]

    assert run_writer(final, kind, "v2") == 0  # the rerun
    assert content_of(final, kind) == "v2"
    assert verify(final) == [] and verify_paths([tmp_path]).problems == []
    assert entries(final.parent) == sorted([final.name, sidecar_path(final).name])  # leftovers gone


def test_killed_stage_command_is_flagged_and_its_rerun_completes(tmp_path):
    """A real stage (memctl demo-corpus, three tables, each sidecar written before its table's
    rename) SIGKILLed while its last table waits for its rename: the two finished tables are
    complete, the interrupted one is only a flagged leftover."""
    out = tmp_path / "corpus"
    cmd = [
        str(BIN / "memctl"), "demo-corpus", "--out-dir", str(out),
        "--settings", json.dumps({"max_chars": 20000, "heldout_fraction": 0.2}),
        "--canary-settings", json.dumps({"copies": [1, 4], "per_count": 1, "kinds": ["words"], "words": 48}),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=dict(ENV, **{PAUSE_ENV: "120:canaries"}), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_pause(proc, f"{out / 'canaries.parquet'} is complete")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL

    assert not (out / "canaries.parquet").exists()
    report = verify_paths([out])
    flagged = {re.match(r"(\S+): ", p)[1] for p in report.problems}
    (tmp,) = out.glob(".canaries.parquet.tmp-*")
    assert flagged == {str(tmp)}
    assert verify_paths([out / "train.parquet", out / "heldout.parquet"]).problems == []
    assert leftover(tmp).alive is False

    rerun = memctl(*cmd[1:])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert verify_paths([out]).problems == [] and verify_paths([out]).checked == 3
    assert not list(out.glob(".*.tmp-*"))


# Two writers replace the same artifacts (a file, a directory, and a file stamped afterwards by
# Provenance.write) as fast as they can; a reader checks that every read sees one complete
# version, and that under the directory lock each sidecar matches its artifact.
RACER = r"""
import random, sys, time
from pathlib import Path
from memctl.store import Provenance, atomic, atomic_path
from memctl.store import provenance as store_provenance

store, me, n, go, exchange = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
if exchange == "no":
    atomic._exchange = lambda a, b: False
# A slow shared filesystem: widen the windows between a sidecar and its rename, and between a
# checksum and its sidecar, where a writer without the directory lock would let the other in.
real_sidecar, real_hash = store_provenance.write_sidecar, store_provenance.hash_path
def slow_sidecar(*args):
    real_sidecar(*args)
    time.sleep(random.random() * 0.004)
def slow_hash(*args, **kwargs):
    digest = real_hash(*args, **kwargs)
    time.sleep(random.random() * 0.004)
    return digest
# atomic_path and Provenance.write each look both up in their own module
atomic.write_sidecar = store_provenance.write_sidecar = slow_sidecar
atomic.hash_path = store_provenance.hash_path = slow_hash
while not go.exists():
    time.sleep(0.001)
prov = Provenance("race", {"writer": me})
for i in range(n):
    head = f"{me}:{i:04d}:".encode()
    blob = head * (1_000_000 // len(head))
    with atomic_path(store / "table.bin", provenance=prov) as tmp:
        with open(tmp, "wb") as fh:
            for k in range(0, len(blob), 65536):  # many small writes: interleaving would show
                fh.write(blob[k : k + 65536])
    with atomic_path(store / "model", directory=True, provenance=prov) as tmp:
        (tmp / "weights.bin").write_bytes(blob)
        (tmp / "config.json").write_text(head.decode())
    with atomic_path(store / "late.bin") as tmp:
        tmp.write_bytes(blob)
    prov.write(store / "late.bin")
"""


def check_blob(data: bytes) -> tuple[str, int]:
    """(writer, iteration) of a complete version; fails on a torn or interleaved one."""
    me, i = data[:16].decode().split(":")[:2]
    head = f"{me}:{i}:".encode()
    assert data == head * (1_000_000 // len(head)), f"torn content starting {data[:16]!r}"
    return me, int(i)


@pytest.mark.parametrize("exchange", ["yes", "no"], ids=["renameat2-exchange", "move-aside"])
def test_concurrent_writers_of_one_artifact_corrupt_nothing(tmp_path, exchange):
    store, go, n = tmp_path / "store", tmp_path / "go", 25
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, str(store), me, str(n), str(go), exchange], env=ENV)
        for me in ("a", "b")
    ]
    reads, stop, failures = {"table.bin": 0, "late.bin": 0, "model": 0}, threading.Event(), []

    def reader():
        while not stop.is_set():
            # Under the directory lock a sidecar and its artifact always agree.
            with directory_lock(store) if store.exists() else contextlib.nullcontext():
                for name in ("table.bin", "model"):
                    if sidecar_path(store / name).exists():
                        failures.extend(verify(store / name))
            for name in reads:
                try:
                    if name == "model":
                        check_blob((store / "model" / "weights.bin").read_bytes())
                    else:
                        check_blob((store / name).read_bytes())
                    reads[name] += 1
                except FileNotFoundError:
                    pass  # not written yet (or, without the exchange, a directory moved aside)
                except Exception as err:  # noqa: BLE001 - reported below
                    failures.append(f"{name}: {err}")

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(1.0)  # both writers imported and waiting
    go.touch()
    try:
        assert [p.wait(timeout=300) for p in racers] == [0, 0]
    finally:
        stop.set()
        thread.join()
    assert failures == []
    assert min(reads.values()) > 0, reads
    # The last rename wins: it is some writer's last version, and its sidecar describes it.
    for final in (store / "table.bin", store / "late.bin", store / "model"):
        data = (final / "weights.bin" if final.is_dir() else final).read_bytes()
        me, i = check_blob(data)
        assert i == n - 1
        assert json.loads(sidecar_path(final).read_text())["settings"] == {"writer": me}
        assert verify(final) == []
    if exchange == "yes":
        assert reads["model"] > 0
    report = verify_paths([store])
    assert (report.problems, report.notes, report.checked) == ([], [], 3)
    assert entries(store) == sorted(["late.bin", "late.bin.meta.json", "model", "model.meta.json", "table.bin",
                                     "table.bin.meta.json"])


def test_a_late_stamp_leaves_another_writers_version_to_that_writer(tmp_path):
    """The race the test above hunts, made deterministic: this process renames its version of a
    file in (``atomic_path`` without provenance), another process renames its own in and stamps
    it, then this process stamps: it must not put its sidecar on the other writer's data."""
    from memctl.store import Provenance, atomic_path

    final = tmp_path / "store" / "late.bin"
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"a" * 1000)
    other = r"""
import sys
from pathlib import Path
from memctl.store import Provenance, atomic_path
final = Path(sys.argv[1])
with atomic_path(final) as tmp:
    tmp.write_bytes(b"b" * 1000)
Provenance("race", {"writer": "b"}).write(final)
"""
    subprocess.run([sys.executable, "-c", other, str(final)], env=ENV, check=True, timeout=120)
    Provenance("race", {"writer": "a"}).write(final)  # too late: b's version is in place
    assert final.read_bytes() == b"b" * 1000
    assert json.loads(sidecar_path(final).read_text())["settings"] == {"writer": "b"}
    assert verify(final) == []
    # Put in place by other means (never renamed in by this process): stamped as it is.
    elsewhere = tmp_path / "store" / "copied.bin"
    elsewhere.write_bytes(b"c" * 10)
    Provenance("copy", {"writer": "a"}).write(elsewhere)
    assert json.loads(sidecar_path(elsewhere).read_text())["settings"] == {"writer": "a"} and verify(elsewhere) == []


# ------------------------------------------------------------------ claims of runs on one store
# A holder process claims paths in a store (as a Snakemake run's onstart hook does) and waits.
HOLDER = r"""
import json, sys, time
from memctl.store import claim_paths
root, outputs, inputs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(claim_paths(root, outputs, inputs), flush=True)
time.sleep(300)
"""


def claimer(root, outputs, inputs=(), keep=False) -> list[str]:
    return [sys.executable, "-c", HOLDER if keep else HOLDER.replace("time.sleep(300)", ""), str(root),
            json.dumps([str(p) for p in outputs]), json.dumps([str(p) for p in inputs])]  # fmt: skip


def hold(root, outputs, inputs=()) -> subprocess.Popen:
    """A process that holds these claims until killed."""
    proc = subprocess.Popen(claimer(root, outputs, inputs, keep=True), env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == str(len(set(outputs) | set(inputs)))
    return proc


def probe(root, outputs, inputs=()) -> subprocess.CompletedProcess:
    """Claim in a fresh process (which exits at once)."""
    return subprocess.run(claimer(root, outputs, inputs), env=ENV, capture_output=True, text=True, timeout=60, check=False)


def test_claims_refuse_conflicting_runs_and_die_with_their_holder(tmp_path):
    from memctl.store import claim_paths

    store = tmp_path / "store"
    model, table, other = store / "demo/model-1", store / "x-2/extract.parquet", store / "x-3/extract.parquet"
    holder = hold(store, outputs=[table], inputs=[model])
    try:
        for outputs, inputs, conflict in [
            ([table], [], f"reads or writes {table} "),  # the same output
            ([model], [], f"reads or writes {model} "),  # an output the holder reads
            ([other], [table], f"writes {table} "),  # an input the holder writes
        ]:
            refused = probe(store, outputs, inputs)
            assert refused.returncode == 1, refused.stderr
            assert f"StoreBusy: store {store} is busy: another running workflow {conflict}" in refused.stderr
        assert probe(store, [other], [model]).returncode == 0  # reading what it reads, writing elsewhere
        assert claim_paths(store, [other], [model]) == 2  # this process now holds `other`
        assert "StoreBusy" in probe(store, [other]).stderr
    finally:
        holder.kill()
        holder.wait()
    # SIGKILLed: its claims went with it, nothing stale to unlock.
    assert probe(store, [table], [model]).returncode == 0
    assert stat.S_IMODE((store / ".memctl-claims").stat().st_mode) & 0o060 == 0o060
    assert verify_paths([store]).problems == []


# --------------------------------------------------------------------- Snakemake, shared store
#
# The base tiny DAG (demo model, extraction, held-out text, evaluation, report; the edit stages
# are switched off and the demo model is trained on less, to keep these real Snakemake runs short:
# lab_workdir) with `root` pointing at one store shared by the working
# directories of several users. Snakemake's own lock only sees runs from the same working
# directory; runs on one store claim their outputs and inputs there (memctl.store.
# claim_workflow, the project Snakefile's onstart hook; each working directory's Snakefile
# includes the project's).

WRAPPER = f"""
include: {str(REPO / "Snakefile")!r}
"""


def workdir(path: Path, store: Path, **sections) -> Path:
    cfg = yaml.safe_load(TINY.read_text())
    base = {"root", "results_dir", "model", "demo", "candidates", "extract", "heldout", "evaluate", "resources"}
    cfg = {key: value for key, value in cfg.items() if key in base}
    cfg["masks"] = {"enabled": False}
    cfg["root"] = str(store)
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    (path / "config").mkdir(parents=True)
    (path / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    (path / "Snakefile").write_text(WRAPPER)
    return path


def lab_workdir(path: Path, store: Path, **sections) -> Path:
    """A working directory of the lab's store: the base tiny DAG, its demo model trained on a corpus
    of the schema's smallest size for 150 steps instead of 400 (each of the ten jobs is a process
    of its own; it still memorizes some sequences)."""
    demo = yaml.safe_load(TINY.read_text())["demo"]
    demo["corpus"]["max_chars"] = 10_000
    demo["train"]["steps"] = 150
    return workdir(path, store, demo=demo, **sections)


def snakemake_cmd(work: Path, *args: str) -> list[str]:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(work / "Snakefile"), "-d", str(work), "--cores", "1"]
    return cmd + ([] if "--unlock" in args else ["all"]) + list(args)


def start(work: Path, *args: str, env=None) -> subprocess.Popen:
    with open(work / "snakemake.out", "w") as log:
        return subprocess.Popen(
            snakemake_cmd(work, *args), env=env or ENV, stdout=log, stderr=subprocess.STDOUT, umask=0o022,
            start_new_session=True,
        )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: int = 900) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run(work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_cmd(work, *args), env=ENV, capture_output=True, text=True, timeout=900, umask=0o022, check=False)


def output(work: Path) -> str:
    return (work / "snakemake.out").read_text()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Two users' working directories, one store; both runs started at the same moment."""
    base = tmp_path_factory.mktemp("lab")
    store = base / "store"
    users = [lab_workdir(base / user, store) for user in ("alice", "bob")]
    t0 = time.time()
    procs = [start(work) for work in users]
    codes = [finish(proc) for proc in procs]
    return {"store": store, "users": users, "codes": codes, "seconds": time.time() - t0}


@pytest.mark.slow  # two real Snakemake runs on one store (the lab fixture)
def test_two_concurrent_runs_on_one_store_one_is_refused_and_nothing_is_corrupt(lab):
    store, users, codes = lab["store"], lab["users"], lab["codes"]
    print(f"two tiny DAGs started together on one store: {lab['seconds']:.0f} s, exit codes {codes}")
    assert sorted(codes) in ([0, 0], [0, 1]), [output(work)[-3000:] for work in users]
    for work, code in zip(users, codes):
        if code:  # refused before any job started, naming a path of the store
            text = output(work)
            assert f"store {store} is busy: another running workflow" in text, text[-3000:]
            assert "Finished jobid" not in text
    report = verify_paths([store])
    assert report.problems == [] and report.notes == [], report.problems
    assert report.checked >= 16
    assert not [p for p in store.rglob("*") if leftover(p)]
    # Run again after the other has finished, the refused user's workflow only writes its own
    # results tables (results_dir is in the working directory): the store is reused as it is.
    before = {p: sha(p) for p in store.rglob("*.meta.json")}
    for work, code in zip(users, codes):
        if code:
            again = run(work)
            assert again.returncode == 0, again.stderr[-3000:]
            assert set(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", again.stdout + again.stderr)) == {"report", "all"}
    assert {p: sha(p) for p in store.rglob("*.meta.json")} == before
    tables = [{p.name: sha(p) for p in (work / "results" / "tables").glob("*.parquet")} for work in users]
    assert "results.parquet" in tables[0] and tables[0] == tables[1]  # the same tables, byte for byte


@pytest.mark.slow  # two real Snakemake runs on one store (the lab fixture)
def test_store_is_group_writable(lab):
    """What memctl writes into the store (artifacts, their contents, sidecars, lock and claims
    files) is group-writable under a 022 umask; so is each directory artifact."""
    store = lab["store"]
    written = [p for p in store.rglob("*") if "logs" not in p.parts and "benchmarks" not in p.parts]
    files = [p for p in written if p.is_file() and p.name != ".snakemake_timestamp"]
    assert len(files) > 30 and store / ".memctl-claims" in files
    assert [p for p in files if stat.S_IMODE(p.stat().st_mode) != 0o664] == []
    artifact_dirs = [p for p in written if p.is_dir() and sidecar_path(p).exists()]
    assert len(artifact_dirs) >= 2  # tokenizer, model
    assert [p for p in artifact_dirs if stat.S_IMODE(p.stat().st_mode) != 0o775] == []


@pytest.mark.slow  # two real Snakemake runs on one store (the lab fixture)
def test_killed_dag_job_is_not_accepted_and_rerun_incomplete_completes(lab, tmp_path):
    """SIGKILL Snakemake and its extract job while a table waits for its rename (a new extract
    setting, so extraction, evaluation and the report run on the shared store; not a batch size,
    which keys nothing)."""
    store = lab["store"]
    carol = lab_workdir(tmp_path / "carol", store, extract={"split_seed": 43})
    proc = start(carol, env=dict(ENV, **{PAUSE_ENV: "300:memorized.parquet"}))
    pause = None
    deadline = time.time() + 600
    while pause is None and time.time() < deadline and proc.poll() is None:
        for log in store.glob("logs/extract/*.log"):
            pause = re.search(rf"{PAUSE_ENV}: (\S+) is complete in (\S+);", log.read_text()) or pause
        time.sleep(0.2)
    try:
        assert pause, f"the extract job never paused:\n{output(carol)[-3000:]}"
        final = Path(pause[1])
        tmp = final.with_name(pause[2])
        writer = leftover(tmp).pid
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and its jobs: one process group
        proc.wait(timeout=30)
    deadline = time.time() + 30
    while leftover(tmp).alive and time.time() < deadline:
        time.sleep(0.1)
    assert leftover(tmp).alive is False, f"writer {writer} survived"

    extract_dir = final.parent
    assert final.name == "memorized.parquet" and not final.exists()
    cli = memctl_verify(store)
    assert cli.returncode == 1
    problems = cli.stdout.strip().splitlines()[:-1]
    assert any(p.startswith(f"{tmp}: leftover of an interrupted write of memorized.parquet") for p in problems)
    # tables renamed before the kill carry their sidecars (written first): each is sound on its own,
    # and Snakemake (below) still treats the job's outputs as incomplete
    assert not any(p.startswith(f"{extract_dir / 'extraction.parquet'}:") for p in problems), problems
    assert all(p.startswith(str(extract_dir) + "/") for p in problems), problems

    # Nothing accepts it: the same working directory refuses its incomplete files, another
    # user's working directory on the same store schedules the extraction again.
    refused = run(carol, "-n")
    assert refused.returncode != 0 and "incomplete" in (refused.stdout + refused.stderr).lower()
    dave = lab_workdir(tmp_path / "dave", store, extract={"split_seed": 43})
    planned = run(dave, "-n", "--quiet", "rules").stdout
    assert re.search(r"^extract\s+1$", planned, re.MULTILINE), planned

    # Snakemake itself was killed too, so its own lock on carol's working directory is stale (the
    # store claims died with it).
    assert run(carol, "--unlock").returncode == 0
    rerun = run(carol, "--rerun-incomplete")
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    report = verify_paths([store])
    assert report.problems == [] and report.notes == []
    assert not tmp.exists() and final.exists()
    ext = pd.read_parquet(extract_dir / "extraction.parquet")
    mem, non = pd.read_parquet(final), pd.read_parquet(extract_dir / "nonmemorized.parquet")
    ood = pd.read_parquet(extract_dir / "ood.parquet")  # the out-of-domain quotes: in no other table
    assert len(mem) + len(non) + len(ood) == len(ext) and mem["exact_match"].all()


# ------------------------------------------- damaged inputs are refused, repaired and rebuilt
#
# One store with an edit (the base tiny DAG plus one SVD edit: K-FAC is not needed for it): a
# flipped byte in a delta, in memorized_test.parquet or in the model's weights is refused by the
# stage that reads it (before any compute, naming the file) and reported by `memctl verify`;
# `memctl verify --repair` removes it and the next run rebuilds exactly it and what depends on it,
# with the undamaged run's numbers. A run killed during `--forcerun evaluate` leaves the previous
# outputs in place (file outputs are marked `update`), and a failed forced report keeps its tables.
# The store is built by hand (fixture `edited`); every rerun and refusal is Snakemake's own.

SVD_ONLY = {"edits": [{"method": "svd", "layers": [0], "strength": 0.5}], "spectrum": {"enabled": False}}
DAMAGED = {  # what is damaged -> (glob in the store, the artifact it belongs to: "file" or its "dir")
    "svd delta": ("*/edits/svd-*/delta.safetensors", "file"),
    "memorized_test": ("*/extract-*/memorized_test.parquet", "file"),
    "model weights": ("demo/model-*/model.safetensors", "dir"),
}


def jobs_of(text: str) -> dict[str, int]:
    """Jobs per rule from Snakemake's job stats (a dry run's, or a run's)."""
    jobs = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] not in ("job", "total", "all", "count"):
            jobs[parts[0]] = int(parts[1])
    return jobs


def planned(work: Path, *args: str) -> dict[str, int]:
    """Jobs per rule that a dry run of ``all`` schedules (empty: nothing to be done)."""
    proc = run(work, "-n", "--quiet", "rules", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return jobs_of(proc.stdout + proc.stderr)


def results_table(work: Path) -> pd.DataFrame:
    return pd.read_parquet(work / "results" / "tables" / "results.parquet")


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """The store with an edit: every job of the plan run by hand in this process (tests/tiny_store.py:
    each job's command line, as its rule runs it), then recorded by Snakemake as a finished run
    (``--touch --forceall``: its params, code and input records of every job), so that its dry runs
    and reruns decide as after a real ``snakemake`` run."""
    base = tmp_path_factory.mktemp("edited")
    work = workdir(base / "work", base / "store", curvature=SVD_ONLY)
    t0 = time.time()
    for job in ts.needed(ts.plan_of(work)):
        ts.run_by_hand(work, job)
    touched = run(work, "--touch", "--forceall", "--quiet")
    assert touched.returncode == 0, touched.stderr[-4000:]
    assert planned(work) == {}
    return {"work": work, "store": base / "store", "results": results_table(work), "seconds": time.time() - t0}


def damaged_path(edited, case: str) -> tuple[Path, Path]:
    """(the file to damage, the artifact it belongs to)."""
    pattern, kind = DAMAGED[case]
    (path,) = edited["store"].glob(pattern)
    return path, path if kind == "file" else path.parent


def flip(path: Path) -> None:
    """Flip bits of one byte in place; in a safetensors file, the top byte of the first float32
    tensor's first value (|w| becomes ~1e37-1e38: the file still loads, the numbers are garbage);
    in any other file, a byte in the middle (a parquet file may still read)."""
    data = bytearray(path.read_bytes())
    if path.suffix == ".safetensors":
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        start = min(v["data_offsets"][0] for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
        data[8 + n + start + 3] ^= 0x7E
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def evaluate_command(work: Path, edit_prefix: str, out_dir: Path) -> list[str]:
    """The arguments of the `memctl evaluate` command of one evaluation job (as a forced dry run
    prints it), writing to ``out_dir`` instead of the store."""
    proc = run(work, "-n", "-p", "--forcerun", "evaluate")
    for line in (proc.stdout + proc.stderr).splitlines():
        line = line[line.find("memctl evaluate ") :]  # after "Shell command: "
        if line.startswith("memctl evaluate ") and f"--edit {edit_prefix}" in line:
            words = shlex.split(line.split(" > ")[0])
            words[words.index("--out-dir") + 1] = str(out_dir)
            return words[1:]
    pytest.fail(f"no evaluate command for {edit_prefix}:\n{proc.stdout[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DAMAGED))
def test_evaluate_refuses_a_damaged_input_naming_it(edited, tmp_path, case):
    """The evaluation of the SVD edit reads the delta, the memorized test split and the model:
    a flipped byte in any of them is refused (exit status 2, one line naming the file) before
    anything is computed, and `memctl verify` reports it."""
    path, artifact = damaged_path(edited, case)
    out = tmp_path / "out"
    cmd = evaluate_command(edited["work"], "svd-", out)
    original, st = path.read_bytes(), path.stat()
    flip(path)
    try:
        t0 = time.time()
        refused = memctl(*cmd, cwd=edited["work"])
        seconds = time.time() - t0
        checked = memctl_verify(edited["store"])
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    print(f"{case}: refused in {seconds:.1f} s")
    assert refused.returncode == 2, refused.stderr[-3000:]
    (line,) = [x for x in refused.stderr.splitlines() if x.startswith("memctl evaluate: error:")]
    assert line.startswith(f"memctl evaluate: error: {artifact}: corrupt: sha256"), line
    if artifact != path:  # a file of a directory artifact: named too
        assert f"; {path.name} differs" in line, line
    assert "evaluate: started" not in refused.stderr and "Traceback" not in refused.stderr
    assert not out.exists()  # nothing computed, nothing written
    assert checked.returncode == 1
    assert [x.split(": ")[0] for x in checked.stdout.splitlines()[:-1]] == [str(artifact)]
    assert verify(artifact) == []  # restored


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, rebuilt",
    [
        ("svd delta", {"apply_edit": 1, "evaluate": 1, "curvature_report": 1, "report": 1}),
        ("memorized_test", {"extract": 1, "calibration": 1, "reference_topk": 1, "evaluate": 2, "curvature_report": 1,
                            "report": 1}),
        ("model weights", None),  # everything after the model: a dry run only (see below)
    ],
)
def test_verify_repair_then_the_next_run_rebuilds_exactly_the_damaged(edited, tmp_path, case, rebuilt):
    work, store = edited["work"], edited["store"]
    path, artifact = damaged_path(edited, case)
    recorded = json.loads(sidecar_path(artifact).read_text())["sha256"]
    if rebuilt is None:  # keep the sound model, to put it back instead of retraining it
        backup = tmp_path / "backup"
        backup.mkdir()
        os.rename(artifact, backup / artifact.name)
        shutil.copytree(backup / artifact.name, artifact, copy_function=shutil.copy2)
        shutil.copy2(sidecar_path(artifact), backup)
    flip(path)

    repaired = memctl("verify", "--repair", store, work / "results")
    assert repaired.returncode == 0, repaired.stdout[-3000:]
    removed = [x.removeprefix("removed ") for x in repaired.stdout.splitlines() if x.startswith("removed ")]
    assert removed == [str(artifact), str(sidecar_path(artifact))]
    assert not artifact.exists() and not sidecar_path(artifact).exists()
    assert verify_paths([store]).problems == []

    jobs = planned(work)
    if rebuilt is None:
        assert jobs["demo_pretrain"] == 1 and "demo_corpus" not in jobs and "demo_tokenizer" not in jobs, jobs
        assert {"extract", "evaluate", "report"} <= set(jobs), jobs
        shutil.rmtree(artifact, ignore_errors=True)
        os.rename(backup / artifact.name, artifact)
        os.rename(backup / sidecar_path(artifact).name, sidecar_path(artifact))
        assert planned(work) == {} and verify_paths([store]).problems == []
        return
    assert jobs == rebuilt
    again = run(work)
    assert again.returncode == 0, again.stderr[-4000:]
    finished = re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", again.stdout + again.stderr)
    assert {rule: finished.count(rule) for rule in set(finished) - {"all"}} == rebuilt
    assert json.loads(sidecar_path(artifact).read_text())["sha256"] == recorded  # the same bytes again
    assert verify_paths([store]).problems == [] and planned(work) == {}
    pd.testing.assert_frame_equal(results_table(work), edited["results"])


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["job", "workflow"])
def test_killed_forcerun_evaluate_keeps_the_previous_outputs_and_accepts_nothing_half_done(edited, kill):
    """SIGKILL during `snakemake --forcerun evaluate`, while an evaluation job waits to write its
    first table. Its outputs are marked `update`, so Snakemake did not delete them when it started
    the job: the previous tables stay in place, byte for byte and sound; the killed writer's
    temporary is the one problem `memctl verify` reports. Killed: the job only (the OOM killer):
    Snakemake stops and puts back its copy of the outputs, and they are accepted as they were
    (nothing to do). Or Snakemake with its jobs (its lock is stale: --unlock): the outputs stay
    marked incomplete, so a plain run refuses them, naming them, and the profile's run
    (rerun-incomplete) schedules the evaluation again and rebuilds it."""
    work, store = edited["work"], edited["store"]
    (metrics,) = store.glob("*/eval-*/svd-*/metrics.parquet")
    scores = metrics.with_name("scores.parquet")
    before = {p: sha(p) for p in (metrics, scores, sidecar_path(metrics), sidecar_path(scores))}
    # only this evaluation pauses (the origin's, forced too, runs through: --cores 1 runs them in turn)
    only = f"300:{scores.parent.name}/{scores.name}"
    proc = start(work, "--forcerun", "evaluate", env=dict(ENV, **{PAUSE_ENV: only}))
    pause, deadline = None, time.time() + 600
    while pause is None and time.time() < deadline and proc.poll() is None:
        for log in store.glob("logs/evaluate/*.log"):
            found = re.search(rf"{PAUSE_ENV}: (\S+) is complete in (\S+);", log.read_text())
            # a log of an earlier run may still hold a pause line: only a live writer's counts
            if found and Path(found[1]) == scores and (lo := leftover(scores.with_name(found[2]))) and lo.alive:
                pause = found
        time.sleep(0.2)
    try:
        assert pause, f"no evaluation paused:\n{output(work)[-3000:]}"
        tmp = scores.with_name(pause[2])
        if kill == "job":
            os.kill(leftover(tmp).pid, signal.SIGKILL)
            assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.time() + 30
    while leftover(tmp).alive and time.time() < deadline:
        time.sleep(0.1)
    assert {p: sha(p) for p in before} == before  # the previous outputs, untouched
    # sound, each against its sidecar; the killed writer's temporary is the one problem
    assert verify(metrics) == [] and [p.split(": ")[0] for p in verify(scores)] == [str(tmp)]
    assert [p.split(": ")[0] for p in verify_paths([store]).problems] == [str(tmp)]

    if kill == "job":
        assert "Restored previous version of" in output(work)
        assert planned(work) == {}
    else:
        assert run(work, "--unlock").returncode == 0
        refused = run(work, "-n")
        assert refused.returncode != 0 and "--rerun-incomplete" in refused.stdout + refused.stderr
        assert str(scores) in refused.stdout + refused.stderr
        expected = {"evaluate": 1, "curvature_report": 1, "report": 1}
        assert planned(work, "--profile", str(REPO / "profiles" / "local")) == expected
        again = run(work, "--rerun-incomplete")
        assert again.returncode == 0, again.stderr[-4000:]
        assert sha(metrics) == before[metrics]  # the same numbers again
    repaired = memctl("verify", "--repair", store)
    assert (repaired.returncode, not tmp.exists()) == (0, True), repaired.stdout[-2000:]
    report = verify_paths([store])
    assert report.problems == [] and report.notes == []
    assert planned(work) == {}
    pd.testing.assert_frame_equal(results_table(work), edited["results"])


@pytest.mark.slow
def test_a_failed_forced_report_leaves_the_previous_tables_in_place(edited):
    """`snakemake --forcerun report` with a corrupt input (a flipped byte in the SVD edit's
    metrics table) fails naming it, before anything is computed, and every table and plot of the
    previous report is still in place, byte for byte, with its sidecar: the stage's file outputs
    are marked `update`, so Snakemake neither deletes them before the job nor after its failure."""
    work, store = edited["work"], edited["store"]
    tables = work / "results" / "tables"
    shown = sorted(p.name for p in tables.iterdir() if p.suffix in (".md", ".html", ".parquet", ".png"))
    assert {"results.md", "results.html", "results.parquet", "curvature.md"} <= set(shown), shown
    before = {p: sha(p) for p in tables.rglob("*") if p.is_file()}
    (metrics,) = store.glob("*/eval-*/svd-*/metrics.parquet")
    original, st = metrics.read_bytes(), metrics.stat()
    flip(metrics)
    try:
        failed = run(work, "--forcerun", "report")
    finally:
        metrics.write_bytes(original)
        os.utime(metrics, ns=(st.st_atime_ns, st.st_mtime_ns))
    # the flipped file is newer than the tables: the curvature report, which reads it too, may be
    # scheduled first; whichever report starts refuses it, naming it, before it computes anything
    said = failed.stdout + failed.stderr
    error = re.search(r"Error in rule (curvature_report|report):.*?\n\s+log: (\S+)", said, re.DOTALL)
    assert failed.returncode != 0 and error, said[-3000:]
    log = Path(error[2]).read_text()
    command = error[1].replace("_", "-")
    assert log.startswith(f"memctl {command}: error: {metrics}: corrupt: sha256"), (log[-1500:], said[-3000:])
    assert "started" not in log
    assert {p: sha(p) for p in tables.rglob("*") if p.is_file()} == before
    report = verify_paths([tables])
    assert report.problems == [] and report.checked == len([p for p in before if p.name.endswith(".meta.json")])
    assert planned(work) == {}
