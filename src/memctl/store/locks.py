"""The per-directory lock held around sidecar writes and renames, and fsync.

:func:`directory_lock` is an exclusive ``flock`` on ``<directory>/.memctl.lock``; it is held only
for milliseconds. :func:`fsync` / :func:`fsync_tree` make content (and a rename, by syncing the
directory) durable before and after it is published.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from memctl.store.layout import LOCK_NAME
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
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


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
