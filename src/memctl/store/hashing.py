"""Checksums of artifacts (:func:`hash_path`), fingerprints of inputs (:func:`fingerprint_path`),
what a stage compares its input artifacts with (:func:`stat_record` in each sidecar,
:func:`checked_hash`), and the memo of checksums computed at rename time (so stamping a sidecar
afterwards need not read the artifact again)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from memctl.store.layout import SIDECAR_SUFFIX, UNTRACKED_NAMES

# Inputs larger than this (e.g. a 7B model's shards) are fingerprinted by size + first and last
# MiBs instead of read whole, so provenance of a stage never costs minutes of disk reads.
FINGERPRINT_OVER_BYTES = 256 << 20
FINGERPRINT_EDGE_BYTES = 4 << 20
# A stage reads each input artifact's files whole to compare them with the sidecar's checksum,
# except files over this size that still have the size, mtime and inode recorded in the sidecar
# when they were written (checked_hash): a 7B model is not reread by every stage that loads it.
# ``memctl verify`` reads everything.
TRUST_STAT_OVER_BYTES = FINGERPRINT_OVER_BYTES


def _dir_files(path: Path) -> list[Path]:
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and not p.name.endswith(SIDECAR_SUFFIX)
        and ".tmp-" not in p.name
        and p.name not in UNTRACKED_NAMES
    )


def hash_path(
    path: str | os.PathLike,
    chunk: int = 1 << 20,
    digests: dict[str, str] | None = None,
    cache: dict[str, str] | None = None,
) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted).

    Sidecars, temporary entries, lock files and Snakemake's ``.snakemake_timestamp`` marker
    (which it adds to directory outputs after the job) inside a directory are ignored.
    ``digests`` (a dict) receives each file's checksum by relative name (a file's own: ``"."``);
    ``cache`` (a dict by absolute path, for the files of one stage's inputs) saves reading a
    file twice within one check. ``memctl verify`` passes neither: it always reads everything.
    """
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in _dir_files(path):
            rel = str(p.relative_to(path))
            digest = hash_path(p, chunk, cache=cache)
            if digests is not None:
                digests[rel] = digest
            h.update(rel.encode())
            h.update(b"\0")
            h.update(digest.encode())
        return h.hexdigest()
    key = os.path.abspath(path)
    if cache is not None and key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    if cache is not None:
        cache[key] = digest
    if digests is not None:
        digests["."] = digest
    return digest


def fingerprint_path(path: str | os.PathLike, cache: dict[str, str] | None = None) -> str:
    """sha256 of small files; size + head + tail for huge ones (labelled ``fp:``); dirs recurse."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in _dir_files(path):
            h.update(str(p.relative_to(path)).encode() + b"\0" + fingerprint_path(p, cache).encode())
        return h.hexdigest()
    size = path.stat().st_size
    if size <= FINGERPRINT_OVER_BYTES:
        return hash_path(path, cache=cache)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(FINGERPRINT_EDGE_BYTES))
        fh.seek(size - FINGERPRINT_EDGE_BYTES)
        h.update(fh.read(FINGERPRINT_EDGE_BYTES))
    return "fp:" + h.hexdigest()


# ------------------------------------------------------- what a stage checks of its inputs


def _file_stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def stat_record(path: str | os.PathLike, digests: dict[str, str] | None = None) -> dict[str, Any]:
    """What a sidecar records (key ``stat``) besides the checksum: size, mtime and inode of the
    artifact's file, or of each file of a directory with its checksum (from ``digests``, as
    :func:`hash_path` fills it). The rename keeps all three, so a stage that reads the artifact
    later can tell a large file that nobody touched since from one that changed
    (:func:`checked_hash`)."""
    path = Path(path)
    if not path.is_dir():
        return _file_stat(path)
    files = {}
    for p in _dir_files(path):
        rel = str(p.relative_to(path))
        files[rel] = _file_stat(p)
        if digests and rel in digests:
            files[rel]["sha256"] = digests[rel]
    return {"files": files}


def _unchanged(path: Path, recorded: Any) -> bool:
    """Whether ``path`` is large and has the size, mtime and inode its sidecar recorded."""
    if not isinstance(recorded, dict):
        return False
    st = path.stat()
    return st.st_size > TRUST_STAT_OVER_BYTES and recorded.get("size") == st.st_size and (
        recorded.get("mtime_ns") == st.st_mtime_ns and recorded.get("inode") == st.st_ino
    )


def checked_hash(
    path: str | os.PathLike,
    recorded_sha: str,
    record: Any,
    cache: dict[str, str] | None = None,
    digests: dict[str, str] | None = None,
) -> str:
    """The checksum of ``path`` as :func:`hash_path` computes it, for comparing with its
    sidecar's ``sha256`` (``recorded_sha``), except that a file over
    :data:`TRUST_STAT_OVER_BYTES` whose size, mtime and inode equal those the sidecar's ``stat``
    (``record``, :func:`stat_record`) holds is not read: its recorded checksum is taken. Every
    other file is read whole. ``memctl verify`` reads everything (:func:`hash_path`).
    ``digests`` receives each file's checksum as in :func:`hash_path`."""
    path = Path(path)
    if not path.is_dir():
        return recorded_sha if _unchanged(path, record) else hash_path(path, cache=cache)
    files = record.get("files") if isinstance(record, dict) else None
    files = files if isinstance(files, dict) else {}
    h = hashlib.sha256()
    for p in _dir_files(path):
        rel = str(p.relative_to(path))
        known = files.get(rel)
        if _unchanged(p, known) and isinstance(known.get("sha256"), str):
            digest = known["sha256"]
        else:
            digest = hash_path(p, cache=cache)
        if digests is not None:
            digests[rel] = digest
        h.update(rel.encode() + b"\0" + digest.encode())
    return h.hexdigest()


