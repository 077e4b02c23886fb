"""The mask-training checkpoint format: safetensors + JSON only, never a pickle.

A checkpoint is a directory written atomically (``memctl.store.atomic_path``):

- ``tensors.safetensors``: the gate parameters (``gates.<name>``) and the optimizer's per-parameter
  state tensors (``optimizer.<index>.<key>``);
- ``state.json``: the format, the run's settings and their hash, the iteration reached, the gate
  names, the optimizer's param groups and scalar state, the log rows so far, the cost so far, and
  the tensors file's SHA-256.

:func:`read` checks everything against the run that wants to resume (settings, gate names, shapes
and dtypes, optimizer keys and value kinds, the checksum) and raises :class:`CheckpointError` for
anything it cannot use; the trainer then starts from scratch. :mod:`memctl.masks.training` is its
only user.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memctl.config import settings_hash

CHECKPOINT = "checkpoint"  #: the directory's name in a job's work directory
LEGACY_CHECKPOINT = "checkpoint.pt"  #: pickle of older versions: never loaded
#: /3: the cost so far is in state.json; /4: settings hashed with memctl.config.settings_hash
CHECKPOINT_FORMAT = "memctl-mask-checkpoint/4"
CHECKPOINT_TENSORS = "tensors.safetensors"
CHECKPOINT_STATE = "state.json"

_SCALAR = (int, float, bool, type(None))

#: The cost before the first segment of a job.
NO_COST: dict[str, Any] = {"tokens_processed": 0, "forward_calls": 0, "wall_time_s": 0.0, "segments": 0,
                           "devices": []}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unreadable, incomplete, or written for other settings)."""


@dataclass
class SavedState:
    iteration: int
    rows: list[dict[str, Any]]
    gates: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    cost: dict[str, Any]


def _canonical(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), for comparing settings."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _hash(settings: Mapping[str, Any]) -> str:
    return settings_hash(_canonical(dict(settings)), length=64)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ write


def save(path: Path, settings: Mapping[str, Any], iteration: int, gates: nn.Module, optimizer,
         rows: Sequence[Mapping[str, Any]], cost: Mapping[str, Any]) -> None:
    """Write the checkpoint directory ``path`` atomically (replacing an older one)."""
    from safetensors.torch import save_file

    from memctl.store import atomic_path

    tensors = {f"gates.{k}": v.detach().cpu().contiguous() for k, v in gates.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in opt["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            elif isinstance(value, _SCALAR):
                scalars.setdefault(str(index), {})[key] = value
            else:
                raise TypeError(f"optimizer state {index}.{key}: cannot checkpoint a {type(value).__name__}")
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
    with atomic_path(path, directory=True) as tmp:
        save_file(tensors, str(tmp / CHECKPOINT_TENSORS))
        state = {
            "format": CHECKPOINT_FORMAT,
            "settings": _canonical(dict(settings)),
            "settings_sha256": _hash(settings),
            "iteration": int(iteration),
            "gate_names": list(gates.state_dict()),
            "optimizer_param_groups": groups,
            "optimizer_scalar_state": scalars,
            "log": [dict(r) for r in rows],
            "cost": dict(cost),
            "tensors_sha256": _sha256(tmp / CHECKPOINT_TENSORS),
        }
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def remove(path: Path) -> None:
    """Remove the checkpoint ``path`` (a directory, or a file left where one was)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


# ------------------------------------------------------------------------------------------- read


def read(path: Path, settings: Mapping[str, Any], gates: nn.Module, optimizer,
         log_columns: Sequence[str]) -> SavedState:
    """Read and check a checkpoint against this run (its ``settings``, ``gates`` and ``optimizer``;
    log rows may hold ``log_columns``); raises :class:`CheckpointError` if it is unusable."""
    state, tensors = _load(path, settings, next(iter(gates.parameters())).device)
    iteration = state.get("iteration")
    if type(iteration) is not int or not 0 < iteration <= int(settings["steps"]):
        raise CheckpointError(f"bad iteration {iteration!r}")
    rows = _checked_rows(state.get("log"), log_columns)
    cost = checked_cost(state.get("cost"))
    gates_sd = _checked_gates(state, tensors, gates.state_dict())
    current = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    opt = {"state": _optimizer_state(state.get("optimizer_scalar_state", {}), tensors, params),
           "param_groups": _param_groups(state.get("optimizer_param_groups"), current["param_groups"])}
    return SavedState(iteration, rows, gates_sd, opt, cost)


def _load(path: Path, settings: Mapping[str, Any], device) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(state.json, the tensors on ``device``) once the files exist, parse, belong to a checkpoint of
    this format and these settings, and match their checksum."""
    from safetensors.torch import load_file

    for name in (CHECKPOINT_STATE, CHECKPOINT_TENSORS):
        if not (path / name).is_file():  # missing, or a device / FIFO planted to hang the reader
            raise CheckpointError(f"no regular file {name}")
    try:
        state = json.loads((path / CHECKPOINT_STATE).read_text(encoding="utf-8"))
        tensors_sha256 = _sha256(path / CHECKPOINT_TENSORS)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"unreadable: {err}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"not a {CHECKPOINT_FORMAT} checkpoint")
    if state.get("settings_sha256") != _hash(settings) or state.get("settings") != _canonical(dict(settings)):
        raise CheckpointError("written with other settings")
    if state.get("tensors_sha256") != tensors_sha256:
        raise CheckpointError(f"{CHECKPOINT_TENSORS} does not match the checksum in {CHECKPOINT_STATE}")
    try:  # straight onto the gates' device, as the training state lives there
        return state, load_file(str(path / CHECKPOINT_TENSORS), device=str(device))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"unreadable {CHECKPOINT_TENSORS}: {err}") from None


def _checked_rows(rows: Any, log_columns: Sequence[str]) -> list[dict[str, Any]]:
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and set(r) <= set(log_columns) and all(isinstance(v, _SCALAR) for v in r.values())
        for r in rows
    ):
        raise CheckpointError("bad log rows")
    return [dict(r) for r in rows]


