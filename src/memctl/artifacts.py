"""Atomic artifact writes, provenance sidecars and integrity checks for a shared store.

How an artifact is written (:func:`atomic_path`):

1. The content goes to a temporary sibling ``.<name>.tmp-<pid>@<host>-<random>`` (a file, or a
   directory with ``directory=True``).
2. When the block succeeds, the content is fsynced and given the mode a new entry gets under the
   process umask plus group read/write (directories also group search, and the setgid bit when
   their parent has it), so labmates sharing one store can replace it.
3. Under the directory's lock (``.memctl.lock``, ``flock``): with a ``provenance`` the sidecar
   ``<name>.meta.json`` (holding the checksum of the new content) is written atomically first;
   then the content is renamed onto ``<name>`` (a directory swaps places with the old one in one
   ``renameat2(RENAME_EXCHANGE)`` where the filesystem supports it) and the directory is fsynced.

A process killed at any point leaves either the old state, a ``.tmp-`` leftover (never accepted:
the final name does not exist or still holds the old content), or a sidecar whose checksum does
not match; :func:`verify` / ``memctl verify`` report all of them. Leftovers of dead writers are
removed the next time the same artifact is written. Two processes writing the same artifact at
once each write their own temporary; the last rename wins and the sidecar always describes what
is in place (sidecar + rename, and :meth:`Provenance.write`'s check-and-write, hold the lock).

Next to each artifact sits ``<artifact>.meta.json``: the stage's resolved settings, hashes of its
inputs, package and code versions, host and wall time, and the sha256 of the artifact.
:meth:`Provenance.write` stamps sidecars onto artifacts already in place; passing
``provenance=`` to :func:`atomic_path` / ``write_*`` writes the sidecar before the rename, so the
artifact never exists without one.

Workflow runs started from different working directories on one store do not see each other's
Snakemake lock; :func:`claim_workflow` (an ``onstart`` hook) claims their outputs and inputs in
the store itself, so a conflicting run stops before any job starts (see docs/store.md).

Test hook: with ``MEMCTL_TEST_PAUSE_BEFORE_RENAME=SECONDS`` (or ``SECONDS:NAME`` to pause only for
artifacts whose file name contains ``NAME``) every atomic write prints a line to stderr and sleeps
that long between finishing its temporary and renaming it, so tests can SIGKILL a job mid-write
deterministically. Leave it unset in real runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for annotations: writing a table needs no pandas import here
    import pandas as pd

SIDECAR_SUFFIX = ".meta.json"
#: Per-directory lock file taken (flock) around sidecar writes and renames.
LOCK_NAME = ".memctl.lock"
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
PAUSE_ENV = "MEMCTL_TEST_PAUSE_BEFORE_RENAME"
#: Leftovers of writers on other hosts (whose process cannot be checked) older than this many
#: seconds are removed when the same artifact is written again.
STALE_ENV = "MEMCTL_STALE_TMP_S"
STALE_DEFAULT_S = 3600.0
#: Entries ``memctl verify`` does not expect a sidecar for: Snakemake's markers, logs, benchmarks.
UNTRACKED_NAMES = frozenset({".snakemake_timestamp", LOCK_NAME, ".memctl-claims"})
UNTRACKED_DIRS = frozenset({"logs", "benchmarks", ".snakemake"})
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

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)@(?P<host>.*)-)?[^-]*$")


def sidecar_path(artifact: str | os.PathLike) -> Path:
    """Path of the provenance sidecar that belongs to ``artifact``."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + SIDECAR_SUFFIX)


# ------------------------------------------------------------------------------- permissions


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (no window where it is 0)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_with_group() -> int:
    """Clear the group bits of this process's umask (children inherit it); returns the old umask.

    Call it where the workflow starts so that what Snakemake itself creates in the store (output
    directories, logs, benchmarks) is group-writable too; other bits of the umask are kept.
    """
    old = current_umask()
    os.umask(old & ~0o070)
    return old


def _shared_mode(st_mode: int, umask: int, setgid: bool) -> int:
    if stat.S_ISDIR(st_mode):
        return (0o777 & ~umask) | 0o070 | (stat.S_ISGID if setgid else 0)
    return (0o666 & ~umask) | 0o060 | (st_mode & 0o111 & ~umask)


