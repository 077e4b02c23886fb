"""Provenance sidecars: what a stage records next to each artifact, and how a sidecar is written.

Next to each artifact sits ``<artifact>.meta.json``: the stage's resolved settings, hashes of its
inputs, package and code versions, host and wall time, facts the stage learnt while running
(:attr:`Provenance.extra`), and the sha256 of the artifact. Stages pass ``provenance=`` to the
writers (:func:`memctl.store.atomic_path`, ``write_*``), which write the sidecar before the
rename, so the artifact never exists without one. :meth:`Provenance.write` stamps sidecars onto
artifacts already in place (written by something other than memctl's writers).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from memctl.store.hashing import fingerprint_path, hash_path, identity, recall
from memctl.store.layout import sidecar_path
from memctl.store.leftovers import remove, remove_stale_leftovers, tmp_prefix
from memctl.store.locks import directory_lock, fsync
from memctl.store.permissions import share

#: Sidecar keys every artifact's provenance must have.
REQUIRED_FIELDS = (
    "stage",
    "settings",
    "inputs",
    "versions",
    "code_version",
    "host",
    "started",
    "wall_time_s",
    "sha256",
)
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


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """memctl's version plus the git commit of its source tree, when there is one."""
    from memctl import __version__

    src = Path(__file__).resolve().parents[1]  # the memctl package, not only this subpackage
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


def json_default(obj: Any) -> Any:
    """JSON for what stages put in sidecars: paths, numpy / torch scalars and arrays."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_sidecar(artifact: Path, meta: Mapping[str, Any]) -> None:
    """Write ``artifact``'s sidecar atomically (the caller holds the directory lock)."""
    side = sidecar_path(artifact)
    data = (json.dumps(meta, indent=2, sort_keys=True, default=json_default) + "\n").encode()
    remove_stale_leftovers(side)
    fd, name = tempfile.mkstemp(prefix=tmp_prefix(side, "tmp"), dir=side.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        share(tmp, setgid=False)
        os.replace(tmp, side)
    except BaseException:
        remove(tmp)
        raise


def read_sidecar(artifact: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of ``artifact``; OSError when unreadable, ValueError when not a JSON object."""
    meta = json.loads(sidecar_path(artifact).read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    return meta


class Provenance:
    """Collects what a stage needs to describe its outputs; the writers put it in each sidecar."""

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
            "versions": dict(package_versions()),
            "code_version": code_version(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "wall_time_s": round(time.time() - self.started, 3),
            **self.extra,
            **(dict(extra) if extra else {}),
        }

    def sidecar(self, artifact: str | os.PathLike, sha256: str, extra: Mapping[str, Any] | None = None) -> dict:
        """The sidecar of ``artifact`` whose content has checksum ``sha256``."""
        return dict(self.record(extra), artifact=Path(artifact).name, sha256=sha256)

    def write(self, *outputs: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> None:
        """Stamp the sidecar of each output already in place (checksum of what is there).

        Stages do not use it: they pass ``provenance=`` to the writers. It is for artifacts put in
        place by other means; it checks under the directory lock that no other writer renamed a
        new version in while it was hashing.
        """
        base = self.record(extra)
        for out in map(Path, outputs):
            for _attempt in range(5):
                ident = identity(out)
                sha = recall(out, ident) or hash_path(out)
                with directory_lock(out.parent):
                    # Another writer may have renamed a new version in while we hashed.
                    if identity(out) != ident:
                        continue
                    write_sidecar(out, dict(base, artifact=out.name, sha256=sha))
                    fsync(out.parent)
                    break
            else:
                raise RuntimeError(f"{out} kept being replaced while its checksum was computed")