def checked_cost(cost: Any) -> dict[str, Any]:
    """The ``cost`` record of a checkpoint (keys of :data:`NO_COST`), or :class:`CheckpointError`."""
    ok = (isinstance(cost, dict) and set(cost) == set(NO_COST)
          and all(type(cost[k]) is int and cost[k] >= 0 for k in ("tokens_processed", "forward_calls"))
          and type(cost["segments"]) is int and cost["segments"] >= 1
          and isinstance(cost["wall_time_s"], (int, float)) and not isinstance(cost["wall_time_s"], bool)
          and math.isfinite(cost["wall_time_s"]) and cost["wall_time_s"] >= 0
          and isinstance(cost["devices"], list) and all(isinstance(d, str) for d in cost["devices"]))
    if not ok:
        raise CheckpointError("bad cost record")
    return {**cost, "wall_time_s": float(cost["wall_time_s"]), "devices": list(cost["devices"])}


def _checked_gates(state: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                   expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gate parameters: exactly this run's names, shapes and dtypes."""
    gates_sd = {k[len("gates."):]: v for k, v in tensors.items() if k.startswith("gates.")}
    if state.get("gate_names") != list(expected) or set(gates_sd) != set(expected):
        raise CheckpointError("its gated matrices differ from this run's")
    for name, value in expected.items():
        if gates_sd[name].shape != value.shape or gates_sd[name].dtype != value.dtype:
            raise CheckpointError(f"gate {name}: {tuple(gates_sd[name].shape)} {gates_sd[name].dtype}, "
                                  f"expected {tuple(value.shape)} {value.dtype}")
    return gates_sd


def _same_kind(value: Any, like: Any) -> bool:
    """A JSON scalar that may stand for ``like`` (numbers for numbers, bools for bools; None is open)."""
    if not isinstance(value, _SCALAR):
        return False
    if like is None or value is None:
        return like is None or value is None
    if isinstance(like, bool) or isinstance(value, bool):
        return isinstance(like, bool) and isinstance(value, bool)
    return isinstance(like, (int, float)) and isinstance(value, (int, float))


def _setting(key: str, value: Any, like: Any) -> Any:
    """A saved optimizer setting checked against the current one's kind (tuples come back as lists)."""
    if isinstance(like, tuple):
        if not isinstance(value, list) or len(value) != len(like) or not all(isinstance(v, (int, float)) for v in value):
            raise CheckpointError(f"bad optimizer setting {key}: {value!r}")
        return tuple(value)
    if not _same_kind(value, like):
        raise CheckpointError(f"bad optimizer setting {key}: {value!r}")
    return value


def _param_groups(saved: Any, current: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The optimizer's param groups: this optimizer's keys, with the saved values of the same kinds."""
    if not isinstance(saved, list) or len(saved) != len(current):
        raise CheckpointError("bad optimizer param groups")
    groups = []
    for saved_group, group in zip(saved, current, strict=True):
        keys = set(group) - {"params"}
        if not isinstance(saved_group, dict) or set(saved_group) != keys:
            raise CheckpointError("optimizer param groups with other keys")
        groups.append({"params": list(group["params"]), **{k: _setting(k, saved_group[k], group[k]) for k in keys}})
    return groups


def _optimizer_state(scalars: Any, tensors: Mapping[str, torch.Tensor], params: Sequence[torch.Tensor]
                     ) -> dict[int, dict[str, Any]]:
    """Per-parameter optimizer state: tensors shaped like their parameter (or 0-d, such as AdamW's
    step count, kept on the CPU where a fresh AdamW keeps it) and JSON scalars; every parameter covered."""
    if not isinstance(scalars, dict):
        raise CheckpointError("bad optimizer scalar state")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("gates."):
            continue
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "optimizer" or not parts[1].isdigit() or int(parts[1]) >= len(params):
            raise CheckpointError(f"unexpected tensor {key!r}")
        index = int(parts[1])
        if value.ndim and value.shape != params[index].shape:
            raise CheckpointError(f"{key}: shape {tuple(value.shape)}, parameter {tuple(params[index].shape)}")
        state.setdefault(index, {})[parts[2]] = value.cpu() if value.ndim == 0 else value
    for index, entries in scalars.items():
        if not index.isdigit() or int(index) >= len(params) or not isinstance(entries, dict) or not all(
                isinstance(v, _SCALAR) for v in entries.values()):
            raise CheckpointError("bad optimizer scalar state")
        state.setdefault(int(index), {}).update(entries)
    if set(state) != set(range(len(params))):
        raise CheckpointError("optimizer state does not cover every gate parameter")
    return state
