"""Runs sharing one store: claims of the paths a running workflow writes and reads.

Workflow runs started from different working directories on one store do not see each other's
Snakemake lock; :func:`claim_workflow` (an ``onstart`` hook) claims their outputs and inputs in
the store itself, so a conflicting run stops before any job starts (see docs/store.md).

In the store's root, ``.memctl-claims`` holds one byte-range lock (POSIX ``fcntl``, which NFS
also supports) per claimed path. The locks are held by the Snakemake process; the kernel (or the
NFS server) drops them when it exits or is killed, so a claim is never stale.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from memctl.store.layout import CLAIMS_NAME
from memctl.store.locks import LOCK_UNSUPPORTED
from memctl.store.permissions import make_dirs, share_fd

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
    make_dirs(root)
    claims = root / CLAIMS_NAME
    key = os.path.realpath(claims)
    fd = _claims.get(key)
    if fd is None:  # one descriptor per process: closing any other would drop its POSIX locks
        fd = os.open(claims, os.O_RDWR | os.O_CREAT, 0o666)
        share_fd(fd)
        _claims[key] = fd
    outs = sorted({os.path.realpath(p) for p in outputs})
    ins = sorted({os.path.realpath(p) for p in inputs} - set(outs))
    taken: list[int] = []
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, 0)
    except OSError as err:
        if err.errno not in LOCK_UNSUPPORTED:
            raise
        warnings.warn(
            f"memctl: no file locks in {root} ({err.strerror}): concurrent runs are not detected", stacklevel=2
        )
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