def share(path: str | os.PathLike, setgid: bool | None = None) -> None:
    """Give ``path`` (and everything below it) the mode a new entry gets under the umask, plus
    group read/write (and search for directories); directories keep the parent's setgid bit."""
    path = Path(path)
    umask = current_umask()
    if setgid is None:
        setgid = _has_setgid(path.parent)
    entries = [path]
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            entries += [Path(root, name) for name in dirs + files]
    for entry in entries:
        st = entry.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        mode = _shared_mode(st.st_mode, umask, setgid)
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(entry, mode)


def _has_setgid(directory: Path) -> bool:
    try:
        return bool(directory.stat().st_mode & stat.S_ISGID)
    except OSError:
        return False


def _make_dirs(directory: Path) -> None:
    """``mkdir -p``; directories created here are group-writable (existing ones are left alone)."""
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:  # created concurrently by another job
            continue
        with contextlib.suppress(OSError):
            share(d)


# ----------------------------------------------------------------------- durability, locking


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. EINVAL: some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for root, _dirs, files in os.walk(path, topdown=False):
            for name in files:
                _fsync(Path(root, name))
            _fsync(Path(root))
    else:
        _fsync(path)


_LOCK_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF)
_warned_lock = False


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Exclusive ``flock`` on ``<directory>/.memctl.lock`` for the duration of the block.

    Held only around sidecar writes and renames (milliseconds). Where the filesystem has no locks
    (e.g. Lustre without ``-o flock``) it warns once and goes on without.
    """
    global _warned_lock
    path = Path(directory) / LOCK_NAME
    fd = None
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # someone else's lock file that is not group-writable
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
    try:
        if fd is not None:
            st = os.fstat(fd)
            if st.st_uid == os.geteuid() and not st.st_mode & 0o020:
                with contextlib.suppress(OSError):
                    os.fchmod(fd, _shared_mode(st.st_mode, current_umask(), False))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as err:
                if err.errno not in _LOCK_UNSUPPORTED:
                    raise
                if not _warned_lock:
                    _warned_lock = True
                    warnings.warn(f"memctl: no file locks on {directory} ({err.strerror}); writing unlocked")
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


# ------------------------------------------------------------------------- leftovers of writes


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:40] or "unknown"


def _prefix(final: Path, kind: str) -> str:
    return f".{final.name}.{kind}-{os.getpid()}@{_host_tag()}-"


def _pid_alive(pid: int) -> bool:
    try:  # a zombie (killed, not yet reaped) counts as dead
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


@dataclass
class Leftover:
    """A temporary (``.tmp-``) or moved-aside (``.old-``) entry of an atomic write."""

    path: Path
    artifact: str
    pid: int | None
    host: str | None
    age_s: float
    #: True / False when the writer ran on this host; None when that cannot be told.
    alive: bool | None

    @property
    def stale(self) -> bool:
        """Nobody can still be writing it."""
        limit = float(os.environ.get(STALE_ENV, STALE_DEFAULT_S))
        return self.alive is False or (self.alive is None and self.age_s > limit)

    def describe(self) -> str:
        who = f"pid {self.pid} on {self.host}" if self.pid is not None else "an unknown writer"
        age = _age(self.age_s)
        if self.alive:
            return f"{self.path}: in progress: being written by {who} (modified {age} ago)"
        if self.alive is False:
            return f"{self.path}: leftover of an interrupted write of {self.artifact} ({who} is gone, {age} old)"
        return f"{self.path}: leftover or in-progress write of {self.artifact} ({who}, modified {age} ago)"


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def leftover(path: str | os.PathLike) -> Leftover | None:
    """The :class:`Leftover` that ``path`` is, or None when its name is not one."""
    path = Path(path)
    match = _LEFTOVER.match(path.name)
    if not match:
        return None
    pid = int(match["pid"]) if match["pid"] else None
    host = match["host"]
    alive = _pid_alive(pid) if pid is not None and host == _host_tag() else None
    try:
        age = time.time() - _newest_mtime(path)
    except OSError:
        age = 0.0
    return Leftover(path, match["name"], pid, host, age, alive)


def leftovers_of(final: str | os.PathLike) -> list[Leftover]:
    """Leftovers of writes of ``final`` (its ``.tmp-`` / ``.old-`` siblings)."""
    final = Path(final)
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(final.parent):
            if entry.name.startswith((f".{final.name}.tmp-", f".{final.name}.old-")):
                lo = leftover(entry.path)
                if lo is not None and lo.artifact == final.name:
                    found.append(lo)
    return sorted(found, key=lambda lo: lo.path.name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _remove_stale_leftovers(final: Path) -> None:
    for lo in leftovers_of(final):
        if lo.stale:
            _remove(lo.path)


# ----------------------------------------------------------------------------- atomic writes

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.lru_cache(maxsize=1)
def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False where unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _rename_into_place(tmp: Path, final: Path, directory: bool) -> Path | None:
    """Rename ``tmp`` onto ``final``; returns what to delete afterwards (the old directory)."""
    if directory and final.is_dir() and not final.is_symlink():
        # A directory cannot be renamed over a non-empty one: swap them (readers never see the
        # name missing), or where the filesystem cannot, move the old one aside first.
        if _exchange(tmp, final):
            return tmp
        aside = Path(tempfile.mkdtemp(prefix=_prefix(final, "old"), dir=final.parent))
        os.replace(final, aside / final.name)
        os.replace(tmp, final)
        return aside
    if directory and (final.is_symlink() or final.exists()):
        final.unlink()  # a file (or link) where the directory goes
    os.replace(tmp, final)
    return None


def _identity(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


# Checksums computed at rename time, so Provenance.write need not read the artifact again.
_HASHES: dict[str, tuple[tuple[int, ...], str]] = {}


def _remember(final: Path, ident: tuple[int, ...], sha: str) -> None:
    _HASHES[os.path.abspath(final)] = (ident, sha)


def _recall(final: Path, ident: tuple[int, ...]) -> str | None:
    known = _HASHES.get(os.path.abspath(final))
    return known[1] if known and known[0] == ident else None


def _test_pause(tmp: Path, final: Path) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    seconds, _, name = spec.partition(":")
    if name and name not in final.name:
        return
    print(
        f"memctl: {PAUSE_ENV}: {final} is complete in {tmp.name}; pausing {seconds} s before the rename",
        file=sys.stderr,
        flush=True,
    )
    time.sleep(float(seconds))


@contextlib.contextmanager
def atomic_path(
    final: str | os.PathLike,
    directory: bool = False,
    provenance: Provenance | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it onto ``final`` only if the block succeeds.

    With ``directory=True`` the yielded path is an (empty, existing) directory. With a
    ``provenance``, the sidecar (``extra`` added to it) is written before the rename.
    """
    final = Path(final)
    _make_dirs(final.parent)
    _remove_stale_leftovers(final)
    prefix = _prefix(final, "tmp")
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _fsync_tree(tmp)
        share(tmp, setgid=_has_setgid(final.parent))
        _test_pause(tmp, final)
        sha = meta = None
        if provenance is not None:
            sha = hash_path(tmp)
            meta = provenance.sidecar(final, sha, extra)
        with directory_lock(final.parent):
            if meta is not None:
                _write_sidecar(final, meta)
            ident = _identity(tmp)
            garbage = _rename_into_place(tmp, final, directory)
            _fsync(final.parent)
        if sha is not None:
            _remember(final, ident, sha)
        if garbage is not None:
            _remove(garbage)
    except BaseException:
        _remove(tmp)
        raise


