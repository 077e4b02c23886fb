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

from memctl.store.hashing import (
    checked_hash,
    differing_file,
    fingerprint_path,
    hash_path,
    identity,
    published_elsewhere,
    recall,
    stat_record,
)
from memctl.store.layout import LOCK_NAME, SIDECAR_SUFFIX, UNTRACKED_DIRS, UNTRACKED_NAMES, sidecar_path
from memctl.store.leftovers import remove, remove_stale_leftovers, tmp_prefix
from memctl.store.locks import UNRECORDED, directory_lock, fsync, record_written, written_as
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


class IntegrityError(ValueError):
    """An input artifact of a stage is corrupt or incomplete (see :func:`check_input`); the
    message is one line per problem, each starting with the path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def check_input(path: str | os.PathLike, cache: dict[str, str] | None = None) -> list[str]:
    """Problems of an input that is an artifact of the store, one line each naming the path:
    its content against the checksum its sidecar records (:func:`~memctl.store.hashing.
    checked_hash`: small files are read whole, unchanged large ones trusted by size, mtime and
    inode), a missing artifact whose sidecar exists, an unreadable sidecar, and an artifact
    without its sidecar. Empty list: sound, or not an artifact (a user's file or model
    directory, a hub id).

    An input without a sidecar is an artifact of the store without its provenance (incomplete:
    a job killed before its sidecar, a sidecar deleted) when memctl renamed it into its
    directory as an artifact: the directory's record (its ``.memctl.lock``, :func:`~memctl.
    store.locks.written_as`) lists it; in a directory whose lock file a memctl that kept no
    record left, any entry is taken for one. A directory that holds artifacts rather than being
    one (:func:`is_container`: the demo corpus, a results tree) is searched: each artifact inside
    is checked, and each entry in it without sidecar that the store wrote as an artifact is
    flagged. Anything else without a sidecar is the user's (their JSONL, their model directory,
    a file of theirs beside the store's): nothing to check."""
    path = Path(path)
    if not path.name:  # "", ".", "/": no artifact has such a name
        path = Path(os.path.abspath(path))
    side = sidecar_path(path) if path.name else None
    if side is not None and side.exists():
        return _check_against_sidecar(path, side, cache)
    if not path.exists():
        return []  # e.g. a hub id
    if path.is_dir() and is_container(path):
        return _check_container(path, cache)
    line = incomplete_without_sidecar(path)
    return [line] if line else []


def store_kind(path: Path, records: dict | None = None) -> str | None:
    """How the store wrote ``path`` (:func:`~memctl.store.locks.written_as`: ``"artifact"``,
    ``"plain"``, ``UNRECORDED``), or None: not the store's, hidden, or Snakemake's."""
    name = path.name
    if not name or name.startswith(".") or name in UNTRACKED_NAMES or name in UNTRACKED_DIRS:
        return None
    return written_as(path, records)


def incomplete_without_sidecar(path: Path, records: dict | None = None) -> str | None:
    """The line for ``path``, without its sidecar, when it is an incomplete artifact of the store
    (memctl wrote it as an artifact, :func:`store_kind`), else None. ``records``: a dict that
    keeps each directory's record between calls."""
    kind = store_kind(path, records)
    is_dir = path.is_dir()
    what = "directory without provenance sidecar" if is_dir else "no provenance sidecar"
    if kind == "artifact":
        return (f"{path}: incomplete: {what} {sidecar_path(path).name}, though memctl wrote it as an artifact"
                f" ({LOCK_NAME} lists it; job killed before writing it, or the sidecar deleted)")
    if kind == UNRECORDED and not (is_dir and (is_container(path) or not has_files(path))):
        return (f"{path}: incomplete: {what} {sidecar_path(path).name}, in a directory memctl writes artifacts"
                " into (job killed before writing it, or the sidecar deleted)")
    return None


def is_container(directory: Path) -> bool:
    """A directory without a sidecar that holds artifacts rather than being one: memctl renamed
    entries into it or into a directory below it (``.memctl.lock``), or there are sidecars in
    it. Hidden directories (leftovers, ``.git``, ``.snakemake``) are not searched."""
    for _root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if LOCK_NAME in files or any(f.endswith(SIDECAR_SUFFIX) and not f.startswith(".") for f in files):
            return True
    return False


def has_files(directory: Path) -> bool:
    """Any file that is not hidden nor inside a hidden directory (leftovers are hidden)."""
    for _root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(not f.startswith(".") for f in files):
            return True
    return False


def _check_container(path: Path, cache: dict[str, str] | None) -> list[str]:
    problems: list[str] = []
    records: dict = {}
    for root, dirs, files in os.walk(path):
        here, names = Path(root), set(files) | set(dirs)
        for name in sorted(d for d in dirs if d + SIDECAR_SUFFIX in names):  # directory artifacts: whole
            problems += _check_against_sidecar(here / name, here / (name + SIDECAR_SUFFIX), cache)
        walk = []
        for name in sorted(dirs):
            if name + SIDECAR_SUFFIX in names or name.startswith(".") or name in UNTRACKED_DIRS:
                continue
            line = None if is_container(here / name) else incomplete_without_sidecar(here / name, records)
            if line:
                problems.append(line)
            else:
                walk.append(name)
        dirs[:] = walk
        for name in sorted(files):
            if name.startswith(".") or name in UNTRACKED_NAMES:
                continue
            if name.endswith(SIDECAR_SUFFIX):
                if name[: -len(SIDECAR_SUFFIX)] not in names:
                    problems += _check_against_sidecar(here / name[: -len(SIDECAR_SUFFIX)], here / name, cache)
            elif name + SIDECAR_SUFFIX in names:
                problems += _check_against_sidecar(here / name, here / (name + SIDECAR_SUFFIX), cache)
            else:
                line = incomplete_without_sidecar(here / name, records)
                if line:
                    problems.append(line)
    return problems


def _check_against_sidecar(path: Path, side: Path, cache: dict[str, str] | None) -> list[str]:
    problems = _compare_with_sidecar(path, side, cache)
    if problems and path.parent.is_dir():
        # A writer renaming a new version in holds the directory's lock between its new sidecar
        # and the rename: look again under the lock before calling the artifact damaged.
        with directory_lock(path.parent):
            problems = _compare_with_sidecar(path, side, None)
    return problems


def _compare_with_sidecar(path: Path, side: Path, cache: dict[str, str] | None) -> list[str]:
    if not path.exists():
        return [f"{path}: incomplete: missing, but its sidecar {side.name} exists (write interrupted?)"]
    try:
        meta = read_sidecar(path)
    except (OSError, ValueError) as err:
        return [f"{side}: corrupt sidecar ({err})"]
    recorded = meta.get("sha256")
    if not isinstance(recorded, str):
        return [f"{side}: incomplete sidecar, lacks sha256"]
    digests: dict[str, str] = {}
    try:
        actual = checked_hash(path, recorded, meta.get("stat"), cache, digests)
    except OSError as err:
        return [f"{path}: unreadable ({err})"]
    if actual != recorded:
        return [mismatch(path, actual, recorded, differing_file(meta.get("stat"), digests))]
    return []


def mismatch(path: Path, actual: str, recorded: str, detail: str = "") -> str:
    """The line for an artifact whose checksum differs from its sidecar's (``detail``: which
    file of a directory, :func:`~memctl.store.hashing.differing_file`)."""
    why = "truncated, modified, or replaced without its provenance"
    side = sidecar_path(path).name
    return f"{path}: corrupt: sha256 {actual[:12]} differs from {recorded[:12]} in {side}{detail} ({why})"


class Provenance:
    """Collects what a stage needs to describe its outputs; the writers put it in each sidecar.

    Every input that is an artifact of the store (has a sidecar) is checked first
    (:func:`check_input`): a corrupt or incomplete one raises :class:`IntegrityError` naming it,
    before the stage computes anything. ``check=False`` skips that.
    """

    def __init__(
        self,
        stage: str,
        settings: Mapping[str, Any],
        inputs: Mapping[str, str | os.PathLike | None] | None = None,
        check: bool = True,
    ) -> None:
        self.stage = stage
        self.settings = dict(settings)
        self.started = time.time()
        self.extra: dict[str, Any] = {}  # facts learnt while running (e.g. the model's hub commit)
        self.inputs: dict[str, dict[str, str]] = {}
        cache: dict[str, str] = {}  # each file is read once for its check and its fingerprint
        problems: list[str] = []
        for name, ref in (inputs or {}).items():
            if ref is None:
                continue
            ref_path = Path(ref)
            if check:
                problems += check_input(ref_path, cache)
            if ref_path.exists():
                self.inputs[name] = {"path": str(ref_path), "sha256": fingerprint_path(ref_path, cache)}
            else:  # e.g. a hub model id: record the reference itself
                self.inputs[name] = {"ref": str(ref)}
        if problems:
            raise IntegrityError(list(dict.fromkeys(problems)))

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

    def sidecar(
        self,
        artifact: str | os.PathLike,
        sha256: str,
        extra: Mapping[str, Any] | None = None,
        stat: Mapping[str, Any] | None = None,
    ) -> dict:
        """The sidecar of ``artifact`` whose content has checksum ``sha256`` (and the files' size,
        mtime and inode ``stat``, :func:`~memctl.store.hashing.stat_record`)."""
        meta = dict(self.record(extra), artifact=Path(artifact).name, sha256=sha256)
        if stat is not None:
            meta["stat"] = dict(stat)
        return meta

    def write(self, *outputs: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> None:
        """Stamp the sidecar of each output already in place (checksum of what is there).

        Stages do not use it: they pass ``provenance=`` to the writers. It is for artifacts put in
        place by other means, or by :func:`~memctl.store.atomic_path` without a provenance. It
        checks under the directory lock that no other writer renamed a new version in while it
        was hashing. An output that this process renamed in (``atomic_path``) and that another
        writer has replaced since is left alone: that writer stamps its own version, so whichever
        writer wins, its data and its sidecar win together.
        """
        base = self.record(extra)
        for out in map(Path, outputs):
            for _attempt in range(5):
                ident = identity(out)
                if published_elsewhere(out, ident):
                    break  # another writer's version: not ours to describe
                known = recall(out, ident)
                if known:
                    sha, stat = known
                else:
                    digests: dict[str, str] = {}
                    sha = hash_path(out, digests=digests)
                    stat = stat_record(out, digests)
                with directory_lock(out.parent):
                    # Another writer may have renamed a new version in while we hashed (renames
                    # happen under this lock: what is checked here is what gets the sidecar).
                    if identity(out) != ident:
                        continue
                    write_sidecar(out, dict(base, artifact=out.name, sha256=sha, stat=stat))
                    record_written(out.parent, out.name, artifact=True)
                    fsync(out.parent)
                    break
            else:
                raise RuntimeError(f"{out} kept being replaced while its checksum was computed")
