"""Edited models as deltas: only the changed matrices, and a loader that patches the base model.

Every edit stage (curvature edits, SVD truncation, pruning masks, the pruning baselines) writes one
``delta.safetensors``; ``memctl evaluate --delta`` and :func:`load_edited_model` apply it to the
unedited model. A delta holds, per parameter name (``<module>.weight``, in the parameter's own
layout):

- ``replace/<param>``: the new value (curvature edits, SVD, SparseGPT's updated weights), or
- ``mask/<param>``: a keep-mask, bit-packed (8 weights per byte), applied as ``W * mask``;

and an edit that changes no weight may hold instead (or as well):

- ``prompt/embeddings``: a soft prompt, ``[length, hidden]`` vectors put in front of every input
  (CSP, :mod:`memctl.masks.csp`); applying it attaches forward hooks (:mod:`memctl.soft_prompt`)
  and leaves every weight byte-identical.

The safetensors metadata records the format version, each mask's shape, and the caller's
``metadata`` (method, settings) as JSON under ``memctl``. A full HF model directory can be written
from a delta with :func:`write_edited_model` when a downstream tool needs one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from memctl.store import atomic_path

if TYPE_CHECKING:
    from memctl.store import Provenance

FORMAT = "memctl-delta/1"
_REPLACE, _MASK, _PROMPT = "replace/", "mask/", "prompt/embeddings"
_HEADER_KEY = "memctl_delta"


@dataclass
class Delta:
    replace: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  #: bool tensors, True = keep
    prompt: torch.Tensor | None = None  #: soft prompt [length, hidden] (None: no prompt)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> list[str]:
        return sorted({*self.replace, *self.masks})  # the weights it edits (a soft prompt edits none)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 tensor with 8 entries per byte (numpy bit order 'big')."""
    return torch.from_numpy(np.packbits(mask.detach().to("cpu", torch.bool).numpy().reshape(-1)))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape))
    bits = np.unpackbits(packed.numpy(), count=n).astype(bool)
    return torch.from_numpy(bits.reshape(shape))


def save_delta(
    path: str | os.PathLike,
    replace: Mapping[str, torch.Tensor] | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping[str, Any] | None = None,
    provenance: Provenance | None = None,
    prompt: torch.Tensor | None = None,
) -> Path:
    """Write a delta atomically. ``replace`` values keep their dtype; masks are stored as bits; a
    ``prompt`` ([length, hidden]) is stored as given.

    With a ``provenance`` the delta's sidecar is written before the delta appears.
    """
    replace, masks = dict(replace or {}), dict(masks or {})
    both = sorted(set(replace) & set(masks))
    if both:
        raise ValueError(f"parameters both replaced and masked: {both}; fold the mask into the new value")
    tensors = {_REPLACE + k: v.detach().to("cpu").contiguous() for k, v in replace.items()}
    tensors.update({_MASK + k: pack_mask(v) for k, v in masks.items()})
    if prompt is not None:
        if prompt.ndim != 2 or prompt.shape[0] < 1:
            raise ValueError(f"a soft prompt is a [length, hidden] tensor, got shape {tuple(prompt.shape)}")
        tensors[_PROMPT] = prompt.detach().to("cpu").contiguous()
    # One metadata key: safetensors writes several keys in a varying order, and the same delta
    # must give the same bytes in every process.
    header = {
        _HEADER_KEY: json.dumps(
            {"format": FORMAT, "mask_shapes": {k: list(v.shape) for k, v in masks.items()},
             "metadata": dict(metadata or {})},
            sort_keys=True, default=str,
        )
    }
    path = Path(path)
    with atomic_path(path, provenance=provenance) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def read_delta_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The caller's ``metadata`` of a delta, from its header only (no tensors are read)."""
    with safe_open(str(path), framework="pt") as fh:
        header = json.loads((fh.metadata() or {}).get(_HEADER_KEY, "{}"))
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a memctl delta")
    return header["metadata"]


