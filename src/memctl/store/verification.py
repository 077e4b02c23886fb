"""Integrity checks: :func:`verify` (one artifact), :func:`verify_paths` (``memctl verify``) and
:func:`repair` (``memctl verify --repair``).

An artifact is sound when its sidecar exists, has every provenance field, and records the
checksum of what is in place; leftovers of interrupted writes are reported too. Repair removes
what is damaged or incomplete (with its sidecar) and the leftovers of dead writers, so that the
next run of the workflow rebuilds exactly those artifacts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from memctl.store.hashing import differing_file, hash_path
from memctl.store.layout import LOCK_NAME, SIDECAR_SUFFIX, UNTRACKED_DIRS, UNTRACKED_NAMES, sidecar_path
from memctl.store.leftovers import STALE_ENV, Leftover, leftover, leftovers_of, remove
from memctl.store.locks import directory_lock
from memctl.store.provenance import REQUIRED_FIELDS, mismatch, read_sidecar


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


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    #: Writes in progress by live processes on this host (not problems).
    notes: list[str] = field(default_factory=list)
    #: Artifacts with a problem (corrupt, incomplete, bad sidecar): what :func:`repair` removes.
    damaged: list[Path] = field(default_factory=list)
    #: Leftovers of interrupted writes whose writer is not known to be alive.
    leftovers: list[Leftover] = field(default_factory=list)

    def add_leftover(self, lo: Leftover) -> None:
        (self.notes if lo.alive else self.problems).append(lo.describe())
        if not lo.alive:
            self.leftovers.append(lo)

    def add_artifact(self, path: Path) -> None:
        self.checked += 1
        problems = _check_artifact(path)
        self.problems += problems
        if problems and problems != [f"{path}: missing"]:
            self.damaged.append(path)


def verify_paths(paths: Iterable[str | os.PathLike]) -> VerifyReport:
    """Check artifacts and trees of artifacts (what ``memctl verify`` prints).

    A directory with a sidecar is one artifact. Any other directory is walked: every file in it
    must have a sidecar, except hidden files, ``logs/``, ``benchmarks/`` and ``.snakemake/``
    directories; a directory with files but without a sidecar, a lock file or any sidecar inside
    is a directory artifact without its sidecar, reported once; a sidecar without its artifact and
    leftovers of interrupted writes are reported too.
    """
    report = VerifyReport()
    for target in map(Path, paths):
        lo = leftover(target)
        if lo is not None:
            report.add_leftover(lo)
            continue
        if target.name.endswith(SIDECAR_SUFFIX):
            target = target.with_name(target.name[: -len(SIDECAR_SUFFIX)])
        if sidecar_path(target).exists() or not target.is_dir():
            report.add_artifact(target)
            for lo in leftovers_of(target):
                report.add_leftover(lo)
        else:
            _walk(target, report)
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
        if name.endswith(SIDECAR_SUFFIX):
            artifact = name[: -len(SIDECAR_SUFFIX)]
            if artifact not in names:
                report.add_artifact(path.with_name(artifact))
            continue
        if name + SIDECAR_SUFFIX in names:
            report.add_artifact(path)
            continue
        if name.startswith("."):  # e.g. NFS .nfsXXXX files, editors' files
            continue
        if entry.is_dir():
            if name in UNTRACKED_DIRS:
                continue
            # A directory that memctl renamed something into holds its lock file: walk it. One
            # without, with files but no sidecar anywhere, is a directory artifact without its
            # sidecar (killed between its rename and its sidecar): report it once.
            if (path / LOCK_NAME).exists() or _has_sidecar(path) or not _has_files(path):
                _walk(path, report)
            else:
                report.checked += 1
                report.problems.append(
                    f"{path}: incomplete: directory without provenance sidecar {name}{SIDECAR_SUFFIX}"
                    " (job killed before writing it?)"
                )
                report.damaged.append(path)
            continue
        report.add_artifact(path)


def _has_sidecar(directory: Path) -> bool:
    return any(True for _ in directory.rglob("*" + SIDECAR_SUFFIX))


def _has_files(directory: Path) -> bool:
    """Any file that is not hidden nor inside a hidden directory (leftovers are hidden)."""
    for _root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(not f.startswith(".") for f in files):
            return True
    return False


def repair(report: VerifyReport) -> tuple[list[str], list[str]]:
    """Remove what ``report`` found damaged, so that the next run rebuilds it: each damaged or
    incomplete artifact with its sidecar (a sidecar whose artifact is missing alone), and the
    leftovers of interrupted writes whose writers are gone (:attr:`Leftover.stale`). Returns
    (removed paths, one line per problem left alone and why).

    Left alone: an artifact that is sound again when re-checked under its directory's lock (a
    writer replaced it meanwhile); a file or directory without sidecar in a directory that memctl
    never wrote to (no ``.memctl.lock``: not an artifact, e.g. a config file in a directory given
    by mistake); a leftover that a live process, or one on another host younger than
    ``MEMCTL_STALE_TMP_S`` seconds, may still be writing.
    """
    removed: list[str] = []
    kept: list[str] = []
    for path in dict.fromkeys(report.damaged):
        side = sidecar_path(path)
        if not side.exists() and not (path.parent / LOCK_NAME).exists():
            kept.append(f"{path}: not removed: no sidecar, and memctl never wrote into {path.parent} (no {LOCK_NAME})")
            continue
        with directory_lock(path.parent):
            if not _check_artifact(path):
                kept.append(f"{path}: not removed: sound when checked again (rewritten meanwhile)")
                continue
            for entry in (path, side):
                if entry.exists() or entry.is_symlink():
                    remove(entry)
                    removed.append(str(entry))
    for lo in report.leftovers:
        if lo.stale:
            remove(lo.path)
            removed.append(str(lo.path))
        else:
            kept.append(
                f"{lo.path}: not removed: pid {lo.pid} on {lo.host} may still be writing it"
                f" (removed once older than {STALE_ENV} seconds)"
            )
    return removed, kept