def differing_file(record: Any, digests: dict[str, str]) -> str:
    """Which file of a directory artifact differs from its sidecar's ``stat`` record (``"; NAME
    differs"``, ``"; NAME is missing"``, ``"; NAME was added"``), given the checksums found
    (``digests``); empty when the record lists no files (a file artifact, an older sidecar)."""
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or "." in digests:
        return ""
    for rel in sorted(set(files) | set(digests)):
        if rel not in digests:
            return f"; {rel} is missing"
        if rel not in files:
            return f"; {rel} was added"
        if not isinstance(files[rel], dict) or files[rel].get("sha256") != digests[rel]:
            return f"; {rel} differs"
    return ""


# ------------------------------------------------------- the checksum memo, what this process published


def identity(path: Path) -> tuple[int, ...]:
    """What changes when ``path`` is replaced or rewritten: device, inode, size, mtime, ctime (a
    rename sets the ctime of what it moves: an entry renamed in is told from an older one that
    happens to get the same inode number back)."""
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# Checksums (and stat records) computed at rename time, so Provenance.write need not read the
# artifact again.
_HASHES: dict[str, tuple[tuple[int, ...], str, dict[str, Any]]] = {}
# What this process last renamed onto each final name (its identity just after the rename).
_PUBLISHED: dict[str, tuple[int, ...]] = {}


def remember(final: Path, ident: tuple[int, ...], sha: str, stat: dict[str, Any]) -> None:
    _HASHES[os.path.abspath(final)] = (ident, sha, stat)


def recall(final: Path, ident: tuple[int, ...]) -> tuple[str, dict[str, Any]] | None:
    """The checksum and stat record remembered for ``final`` if it is still the entry with
    identity ``ident``."""
    known = _HASHES.get(os.path.abspath(final))
    return (known[1], known[2]) if known and known[0] == ident else None


def publish(final: Path, ident: tuple[int, ...]) -> None:
    """Record that this process renamed the entry with identity ``ident`` onto ``final``
    (:func:`memctl.store.atomic_path`, under the directory's lock)."""
    _PUBLISHED[os.path.abspath(final)] = ident


def published_elsewhere(final: Path, ident: tuple[int, ...]) -> bool:
    """Whether this process renamed an entry onto ``final`` and the entry now there (identity
    ``ident``) is another one: another writer renamed its own version in since (same device
    and inode: still ours, perhaps modified in place; never published here: False)."""
    mine = _PUBLISHED.get(os.path.abspath(final))
    return mine is not None and mine[:2] != ident[:2]
