"""The artifact store: atomic writes, provenance sidecars, integrity checks, a store shared by a lab.

Modules, each importing only those above it:

- :mod:`~memctl.store.layout`: names in a store directory (sidecars, lock, claims, untracked)
- :mod:`~memctl.store.permissions`: umask, group-shared modes, ``mkdir -p``
- :mod:`~memctl.store.locks`: the per-directory lock around renames, fsync
- :mod:`~memctl.store.hashing`: checksums of artifacts, fingerprints of inputs, the checksum memo
- :mod:`~memctl.store.leftovers`: temporaries of writes: names, leftovers of dead writers
- :mod:`~memctl.store.provenance`: :class:`Provenance` and its sidecars; the check of a stage's inputs
- :mod:`~memctl.store.atomic`: :func:`atomic_path`, ``write_text`` / ``write_json`` / ``write_parquet``
- :mod:`~memctl.store.claims`: runs of several working directories on one store
- :mod:`~memctl.store.verification`: ``memctl verify`` and ``--repair``

See docs/store.md.
"""

from memctl.store.atomic import PAUSE_ENV, atomic_path, write_json, write_parquet, write_text
from memctl.store.claims import StoreBusy, claim_paths, claim_workflow
from memctl.store.hashing import fingerprint_path, hash_path
from memctl.store.layout import (
    CLAIMS_NAME,
    LOCK_NAME,
    SIDECAR_SUFFIX,
    UNTRACKED_DIRS,
    UNTRACKED_NAMES,
    sidecar_path,
)
from memctl.store.leftovers import STALE_DEFAULT_S, STALE_ENV, Leftover, leftover, leftovers_of
from memctl.store.locks import directory_lock
from memctl.store.permissions import current_umask, share, share_with_group
from memctl.store.provenance import (
    REQUIRED_FIELDS,
    TRACKED_PACKAGES,
    IntegrityError,
    Provenance,
    check_input,
    code_version,
    package_versions,
    read_sidecar,
)
from memctl.store.verification import VerifyReport, repair, verify, verify_paths

__all__ = [
    "CLAIMS_NAME",
    "IntegrityError",
    "LOCK_NAME",
    "PAUSE_ENV",
    "REQUIRED_FIELDS",
    "SIDECAR_SUFFIX",
    "STALE_DEFAULT_S",
    "STALE_ENV",
    "TRACKED_PACKAGES",
    "UNTRACKED_DIRS",
    "UNTRACKED_NAMES",
    "Leftover",
    "Provenance",
    "StoreBusy",
    "VerifyReport",
    "atomic_path",
    "claim_paths",
    "check_input",
    "claim_workflow",
    "code_version",
    "current_umask",
    "directory_lock",
    "fingerprint_path",
    "hash_path",
    "leftover",
    "leftovers_of",
    "package_versions",
    "read_sidecar",
    "repair",
    "share",
    "share_with_group",
    "sidecar_path",
    "verify",
    "verify_paths",
    "write_json",
    "write_parquet",
    "write_text",
]
