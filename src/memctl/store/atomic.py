"""Atomic artifact writes: :func:`atomic_path` and the ``write_*`` helpers built on it.

How an artifact is written:

1. The content goes to a temporary sibling ``.<name>.tmp-<pid>@<host>-<random>`` (a file, or a
   directory with ``directory=True``).
2. When the block succeeds, the content is fsynced and given the group-shared mode
   (:mod:`memctl.store.permissions`).
3. Under the directory's lock (``.memctl.lock``, ``flock``): with a ``provenance`` the sidecar
   ``<name>.meta.json`` (holding the checksum of the new content) is written atomically first;
   then the content is renamed onto ``<name>`` (a directory swaps places with the old one in one
   ``renameat2(RENAME_EXCHANGE)`` where the filesystem supports it), the directory is fsynced, and
   the name is added to the directory's record of what memctl wrote there (the lock file,
   :func:`~memctl.store.locks.record_written`).

A process killed at any point leaves either the old state, a ``.tmp-`` leftover (never accepted:
the final name does not exist or still holds the old content), or a sidecar whose checksum does
not match; ``memctl verify`` reports all of them. Leftovers of dead writers are removed the next
time the same artifact is written. Two processes writing the same artifact at once each write
their own temporary; the last rename wins and the sidecar always describes what is in place.
Each process remembers what it renamed in (:func:`~memctl.store.hashing.publish`), so that
:meth:`Provenance.write` stamps only its own version: whichever writer wins, its data and its
sidecar win together.

Test hook: with ``MEMCTL_TEST_PAUSE_BEFORE_RENAME=SECONDS`` (or ``SECONDS:NAME`` to pause only for
artifacts whose file name contains ``NAME``) every atomic write prints a line to stderr and sleeps
that long between finishing its temporary and renaming it, so tests can SIGKILL a job mid-write
deterministically. Leave it unset in real runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memctl.store.hashing import hash_path, identity, publish, remember, stat_record
from memctl.store.leftovers import remove, remove_stale_leftovers, tmp_prefix
from memctl.store.locks import directory_lock, fsync, fsync_tree, record_written
from memctl.store.permissions import has_setgid, make_dirs, share
from memctl.store.provenance import Provenance, json_default, write_sidecar

if TYPE_CHECKING:  # only for annotations: writing a table needs no pandas import here
    import pandas as pd

PAUSE_ENV = "MEMCTL_TEST_PAUSE_BEFORE_RENAME"

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
        aside = Path(tempfile.mkdtemp(prefix=tmp_prefix(final, "old"), dir=final.parent))
        os.replace(final, aside / final.name)
        os.replace(tmp, final)
        return aside
    if directory and (final.is_symlink() or final.exists()):
        final.unlink()  # a file (or link) where the directory goes
    os.replace(tmp, final)
    return None


def _test_pause(tmp: Path, final: Path) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    seconds, _, name = spec.partition(":")
    # "120:scores.parquet": any final file whose name contains it; "120:svd-ab12/scores.parquet":
    # only the final path that ends with it (one job's output among several of the same name)
    if name and not (str(final).endswith(name) if "/" in name else name in final.name):
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
    make_dirs(final.parent)
    remove_stale_leftovers(final)
    prefix = tmp_prefix(final, "tmp")
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        fsync_tree(tmp)
        share(tmp, setgid=has_setgid(final.parent))
        _test_pause(tmp, final)
        sha = meta = None
        if provenance is not None:
            digests: dict[str, str] = {}
            sha = hash_path(tmp, digests=digests)
            # size, mtime and inode survive the rename: readers trust large unchanged files by them
            stat = stat_record(tmp, digests)
            meta = provenance.sidecar(final, sha, extra, stat)
        with directory_lock(final.parent):
            if meta is not None:
                write_sidecar(final, meta)
            garbage = _rename_into_place(tmp, final, directory)
            fsync(final.parent)
            # What this process put in place: Provenance.write stamps only that (or what was put
            # there by other means), never a version another writer renamed in meanwhile.
            ident = identity(final)
            publish(final, ident)
            record_written(final.parent, final.name, artifact=meta is not None)
        if sha is not None:
            remember(final, ident, sha, stat)
        if garbage is not None:
            remove(garbage)
    except BaseException:
        remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str, provenance: Provenance | None = None) -> None:
    with atomic_path(path, provenance=provenance) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, provenance: Provenance | None = None) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n", provenance)


def write_parquet(df: pd.DataFrame, path: str | os.PathLike, provenance: Provenance | None = None) -> None:
    with atomic_path(path, provenance=provenance) as tmp:
        df.to_parquet(tmp, index=False)
