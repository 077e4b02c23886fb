"""Checksums of artifacts (:func:`hash_path`), fingerprints of inputs (:func:`fingerprint_path`),
and the memo of checksums computed at rename time (so stamping a sidecar afterwards need not read
the artifact again)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from memctl.store.layout import SIDECAR_SUFFIX, UNTRACKED_NAMES

# Inputs larger than this (e.g. a 7B model's shards) are fingerprinted by size + first and last
# MiBs instead of read whole, so provenance of a stage never costs minutes of disk reads.
FINGERPRINT_OVER_BYTES = 256 << 20
FINGERPRINT_EDGE_BYTES = 4 << 20


def _dir_files(path: Path) -> list[Path]:
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and not p.name.endswith(SIDECAR_SUFFIX)
        and ".tmp-" not in p.name
        and p.name not in UNTRACKED_NAMES
    )


def hash_path(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted).

    Sidecars, temporary entries, lock files and Snakemake's ``.snakemake_timestamp`` marker
    (which it adds to directory outputs after the job) inside a directory are ignored.
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for p in _dir_files(path):
            h.update(str(p.relative_to(path)).encode())
            h.update(b"\0")
            h.update(hash_path(p).encode())
        return h.hexdigest()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_path(path: str | os.PathLike) -> str:
    """sha256 of small files; size + head + tail for huge ones (labelled ``fp:``); dirs recurse."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in _dir_files(path):
            h.update(str(p.relative_to(path)).encode() + b"\0" + fingerprint_path(p).encode())
        return h.hexdigest()
    size = path.stat().st_size
    if size <= FINGERPRINT_OVER_BYTES:
        return hash_path(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(FINGERPRINT_EDGE_BYTES))
        fh.seek(size - FINGERPRINT_EDGE_BYTES)
        h.update(fh.read(FINGERPRINT_EDGE_BYTES))
    return "fp:" + h.hexdigest()


# --------------------------------------------------------------------------- the checksum memo


def identity(path: Path) -> tuple[int, ...]:
    """What changes when ``path`` is replaced or rewritten: device, inode, size, mtime."""
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# Checksums computed at rename time, so Provenance.write need not read the artifact again.
_HASHES: dict[str, tuple[tuple[int, ...], str]] = {}


def remember(final: Path, ident: tuple[int, ...], sha: str) -> None:
    _HASHES[os.path.abspath(final)] = (ident, sha)


def recall(final: Path, ident: tuple[int, ...]) -> str | None:
    """The checksum remembered for ``final`` if it is still the entry with identity ``ident``."""
    known = _HASHES.get(os.path.abspath(final))
    return known[1] if known and known[0] == ident else None
