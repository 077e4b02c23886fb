"""What a store directory holds besides artifacts: sidecar, lock and claims names, and the entries
that are no artifacts (``memctl verify`` skips them; directory checksums leave them out)."""

from __future__ import annotations

import os
from pathlib import Path

SIDECAR_SUFFIX = ".meta.json"
#: Per-directory lock file taken (flock) around sidecar writes and renames.
LOCK_NAME = ".memctl.lock"
#: In the store's root: one byte-range lock per path that a running workflow claims (claims.py).
CLAIMS_NAME = ".memctl-claims"
#: Entries ``memctl verify`` does not expect a sidecar for: Snakemake's markers, logs, benchmarks.
UNTRACKED_NAMES = frozenset({".snakemake_timestamp", LOCK_NAME, CLAIMS_NAME})
UNTRACKED_DIRS = frozenset({"logs", "benchmarks", ".snakemake"})


def sidecar_path(artifact: str | os.PathLike) -> Path:
    """Path of the provenance sidecar that belongs to ``artifact``."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + SIDECAR_SUFFIX)