def _write_sidecar(artifact: Path, meta: Mapping[str, Any]) -> None:
    """Write ``artifact``'s sidecar atomically (the caller holds the directory lock)."""
    side = sidecar_path(artifact)
    data = (json.dumps(meta, indent=2, sort_keys=True, default=_json_default) + "\n").encode()
    _remove_stale_leftovers(side)
    fd, name = tempfile.mkstemp(prefix=_prefix(side, "tmp"), dir=side.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        share(tmp, setgid=False)
        os.replace(tmp, side)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str, provenance: Provenance | None = None) -> None:
    with atomic_path(path, provenance=provenance) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, provenance: Provenance | None = None) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n", provenance)


def write_parquet(df: pd.DataFrame, path: str | os.PathLike, provenance: Provenance | None = None) -> None:
    with atomic_path(path, provenance=provenance) as tmp:
        df.to_parquet(tmp, index=False)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ------------------------------------------------------------------------------------ hashing

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


# --------------------------------------------------------------------------------- provenance


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
        """Stamp the sidecar of each output already in place (checksum of what is there)."""
        base = self.record(extra)
        for out in map(Path, outputs):
            for _attempt in range(5):
                ident = _identity(out)
                sha = _recall(out, ident) or hash_path(out)
                with directory_lock(out.parent):
                    # Another writer may have renamed a new version in while we hashed.
                    if _identity(out) != ident:
                        continue
                    _write_sidecar(out, dict(base, artifact=out.name, sha256=sha))
                    _fsync(out.parent)
                    break
            else:
                raise RuntimeError(f"{out} kept being replaced while its checksum was computed")


