"""Atomic writes leave nothing behind on failure; provenance sidecars catch corruption."""

import json

import pandas as pd
import pytest

from memctl.artifacts import Provenance, atomic_path, hash_path, sidecar_path, verify, write_parquet
from memctl.cli import main


def test_failed_write_leaves_no_artifact(tmp_path):
    target = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_directory_write_keeps_the_old_directory(tmp_path):
    target = tmp_path / "model"
    with atomic_path(target, directory=True) as tmp:
        (tmp / "w.bin").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_path(target, directory=True) as tmp:
            (tmp / "w.bin").write_text("v2-partial")
            raise RuntimeError("killed")
    assert (target / "w.bin").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_provenance_sidecar_and_verify(tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("input")
    out = tmp_path / "t.parquet"
    prov = Provenance("unit", {"k": 1}, {"source": inp, "hub": "EleutherAI/pythia-70m"})
    write_parquet(pd.DataFrame({"a": [1, 2]}), out)
    prov.write(out, extra={"n": 2})
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["settings"] == {"k": 1}
    assert meta["inputs"]["source"]["sha256"] == hash_path(inp)
    assert meta["inputs"]["hub"] == {"ref": "EleutherAI/pythia-70m"}
    assert {"torch", "transformers", "memctl"} <= set(meta["versions"])
    assert meta["code_version"].startswith("0.1.0")
    assert meta["n"] == 2 and meta["sha256"] == hash_path(out)
    assert verify(out) == []

    out.write_bytes(out.read_bytes()[:-3])  # truncated: corrupt
    assert "checksum differs" in verify(out)[0]
    with pytest.raises(SystemExit):
        main(["verify", str(tmp_path)])