def load_delta(path: str | os.PathLike) -> Delta:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"delta not found: {path}")
    delta = Delta()
    with safe_open(str(path), framework="pt") as fh:
        header = json.loads((fh.metadata() or {}).get(_HEADER_KEY, "{}"))
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a memctl delta (format {header.get('format')!r}, expected {FORMAT!r})")
        shapes = header["mask_shapes"]
        delta.metadata = header["metadata"]
        for key in fh.keys():
            if key.startswith(_REPLACE):
                delta.replace[key[len(_REPLACE):]] = fh.get_tensor(key)
            elif key == _PROMPT:
                delta.prompt = fh.get_tensor(key)
            elif key.startswith(_MASK):
                name = key[len(_MASK):]
                delta.masks[name] = unpack_mask(fh.get_tensor(key), tuple(shapes[name]))
            else:
                raise ValueError(f"{path}: unexpected tensor {key!r} in a delta")
    return delta


@torch.no_grad()
def apply_delta(model: torch.nn.Module, delta: Delta | str | os.PathLike) -> torch.nn.Module:
    """Patch ``model`` in place (replacements first, then masks, then the soft prompt's hooks);
    returns it.

    Every parameter name and shape (and the prompt's width) is checked before anything is changed,
    so a delta made for a different model fails with the parameter named and leaves the model untouched.
    """
    source = delta if isinstance(delta, Delta) else None
    delta = source or load_delta(delta)
    params = dict(model.named_parameters())
    for name in delta.params:
        if name not in params:
            raise ValueError(f"delta edits {name!r}, which this model does not have")
        new = delta.replace.get(name, delta.masks.get(name))
        if tuple(new.shape) != tuple(params[name].shape):
            raise ValueError(f"delta for {name!r} has shape {tuple(new.shape)}, the model's is {tuple(params[name].shape)}")
    if delta.prompt is not None:
        from memctl import soft_prompt

        width = model.get_input_embeddings().embedding_dim
        if delta.prompt.ndim != 2 or delta.prompt.shape[1] != width:
            raise ValueError(f"delta's soft prompt has shape {tuple(delta.prompt.shape)}, the model's input "
                             f"embeddings are {width} wide")
        if soft_prompt.attached(model) is not None:
            raise ValueError("the model already carries a soft prompt")
    for name, value in delta.replace.items():
        params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))
    for name, mask in delta.masks.items():
        params[name].mul_(mask.to(device=params[name].device, dtype=params[name].dtype))
    if delta.prompt is not None:
        soft_prompt.attach(model, delta.prompt.to(next(model.parameters()).device))
    return model


@contextmanager
def applied(model: torch.nn.Module, delta: Delta | str | os.PathLike | None) -> Iterator[torch.nn.Module]:
    """``model`` with ``delta`` applied inside the block, restored afterwards (the original values of
    the parameters it edits are kept on the CPU meanwhile, the soft prompt detached): one loaded
    model serves several edits in turn. ``None``: the unedited model."""
    if delta is None:
        yield model
        return
    delta = delta if isinstance(delta, Delta) else load_delta(delta)
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().to("cpu", copy=True) for name in delta.params if name in params}
    try:
        yield apply_delta(model, delta)
    finally:
        from memctl import soft_prompt

        if delta.prompt is not None:
            soft_prompt.detach(model)
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value.to(params[name].device))


def load_edited_model(ref: str | os.PathLike, model_settings: Mapping[str, Any] | None, delta_path=None):
    """The base model with a delta applied (or unedited when ``delta_path`` is None)."""
    from memctl.models import load_model

    model = load_model(ref, model_settings)
    if delta_path:
        apply_delta(model, delta_path)
    return model


def write_edited_model(
    ref, model_settings, delta_path, out_dir: str | os.PathLike, provenance: Provenance | None = None
) -> Path:
    """A full HF model directory (weights + config + tokenizer) of the edited model (with its
    sidecar, written before the directory appears, when a ``provenance`` is given)."""
    from memctl.models import load_tokenizer

    out_dir = Path(out_dir)
    if delta_path and load_delta(delta_path).prompt is not None:
        raise ValueError(f"{delta_path}: a soft-prompt edit changes no weights; there is no edited model directory "
                         f"to write (apply the delta to the loaded model instead)")
    model = load_edited_model(ref, model_settings, delta_path)
    with atomic_path(out_dir, directory=True, provenance=provenance) as tmp:
        model.save_pretrained(tmp)
        load_tokenizer(ref, model_settings).save_pretrained(tmp)
    return out_dir
