"""Integrity checks: :func:`verify` (one artifact), :func:`verify_paths` (``memctl verify``) and
:func:`repair` (``memctl verify --repair``).

An artifact is sound when its sidecar exists, has every provenance field, and records the
checksum of what is in place; leftovers of interrupted writes are reported too.

Repair removes only what the store wrote, so that the next run of the workflow rebuilds exactly
that: a damaged artifact that has a sidecar (with it), a sidecar whose artifact is missing, the
leftovers of dead writers (``.<name>.tmp-<pid>@<host>-...`` / ``.old-``), and an entry without
a sidecar only when the plan names it as an artifact (``memctl verify --configfile``). An entry
the store does not know (no sidecar, not in the plan, not in its directory's record of what
memctl wrote there) is reported as unknown and never deleted, and so is a directory the store did
not create. An entry without a sidecar that the record lists (memctl wrote it) is a problem; only
the plan's artifacts among them are removed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from memctl.store.hashing import _dir_files, differing_file, hash_path
from memctl.store.layout import LOCK_NAME, SIDECAR_SUFFIX, UNTRACKED_DIRS, UNTRACKED_NAMES, sidecar_path
from memctl.store.leftovers import STALE_ENV, Leftover, leftover, leftovers_of, remove
from memctl.store.locks import UNRECORDED, directory_lock
from memctl.store.provenance import (
    REQUIRED_FIELDS,
    has_files,
    is_container,
    mismatch,
    read_sidecar,
    store_kind,
)

#: How ``--repair`` learns which entries without a sidecar are the plan's artifacts.
WITH_PLAN = "memctl verify --repair --configfile CONFIG"


def verify(path: str | os.PathLike) -> list[str]:
    """Problems with one artifact, one line each naming the path; empty list = sound.

    Missing; no sidecar (incomplete); unreadable sidecar or one lacking provenance fields;
    checksum mismatch (corrupt); leftovers of interrupted writes of it.
    """
    path = Path(path)
    problems = [lo.describe() for lo in leftovers_of(path) if not lo.alive]
    return _check_artifact(path) + problems


def _check_artifact(path: Path) -> list[str]:
    side = sidecar_path(path)
    if not path.exists():
        if side.exists():
            return [f"{path}: incomplete: missing, but its sidecar {side.name} exists (write interrupted before the rename?)"]
        return [f"{path}: missing"]
    if not side.exists():
        return [f"{path}: incomplete: no provenance sidecar {side.name} (job killed before writing it?)"]
    try:
        meta = read_sidecar(path)
    except (OSError, ValueError) as err:
        return [f"{side}: corrupt sidecar ({err})"]
    lacking = [key for key in REQUIRED_FIELDS if key not in meta]
    if lacking:
        return [f"{side}: incomplete sidecar, lacks {', '.join(lacking)}"]
    digests: dict[str, str] = {}
    try:
        actual = hash_path(path, digests=digests)
    except OSError as err:
        return [f"{path}: unreadable ({err})"]
    if meta["sha256"] != actual:
        return [mismatch(path, actual, str(meta["sha256"]), differing_file(meta.get("stat"), digests))]
    return []


def _key(path: str | os.PathLike) -> str:
    return os.path.realpath(path)


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    #: Writes in progress by live processes on this host (not problems).
    notes: list[str] = field(default_factory=list)
    #: Entries the store does not know (no sidecar; not an artifact of the plan, or in a directory
    #: memctl never wrote into): reported, never removed, not problems.
    unknown: list[str] = field(default_factory=list)
    #: What :func:`repair` removes: artifacts with a sidecar that are corrupt, incomplete or have a
    #: bad sidecar; entries without a sidecar that the plan names as artifacts.
    damaged: list[Path] = field(default_factory=list)
    #: Entries without a sidecar in a directory memctl writes into, when no plan is known: an
    #: artifact without its provenance or a file memctl did not write (problems; never removed).
    unowned: list[Path] = field(default_factory=list)
    #: Leftovers of interrupted writes whose writer is not known to be alive.
    leftovers: list[Leftover] = field(default_factory=list)
    #: The plan's artifacts (real paths), or None when no plan is known.
    planned: frozenset[str] | None = None
    #: Each walked directory's record of what memctl wrote into it (memctl.store.locks).
    records: dict = field(default_factory=dict, repr=False)

    def add_leftover(self, lo: Leftover) -> None:
        (self.notes if lo.alive else self.problems).append(lo.describe())
        if not lo.alive:
            self.leftovers.append(lo)

    def add_artifact(self, path: Path) -> None:
        """An artifact named by a sidecar, or a path given to check."""
        if not sidecar_path(path).exists() and (path.exists() or path.is_symlink()):
            self.add_without_sidecar(path)
            return
        self.checked += 1
        problems = _check_artifact(path)
        self.problems += problems
        if problems and problems != [f"{path}: missing"]:
            self.damaged.append(path)

    def add_without_sidecar(self, path: Path) -> None:
        """An entry without a sidecar. The plan's artifact: incomplete, removable. One the store
        wrote (its directory's record lists it, :func:`~memctl.store.locks.written_as`), or, in
        a directory whose lock file keeps no record, possibly wrote: a problem that only the plan
        can settle, left alone. Any other: unknown (reported, left alone, not a problem)."""
        is_dir = path.is_dir() and not path.is_symlink()
        side = sidecar_path(path).name
        what = f"directory without provenance sidecar {side}" if is_dir else f"no provenance sidecar {side}"
        kind = store_kind(path, self.records)
        if kind == UNRECORDED and is_dir and (is_container(path) or not has_files(path)):
            kind = None
        if self.planned is not None and _key(path) in self.planned:
            self.checked += 1
            self.problems.append(
                f"{path}: incomplete: {what} (an artifact of the plan: job killed before writing it, or the"
                " sidecar deleted; --repair removes it, the next run rebuilds it)"
            )
            self.damaged.append(path)
            return
        if kind == "artifact":
            why = (f"though memctl wrote it as an artifact ({LOCK_NAME} lists it; job killed before writing it, or the"
                   " sidecar deleted)")
        elif kind == "plain":
            why = (f"memctl renamed it in without one ({LOCK_NAME} lists it; killed before Provenance.write stamped"
                   " it, or not an artifact, e.g. a checkpoint)")
        elif kind == UNRECORDED and self.planned is None:
            why = ("in a directory memctl writes artifacts into (job killed before writing it, the sidecar deleted,"
                   " or a file memctl did not write: `--configfile CONFIG` tells)")
        else:
            where = "" if self.planned is None else " (no sidecar, not an artifact of the plan)"
            kind_word = "directory" if is_dir else "file"
            self.unknown.append(f"{path}: unknown {kind_word}, not written by memctl{where}: left alone")
            return
        self.checked += 1
        self.problems.append(f"{path}: incomplete: {what}, {why}")
        self.unowned.append(path)

    def add_directory(self, path: Path) -> None:
        """A directory without a sidecar: a container of artifacts is walked; any other is one
        entry (a directory artifact without its sidecar, or not the store's)."""
        if is_container(path) or not has_files(path):
            _walk(path, self)
        else:
            self.add_without_sidecar(path)


def verify_paths(paths: Iterable[str | os.PathLike], planned: Iterable[str | os.PathLike] | None = None) -> VerifyReport:
    """Check artifacts and trees of artifacts (what ``memctl verify`` prints).

    A directory with a sidecar is one artifact. A directory without one that memctl wrote into
    (it or a directory below holds ``.memctl.lock``, or sidecars are inside) is walked: each
    artifact in it is checked, a sidecar without its artifact and leftovers of interrupted writes
    are reported; hidden files, ``logs/``, ``benchmarks/`` and ``.snakemake/`` are skipped. An
    entry without a sidecar is, with ``planned`` (the plan's artifacts, :meth:`memctl.plan.Plan.
    artifacts`), incomplete when the plan names it and unknown otherwise; without a plan,
    possibly incomplete when it lies in a directory memctl wrote into, unknown otherwise. A
    directory that is neither an artifact nor a container is one entry, never walked.
    """
    report = VerifyReport(planned=None if planned is None else frozenset(map(_key, planned)))
    for target in map(Path, paths):
        if not target.name or target.name == "..":  # ".", "/", "..": a directory, never an artifact
            if target.is_dir():
                report.add_directory(target)
            else:
                report.problems.append(f"{target}: missing")
            continue
        lo = leftover(target)
        if lo is not None:
            report.add_leftover(lo)
            continue
        if target.name.endswith(SIDECAR_SUFFIX) and target.name != SIDECAR_SUFFIX:
            target = target.with_name(target.name[: -len(SIDECAR_SUFFIX)])
        if target.is_dir() and not target.is_symlink() and not sidecar_path(target).exists():
            report.add_directory(target)
            continue
        report.add_artifact(target)
        for lo in leftovers_of(target):
            report.add_leftover(lo)
    return report


def _walk(directory: Path, report: VerifyReport) -> None:
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as err:
        report.problems.append(f"{directory}: unreadable ({err.strerror})")
        return
    names = {e.name for e in entries}
    for entry in entries:
        path, name = Path(entry.path), entry.name
        lo = leftover(path)
        if lo is not None:
            report.add_leftover(lo)
            continue
        if name in UNTRACKED_NAMES:
            continue
        if name.endswith(SIDECAR_SUFFIX) and name != SIDECAR_SUFFIX:
            artifact = name[: -len(SIDECAR_SUFFIX)]
            if artifact not in names:
                report.add_artifact(path.with_name(artifact))
            continue
        if name + SIDECAR_SUFFIX in names:
            report.add_artifact(path)
            continue
        if name.startswith("."):  # e.g. NFS .nfsXXXX files, editors' files, .git
            continue
        if entry.is_dir(follow_symlinks=False):
            if name not in UNTRACKED_DIRS:
                report.add_directory(path)
            continue
        report.add_without_sidecar(path)


def _foreign_files(path: Path) -> list[str]:
    """Files in place of or inside an artifact that its sidecar's record does not list (put there
    after it was written: not the store's): inside a directory artifact, the files it did not
    hold; a directory where the store wrote a file, or a file where it wrote a directory, all of
    it. Empty when there is no record to tell."""
    try:
        record = read_sidecar(path).get("stat")
    except (OSError, ValueError):
        return []
    if not isinstance(record, dict):
        return []
    files = record.get("files")
    is_dir = path.is_dir() and not path.is_symlink()
    if not is_dir:
        return ["."] if isinstance(files, dict) and path.exists() else []
    if not isinstance(files, dict):  # a file's record (size, mtime, inode): the directory is not the store's
        return ([str(p.relative_to(path)) for p in _dir_files(path)] or ["."]) if "size" in record else []
    return [rel for rel in (str(p.relative_to(path)) for p in _dir_files(path)) if rel not in files]


def repair(report: VerifyReport) -> tuple[list[str], list[str]]:
    """Remove what ``report`` found damaged that the store wrote, so that the next run rebuilds
    it: each damaged or incomplete artifact with its sidecar (a sidecar whose artifact is missing
    alone), each entry without a sidecar that the plan names as an artifact, and the leftovers of
    interrupted writes whose writers are gone (:attr:`Leftover.stale`). Returns (removed paths,
    one line per problem left alone and why).

    Left alone: an artifact that is sound again when re-checked under its directory's lock (a
    writer replaced it meanwhile); a directory artifact holding files its sidecar does not list
    (someone else's, added after it was written); an entry without a sidecar that no plan names
    (:attr:`VerifyReport.unowned`; unknown entries are not even problems); a leftover that a live
    process, or one on another host younger than ``MEMCTL_STALE_TMP_S`` seconds, may still be
    writing, or whose name does not say which memctl process wrote it.
    """
    removed: list[str] = []
    kept: list[str] = []
    for path in dict.fromkeys(report.damaged):
        side = sidecar_path(path)
        foreign = _foreign_files(path)
        if foreign:
            what = path if foreign[0] == "." else path / foreign[0]
            kept.append(
                f"{path}: not removed: {what} is not the store's (put there after the artifact was written);"
                " move it out, then repair again"
            )
            continue
        with directory_lock(path.parent):
            problems = _check_artifact(path)
            if not problems:
                kept.append(f"{path}: not removed: sound when checked again (rewritten meanwhile)")
                continue
            for entry in (path, side):
                if entry.exists() or entry.is_symlink():
                    remove(entry)
                    removed.append(str(entry))
    for path in dict.fromkeys(report.unowned):
        kept.append(
            f"{path}: not removed: no sidecar, and no plan names it as an artifact (`{WITH_PLAN}` removes"
            " it if the plan does)"
        )
    for lo in report.leftovers:
        if lo.pid is None or not lo.host:
            kept.append(f"{lo.path}: not removed: its name does not say which memctl process wrote it (pid@host)")
        elif lo.stale:
            remove(lo.path)
            removed.append(str(lo.path))
        else:
            kept.append(
                f"{lo.path}: not removed: pid {lo.pid} on {lo.host} may still be writing it"
                f" (removed once older than {STALE_ENV} seconds)"
            )
    return removed, kept
