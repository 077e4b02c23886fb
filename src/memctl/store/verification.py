"""Integrity checks: :func:`verify` (one artifact) and :func:`verify_paths` (``memctl verify``).

An artifact is sound when its sidecar exists, has every provenance field, and records the
checksum of what is in place; leftovers of interrupted writes are reported too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from memctl.store.hashing import hash_path
from memctl.store.layout import LOCK_NAME, SIDECAR_SUFFIX, UNTRACKED_DIRS, UNTRACKED_NAMES, sidecar_path
from memctl.store.leftovers import Leftover, leftover, leftovers_of
from memctl.store.provenance import REQUIRED_FIELDS, read_sidecar


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
    try:
        actual = hash_path(path)
    except OSError as err:
        return [f"{path}: unreadable ({err})"]
    if meta["sha256"] != actual:
        recorded = str(meta["sha256"])[:12]
        why = "truncated, modified, or replaced without its provenance"
        return [f"{path}: corrupt: sha256 {actual[:12]} differs from {recorded} in {side.name} ({why})"]
    return []


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    #: Writes in progress by live processes on this host (not problems).
    notes: list[str] = field(default_factory=list)

    def add_leftover(self, lo: Leftover) -> None:
        (self.notes if lo.alive else self.problems).append(lo.describe())


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
            report.checked += 1
            report.problems += _check_artifact(target)
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
                report.checked += 1
                report.problems += _check_artifact(path.with_name(artifact))
            continue
        if name + SIDECAR_SUFFIX in names:
            report.checked += 1
            report.problems += _check_artifact(path)
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
            continue
        report.checked += 1
        report.problems += _check_artifact(path)


def _has_sidecar(directory: Path) -> bool:
    return any(True for _ in directory.rglob("*" + SIDECAR_SUFFIX))


def _has_files(directory: Path) -> bool:
    """Any file that is not hidden nor inside a hidden directory (leftovers are hidden)."""
    for _root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(not f.startswith(".") for f in files):
            return True
    return False
