"""The per-directory lock held around sidecar writes and renames, and fsync.

:func:`directory_lock` is an exclusive ``flock`` on ``<directory>/.memctl.lock``; it is held only
for milliseconds. :func:`fsync` / :func:`fsync_tree` make content (and a rename, by syncing the
directory) durable before and after it is published.

The lock file is also the directory's record of what memctl renamed into it: one line per name
(:func:`record_written`, under the lock), ``artifact NAME`` when it was written with its
provenance sidecar (or stamped with one), ``plain NAME`` when without. :func:`written_as` reads
it back: a file without a sidecar that the record lists as an artifact is the store's, an
incomplete artifact; one it does not list is not the store's (a user's file beside the store's).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from memctl.store.layout import LOCK_NAME, SIDECAR_SUFFIX
from memctl.store.permissions import share_fd

#: errno values meaning "this filesystem has no (such) locks": warn and go on unlocked.
LOCK_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF)
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
            share_fd(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as err:
                if err.errno not in LOCK_UNSUPPORTED:
                    raise
                if not _warned_lock:
                    _warned_lock = True
                    warnings.warn(f"memctl: no file locks on {directory} ({err.strerror}); writing unlocked", stacklevel=3)
            if os.fstat(fd).st_size == 0:
                _start_record(fd, Path(directory))
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


#: The first line of a lock file: it says what the lines below it are.
RECORD_HEADER = "# memctl: flock of this directory; below, one line per name memctl renamed into it\n"
#: Kinds of :func:`written_as` besides the record's own (``artifact``, ``plain``): a lock file left
#: by a memctl that kept no record (empty), so any name here may be the store's.
UNRECORDED = "unrecorded"


def _line(kind: str, name: str) -> str:
    return f"{kind} {json.dumps(name)}\n"


def _start_record(fd: int, directory: Path) -> None:
    """Begin the record of a new lock file (or of an empty one a memctl that kept none left): the
    header, then every name that has a sidecar here already (the store's artifacts)."""
    try:
        names = sorted({e.name[: -len(SIDECAR_SUFFIX)] for e in os.scandir(directory)
                        if e.name.endswith(SIDECAR_SUFFIX) and not e.name.startswith(".")} - {""})
        os.write(fd, (RECORD_HEADER + "".join(_line("artifact", n) for n in names)).encode())
    except OSError:  # a read-only lock file (someone else's): no record, as before it existed
        pass


def _read_record(directory: Path) -> dict[str, str] | str | None:
    """Name -> kind from ``directory``'s lock file; :data:`UNRECORDED` for an empty one; None
    when there is none (memctl never renamed anything into ``directory``)."""
    try:
        text = (Path(directory) / LOCK_NAME).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError:
        return UNRECORDED
    if not text:
        return UNRECORDED
    record: dict[str, str] = {}
    for line in text.splitlines():
        kind, _, name = line.partition(" ")
        if kind not in ("artifact", "plain"):
            continue
        try:
            name = json.loads(name)
        except ValueError:
            continue
        if isinstance(name, str) and record.get(name) != "artifact":
            record[name] = kind
    return record


def record_written(directory: str | os.PathLike, name: str, artifact: bool) -> None:
    """Add ``name`` to ``directory``'s record (the caller holds :func:`directory_lock`):
    ``artifact`` when it has its provenance sidecar, ``plain`` when it was renamed in without."""
    kind = "artifact" if artifact else "plain"
    record = _read_record(Path(directory))
    if isinstance(record, dict) and (record.get(name) == "artifact" or record.get(name) == kind):
        return
    try:
        fd = os.open(Path(directory) / LOCK_NAME, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return  # someone else's read-only lock file: no record
    try:
        os.write(fd, _line(kind, name).encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def written_as(path: str | os.PathLike, cache: dict[str, dict[str, str] | str | None] | None = None) -> str | None:
    """How memctl renamed ``path`` into its directory, by the directory's record: ``"artifact"``
    (with its sidecar), ``"plain"`` (without), :data:`UNRECORDED` (memctl wrote into the
    directory but kept no record then, so it may have), or None (not memctl's: the directory has
    no lock file, or its record does not list the name)."""
    path = Path(path)
    if cache is None:
        record = _read_record(path.parent)
    else:  # one read per directory (memctl verify's walk)
        key = str(path.parent)
        if key not in cache:
            cache[key] = _read_record(path.parent)
        record = cache[key]
    if record is None or isinstance(record, str):
        return record
    return record.get(path.name)


def fsync(path: Path) -> None:
    """fsync a file or a directory; silently skipped where the filesystem cannot."""
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


def fsync_tree(path: Path) -> None:
    """fsync every file below ``path``, then the directories, bottom up (or the one file)."""
    if path.is_dir() and not path.is_symlink():
        for root, _dirs, files in os.walk(path, topdown=False):
            for name in files:
                fsync(Path(root, name))
            fsync(Path(root))
    else:
        fsync(path)
