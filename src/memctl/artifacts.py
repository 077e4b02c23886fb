"""Atomic artifact writes and provenance sidecars.

Every artifact (file or directory) is written under a temporary name in the same directory and
renamed into place only when complete, so a killed job never leaves something a later run accepts.
Next to each artifact sits ``<artifact>.meta.json``: the stage's resolved settings, hashes of its
inputs, package and code versions, host and wall time, and a checksum of the artifact itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

SIDECAR_SUFFIX = ".meta.json"
TRACKED_PACKAGES = (
    "memctl",
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "safetensors",
    "pandas",
    "pyarrow",
    "numpy",
    "rapidfuzz",
    "snakemake",
)


def sidecar_path(artifact: str | os.PathLike) -> Path:
    """Path of the provenance sidecar that belongs to ``artifact``."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + SIDECAR_SUFFIX)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it onto ``final`` only if the block succeeds.

    With ``directory=True`` the yielded path is an (empty, existing) directory.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _make_group_readable(tmp)
        if directory and final.exists():
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, stale / final.name)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _make_group_readable(path: Path) -> None:
    # mkstemp/mkdtemp create 0600/0700 entries; artifacts are meant to be shared within a lab.
    mode_file, mode_dir = 0o664, 0o775
    if path.is_dir():
        os.chmod(path, mode_dir)
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), mode_dir)
            for f in files:
                os.chmod(os.path.join(root, f), mode_file)
    else:
        os.chmod(path, mode_file)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# Inputs larger than this (e.g. a 7B model's shards) are fingerprinted by size + first and last
# MiBs instead of read whole, so provenance of a stage never costs minutes of disk reads.
FINGERPRINT_OVER_BYTES = 256 << 20
FINGERPRINT_EDGE_BYTES = 4 << 20


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


def _dir_files(path: Path) -> list[Path]:
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and not p.name.endswith(SIDECAR_SUFFIX)
        and ".tmp-" not in p.name
        and p.name != ".snakemake_timestamp"
    )


def hash_path(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of a directory's files (relative names and contents, sorted).

    Sidecars, temporary entries and Snakemake's ``.snakemake_timestamp`` marker (which it adds to
    directory outputs after the job) inside a directory are ignored.
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


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def code_version() -> str:
    """memctl's version plus the git commit of its source tree, when there is one."""
    from memctl import __version__

    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"{__version__}+g{commit}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return __version__


class Provenance:
    """Collects what a stage needs to describe its outputs; ``write`` stamps each output's sidecar."""

    def __init__(
        self,
        stage: str,
        settings: Mapping[str, Any],
        inputs: Mapping[str, str | os.PathLike | None] | None = None,
    ) -> None:
        self.stage = stage
        self.settings = dict(settings)
        self.started = time.time()
        self.extra: dict[str, Any] = {}  # facts learnt while running (e.g. the model's hub commit)
        self.inputs: dict[str, dict[str, str]] = {}
        for name, ref in (inputs or {}).items():
            if ref is None:
                continue
            ref_path = Path(ref)
            if ref_path.exists():
                self.inputs[name] = {"path": str(ref_path), "sha256": fingerprint_path(ref_path)}
            else:  # e.g. a hub model id: record the reference itself
                self.inputs[name] = {"ref": str(ref)}

    def record(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "settings": self.settings,
            "inputs": self.inputs,
            "versions": package_versions(),
            "code_version": code_version(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "wall_time_s": round(time.time() - self.started, 3),
            **self.extra,
            **(dict(extra) if extra else {}),
        }

    def write(self, *outputs: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> None:
        base = self.record(extra)
        for out in outputs:
            meta = dict(base, artifact=Path(out).name, sha256=hash_path(out))
            write_json(sidecar_path(out), meta)


def verify(path: str | os.PathLike) -> list[str]:
    """Problems with an artifact: missing, no sidecar, or checksum mismatch. Empty list = sound."""
    path = Path(path)
    if not path.exists():
        return [f"{path}: missing"]
    side = sidecar_path(path)
    if not side.exists():
        return [f"{path}: no provenance sidecar {side.name}"]
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as err:
        return [f"{side}: unreadable ({err})"]
    if meta.get("sha256") != hash_path(path):
        return [f"{path}: checksum differs from {side.name} (corrupt or modified)"]
    return []