# --------------------------------------------------------------------- runs sharing one store

#: In the store's root: one byte-range lock (POSIX ``fcntl``, which NFS also supports) per path
#: that a running workflow claims. Held by the Snakemake process; the kernel (or the NFS server)
#: drops them when it exits or is killed, so a claim is never stale.
CLAIMS_NAME = ".memctl-claims"
_claims: dict[str, int] = {}  # claims file -> the one descriptor this process holds it with


class StoreBusy(RuntimeError):
    """Another run holds a claim that conflicts with this run's."""


def _claim_offset(path: str) -> int:
    return 1 + int(hashlib.sha256(path.encode()).hexdigest()[:15], 16)  # byte 0: the claim mutex


def claim_paths(
    root: str | os.PathLike, outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike] = ()
) -> int:
    """Claim, for the rest of this process, ``outputs`` (exclusively) and ``inputs`` (shared) in
    the store at ``root``: the cross-working-directory counterpart of Snakemake's own lock, which
    only sees runs started from the same working directory.

    Raises :class:`StoreBusy` naming a path when another live process claims one of the outputs
    or inputs exclusively, or one of the outputs at all; the claims are taken as one set (under a
    mutex), so of two runs started together exactly one gets them. Returns the number of paths
    claimed (0 where the filesystem has no locks: it warns and claims nothing).
    """
    root = Path(root)
    _make_dirs(root)
    claims = root / CLAIMS_NAME
    key = os.path.realpath(claims)
    fd = _claims.get(key)
    if fd is None:  # one descriptor per process: closing any other would drop its POSIX locks
        fd = os.open(claims, os.O_RDWR | os.O_CREAT, 0o666)
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and not st.st_mode & 0o020:
            with contextlib.suppress(OSError):
                os.fchmod(fd, _shared_mode(st.st_mode, current_umask(), False))
        _claims[key] = fd
    outs = sorted({os.path.realpath(p) for p in outputs})
    ins = sorted({os.path.realpath(p) for p in inputs} - set(outs))
    taken: list[int] = []
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, 0)
    except OSError as err:
        if err.errno not in _LOCK_UNSUPPORTED:
            raise
        warnings.warn(f"memctl: no file locks in {root} ({err.strerror}): concurrent runs are not detected")
        return 0
    try:
        for mode, paths in ((fcntl.LOCK_EX, outs), (fcntl.LOCK_SH, ins)):
            for path in paths:
                offset = _claim_offset(path)
                try:
                    fcntl.lockf(fd, mode | fcntl.LOCK_NB, 1, offset)
                except OSError as err:
                    if err.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                    for done in taken:
                        fcntl.lockf(fd, fcntl.LOCK_UN, 1, done)
                    use = "writes" if mode == fcntl.LOCK_SH else "reads or writes"
                    raise StoreBusy(
                        f"store {root} is busy: another running workflow {use} {path} (a run from another"
                        " working directory on the same root); wait until it has finished, then run again"
                    ) from None
                taken.append(offset)
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0)
    return len(taken)


def claim_workflow(workflow: Any, root: str | os.PathLike) -> int:
    """Snakemake ``onstart`` hook: claim the outputs of the jobs this run will execute and the
    inputs of all its jobs (what Snakemake's lock covers) in the store; a conflicting run that
    is still alive makes this run stop before any job starts, with the path named. Nothing is
    claimed with ``--nolock``."""
    if not workflow.execution_settings.lock:
        return 0
    persistence = workflow.persistence
    try:
        return claim_paths(root, map(str, persistence.all_outputfiles()), map(str, persistence.all_inputfiles()))
    except StoreBusy as err:
        from snakemake.exceptions import WorkflowError

        raise WorkflowError(str(err)) from None


# ------------------------------------------------------------------------------------- verify


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
        meta = json.loads(side.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
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
            # sidecar (killed between its rename and Provenance.write): report it once.
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
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(not f.startswith(".") for f in files):
            return True
    return False
