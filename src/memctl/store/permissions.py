"""Group-shared permissions: the umask, the mode of what a write creates, ``mkdir -p``.

Everything a write creates gets the mode a new entry gets under the process umask, plus group
read/write (directories also group search, and the setgid bit when their parent has it), so
labmates sharing one store can replace it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path


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


def shared_mode(st_mode: int, umask: int, setgid: bool) -> int:
    """The mode of an entry of type ``st_mode``: the umask's, plus group rw (directories rwx)."""
    if stat.S_ISDIR(st_mode):
        return (0o777 & ~umask) | 0o070 | (stat.S_ISGID if setgid else 0)
    return (0o666 & ~umask) | 0o060 | (st_mode & 0o111 & ~umask)


def has_setgid(directory: Path) -> bool:
    try:
        return bool(directory.stat().st_mode & stat.S_ISGID)
    except OSError:
        return False


def share(path: str | os.PathLike, setgid: bool | None = None) -> None:
    """Give ``path`` (and everything below it) the mode a new entry gets under the umask, plus
    group read/write (and search for directories); directories keep the parent's setgid bit."""
    path = Path(path)
    umask = current_umask()
    if setgid is None:
        setgid = has_setgid(path.parent)
    entries = [path]
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            entries += [Path(root, name) for name in dirs + files]
    for entry in entries:
        st = entry.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        mode = shared_mode(st.st_mode, umask, setgid)
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(entry, mode)


def share_fd(fd: int) -> None:
    """Make a file this process owns (a lock or claims file) group-writable, if it is not yet."""
    st = os.fstat(fd)
    if st.st_uid == os.geteuid() and not st.st_mode & 0o020:
        with contextlib.suppress(OSError):
            os.fchmod(fd, shared_mode(st.st_mode, current_umask(), False))


def make_dirs(directory: Path) -> None:
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
