"""Temporary (``.tmp-``) and moved-aside (``.old-``) entries of atomic writes.

A temporary's name, ``.<name>.tmp-<pid>@<host>-<random>``, records its writer, so a later write of
the same artifact can tell a dead writer's leftover (removed) from a live writer's temporary (left
alone), and ``memctl verify`` can report it. A similar name without ``<pid>@<host>`` is reported
but never removed: nothing says memctl wrote it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

#: Leftovers of writers on other hosts (whose process cannot be checked) older than this many
#: seconds are removed when the same artifact is written again.
STALE_ENV = "MEMCTL_STALE_TMP_S"
STALE_DEFAULT_S = 3600.0

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)@(?P<host>.*)-)?[^-]*$")


def host_tag() -> str:
    """This host's name as it appears in temporary names."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:40] or "unknown"


def tmp_prefix(final: Path, kind: str) -> str:
    """Name prefix of this process's ``kind`` (``tmp`` / ``old``) entries of ``final``."""
    return f".{final.name}.{kind}-{os.getpid()}@{host_tag()}-"


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


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


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
        """Nobody can still be writing it, and its name says which memctl process wrote it
        (``pid@host``): only such a leftover is ever removed. A name without them (a user's
        ``.notes.old-2023``, a temporary of some other tool) is not provably memctl's."""
        if self.pid is None or not self.host:
            return False
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


def leftover(path: str | os.PathLike) -> Leftover | None:
    """The :class:`Leftover` that ``path`` is, or None when its name is not one."""
    path = Path(path)
    match = _LEFTOVER.match(path.name)
    if not match:
        return None
    pid = int(match["pid"]) if match["pid"] else None
    host = match["host"]
    alive = _pid_alive(pid) if pid is not None and host == host_tag() else None
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


def remove(path: Path) -> None:
    """Delete a file or a whole directory; nothing if it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_leftovers(final: Path) -> None:
    """Remove the leftovers of writes of ``final`` whose writers are gone (see :attr:`Leftover.stale`)."""
    for lo in leftovers_of(final):
        if lo.stale:
            remove(lo.path)
