"""On-disk layout of K-FAC factors and eigenbases: one safetensors file per transformer layer.

Per-layer files let an edit of layers 0-2 of a 32-layer model read three files, not all of them.

- factors: ``layer-NNN.safetensors`` with ``A/<input_key>`` (summed ``a a^T``, fp32, stored once per
  shared input) and ``G/<module>`` (summed ``g g^T``, fp32); the header records the token count,
  label mode, seed and the targets (module name, role, shapes) so a file is self-describing.
- eigenbases: the same names with ``/values`` (fp64, descending, of the *mean* factor, i.e. the sum
  divided by the token count) and ``/vectors`` (fp32, columns in the same order).

:func:`factor_summary` is the table written next to a collection (``summary.parquet``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from memctl.architectures import LinearTarget
from memctl.curvature.collect import Factors

FACTORS_FORMAT = "memctl-kfac-factors/1"
EIGEN_FORMAT = "memctl-kfac-eigen/1"


def layer_file(layer: int) -> str:
    return f"layer-{layer:03d}.safetensors"


def _targets(targets: Iterable[LinearTarget]) -> list[dict]:
    return [asdict(t) for t in targets]


def _header(obj: dict) -> dict[str, str]:
    # ONE metadata key: safetensors writes its metadata map in a per-process random order, so
    # several keys would make byte-identical runs produce different files.
    return {"memctl": json.dumps(obj, sort_keys=True)}


def _read_header(fh, path: Path, expected: str) -> dict:
    header = json.loads((fh.metadata() or {}).get("memctl", "{}"))
    if header.get("format") != expected:
        raise ValueError(f"{path}: not a memctl {expected} file (format {header.get('format')!r})")
    return header


def _by_layer(targets: Iterable[LinearTarget]) -> dict[int, list[LinearTarget]]:
    out: dict[int, list[LinearTarget]] = {}
    for t in targets:
        out.setdefault(t.layer, []).append(t)
    return out


def save_factors(factors: Factors, out_dir: str | os.PathLike) -> list[Path]:
    """Write one file per layer into ``out_dir`` (the caller makes the directory atomic)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for layer, targets in sorted(_by_layer(factors.targets).items()):
        tensors = {}
        for t in targets:
            tensors.setdefault(f"A/{t.input_key}", factors.A[t.input_key].contiguous())
            tensors[f"G/{t.name}"] = factors.G[t.name].contiguous()
        header = {"format": FACTORS_FORMAT, "tokens": int(factors.tokens), "targets": _targets(targets),
                  "collection": factors.meta}
        path = out_dir / layer_file(layer)
        save_file(tensors, str(path), metadata=_header(header))
        paths.append(path)
    return paths


def factor_summary(factors: Factors) -> pd.DataFrame:
    """One row per module: shapes, tokens and traces of the mean factors."""
    rows = []
    for t in factors.targets:
        n = max(factors.tokens, 1)
        rows.append({
            "module": t.name, "short": t.short, "layer": t.layer, "group": t.group, "role": t.role,
            "input_key": t.input_key, "d_in": t.d_in, "d_out": t.d_out, "tokens": factors.tokens,
            "trace_A": float(factors.A[t.input_key].double().trace()) / n,
            "trace_G": float(factors.G[t.name].double().trace()) / n,
        })
    return pd.DataFrame(rows)


def _layer_files(directory: Path, layers: Iterable[int] | None) -> list[Path]:
    if not directory.is_dir():
        raise FileNotFoundError(f"K-FAC directory not found: {directory}")
    if layers is None:
        files = sorted(directory.glob("layer-*.safetensors"))
    else:
        files = [directory / layer_file(int(i)) for i in sorted(set(layers))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            have = sorted(int(p.name[6:9]) for p in directory.glob("layer-*.safetensors"))
            raise ValueError(f"{directory}: no factors for {missing}; collected layers: {have}")
    if not files:
        raise FileNotFoundError(f"{directory}: no layer-*.safetensors files")
    return files


def load_factors(directory: str | os.PathLike, layers: Iterable[int] | None = None) -> Factors:
    targets, A, G, tokens, meta = [], {}, {}, None, {}
    for path in _layer_files(Path(directory), layers):
        with safe_open(str(path), framework="pt") as fh:
            header = _read_header(fh, path, FACTORS_FORMAT)
            n = int(header["tokens"])
            if tokens is not None and n != tokens:
                raise ValueError(f"{path}: {n} tokens, other layers have {tokens}")
            tokens, meta = n, header.get("collection", {})
            for t in (LinearTarget(**d) for d in header["targets"]):
                targets.append(t)
                A.setdefault(t.input_key, fh.get_tensor(f"A/{t.input_key}"))
                G[t.name] = fh.get_tensor(f"G/{t.name}")
    return Factors(targets, A, G, int(tokens), meta)


@dataclass
class Eigen:
    """Eigenbasis of one factor: values descending (fp64), vectors as columns (fp32)."""

    values: torch.Tensor
    vectors: torch.Tensor


@dataclass
class Eigenbases:
    targets: list[LinearTarget]
    A: dict[str, Eigen]  #: input_key -> eigenbasis of A / tokens
    G: dict[str, Eigen]  #: module name -> eigenbasis of G / tokens
    tokens: int

    def target(self, name: str) -> LinearTarget:
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(name)


def save_eigen(eig: Eigenbases, out_dir: str | os.PathLike) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for layer, targets in sorted(_by_layer(eig.targets).items()):
        tensors = {}
        for t in targets:
            for prefix, key, e in (("A", t.input_key, eig.A[t.input_key]), ("G", t.name, eig.G[t.name])):
                tensors[f"{prefix}/{key}/values"] = e.values.contiguous()
                tensors[f"{prefix}/{key}/vectors"] = e.vectors.contiguous()
        header = {"format": EIGEN_FORMAT, "tokens": int(eig.tokens), "targets": _targets(targets)}
        path = out_dir / layer_file(layer)
        save_file(tensors, str(path), metadata=_header(header))
        paths.append(path)
    return paths


def load_eigen(directory: str | os.PathLike, layers: Iterable[int] | None = None) -> Eigenbases:
    targets, A, G, tokens = [], {}, {}, 0
    for path in _layer_files(Path(directory), layers):
        with safe_open(str(path), framework="pt") as fh:
            header = _read_header(fh, path, EIGEN_FORMAT)
            tokens = int(header["tokens"])
            for t in (LinearTarget(**d) for d in header["targets"]):
                targets.append(t)
                if t.input_key not in A:
                    A[t.input_key] = Eigen(fh.get_tensor(f"A/{t.input_key}/values"), fh.get_tensor(f"A/{t.input_key}/vectors"))
                G[t.name] = Eigen(fh.get_tensor(f"G/{t.name}/values"), fh.get_tensor(f"G/{t.name}/vectors"))
    return Eigenbases(targets, A, G, tokens)
