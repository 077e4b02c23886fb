"""Which linear maps of a causal LM are attention / MLP matrices, across model families.

Curvature edits, pruning masks and the baselines all work on "the weight matrices of layer i";
this module finds them once for GPT-NeoX (Pythia, the demo model), GPT-Neo, GPT-2 (``Conv1D``,
fused ``c_attn``), Llama-style models (OLMo-2, Llama, Mistral, Qwen2) and the HF vision transformer
(ViT, :mod:`memctl.vision`), and gives every one a
uniform view: ``weight(model, target)`` is always ``(d_out, d_in)`` as in ``y = W a``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where needed: the workflow reads ROLES / GROUPS at parse time
    import torch
    from torch import nn

#: (parent, leaf) name endings -> (group, role). The role names are the config vocabulary.
_ROLES: dict[tuple[str, str], tuple[str, str]] = {
    ("attention", "query_key_value"): ("attention", "qkv"),  # GPT-NeoX (fused)
    ("attn", "c_attn"): ("attention", "qkv"),  # GPT-2 (fused, Conv1D)
    ("attention", "q_proj"): ("attention", "q"),  # GPT-Neo
    ("attention", "k_proj"): ("attention", "k"),
    ("attention", "v_proj"): ("attention", "v"),
    ("attention", "out_proj"): ("attention", "o"),
    ("self_attn", "q_proj"): ("attention", "q"),  # Llama / OLMo-2
    ("self_attn", "k_proj"): ("attention", "k"),
    ("self_attn", "v_proj"): ("attention", "v"),
    ("self_attn", "o_proj"): ("attention", "o"),
    ("attention", "dense"): ("attention", "o"),  # GPT-NeoX
    ("attn", "c_proj"): ("attention", "o"),  # GPT-2
    ("mlp", "dense_h_to_4h"): ("mlp", "up"),  # GPT-NeoX
    ("mlp", "dense_4h_to_h"): ("mlp", "down"),
    ("mlp", "c_fc"): ("mlp", "up"),  # GPT-Neo, GPT-2
    ("mlp", "c_proj"): ("mlp", "down"),
    ("mlp", "gate_proj"): ("mlp", "gate"),  # Llama / OLMo-2
    ("mlp", "up_proj"): ("mlp", "up"),
    ("mlp", "down_proj"): ("mlp", "down"),
    ("attention", "o_proj"): ("attention", "o"),  # HF ViT (transformers 5: attention.{q,k,v,o}_proj)
    ("mlp", "fc1"): ("mlp", "up"),  # HF ViT
    ("mlp", "fc2"): ("mlp", "down"),
}
@dataclass(frozen=True)
class Family:
    """What memctl needs to know of a model family (HF ``model_type``) beyond its matrices' names
    (:data:`_ROLES`): the config key of its learned table of absolute positions (None: rotary or
    no table), whether q, k, v are one fused matrix, whether its input and output embeddings are
    tied unless the config says otherwise, and whether its MLP is gated (gate / up / down)."""

    positions_key: str | None = None
    fused_qkv: bool = False
    tied_embeddings: bool = False
    gated_mlp: bool = True


#: The one record per model family: the dimension estimate (:mod:`memctl.lab`), the soft prompt's
#: position limit (:mod:`memctl.soft_prompt`) and the resource planning read it. A family missing
#: here is read as Llama-style (rotary positions, separate q/k/v, gated MLP, untied embeddings).
FAMILIES: dict[str, Family] = {
    "gpt_neox": Family(fused_qkv=True, gated_mlp=False),
    "gpt2": Family("n_positions", fused_qkv=True, tied_embeddings=True, gated_mlp=False),
    "gpt_neo": Family("max_position_embeddings", tied_embeddings=True, gated_mlp=False),
    "opt": Family("max_position_embeddings", tied_embeddings=True, gated_mlp=False),
    "gpt_bigcode": Family("n_positions", fused_qkv=True, tied_embeddings=True, gated_mlp=False),
    "llama": Family(), "mistral": Family(), "olmo2": Family(), "qwen2": Family(),
}

#: HF config keys of each dimension, the first one a config holds wins (GPT-NeoX / Llama names, then
#: GPT-2's, then others').
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_heads": ("num_attention_heads", "n_head", "num_heads"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
    "context_length": ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"),
}


def family(model_type: str | None) -> Family:
    """The :class:`Family` record of ``model_type`` (Llama-style for one not in :data:`FAMILIES`)."""
    return FAMILIES.get(str(model_type), Family())


def config_value(cfg, dimension: str, default=None):
    """The first of :data:`CONFIG_KEYS` ``[dimension]`` that ``cfg`` (a HF config or its dict) sets."""
    for key in CONFIG_KEYS[dimension]:
        value = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
        if value is not None:
            return value
    return default


#: Matrices with the same input activation share one K-FAC A factor / one calibration statistic.
_INPUT_OF_ROLE = {"qkv": "attn_in", "q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "attn_out",
                  "up": "mlp_in", "gate": "mlp_in", "down": "mlp_hidden"}
ROLES = ("qkv", "q", "k", "v", "o", "gate", "up", "down")
GROUPS = ("attention", "mlp")


@dataclass(frozen=True)
class LinearTarget:
    """One weight matrix: where it lives and how it enters the network."""

    name: str  #: module path, e.g. ``gpt_neox.layers.0.mlp.dense_h_to_4h``
    layer: int  #: transformer block index
    group: str  #: ``attention`` or ``mlp``
    role: str  #: one of :data:`ROLES`
    transposed: bool  #: GPT-2 ``Conv1D`` stores the weight as ``(d_in, d_out)``
    d_in: int
    d_out: int

    @property
    def input_key(self) -> str:
        """Name of the input activation; equal for matrices that read the same tensor."""
        return f"layer{self.layer}.{_INPUT_OF_ROLE[self.role]}"

    @property
    def param_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def short(self) -> str:
        """``L03.mlp.up``: compact label for tables, plots and file names."""
        return f"L{self.layer:02d}.{self.group}.{self.role}"


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.(?:layers|h|blocks|layer)\.(\d+)\.", f".{name}.")
    return int(match.group(1)) if match else None


def linear_targets(
    model: nn.Module,
    groups: Iterable[str] | None = None,
    layers: Sequence[int] | None = None,
    roles: Iterable[str] | None = None,
) -> list[LinearTarget]:
    """The attention / MLP matrices of ``model``, in layer order, filtered by group, layer, role.

    Raises ``ValueError`` naming the model type when nothing matches or a filter value is unknown.
    """
    from torch.nn import Linear

    groups = set(groups) if groups is not None else set(GROUPS)
    roles = set(roles) if roles is not None else None
    unknown = (groups - set(GROUPS)) | ((roles or set()) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown module group/role {sorted(unknown)}; groups: {GROUPS}, roles: {ROLES}")
    n_layers = num_layers(model)
    if layers is not None:
        bad = [i for i in layers if not -n_layers <= int(i) < n_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range for a model with {n_layers} layers")
        layers = {int(i) % n_layers for i in layers}
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) < 2 or (parts[-2], parts[-1]) not in _ROLES:
            continue
        if not (isinstance(module, Linear) or _is_conv1d(module)):
            continue
        layer = _layer_index(name)
        if layer is None:
            continue
        group, role = _ROLES[(parts[-2], parts[-1])]
        if group not in groups or (roles is not None and role not in roles):
            continue
        if layers is not None and layer not in layers:
            continue
        transposed = _is_conv1d(module)
        d_in, d_out = module.weight.shape if transposed else module.weight.shape[::-1]
        found.append(LinearTarget(name, layer, group, role, transposed, int(d_in), int(d_out)))
    if not found:
        raise ValueError(
            f"no {sorted(groups)} matrices (roles {sorted(roles) if roles else 'any'}, layers "
            f"{sorted(layers) if layers is not None else 'all'}) found in a "
            f"{getattr(getattr(model, 'config', None), 'model_type', type(model).__name__)} model"
        )
    return sorted(found, key=lambda t: (t.layer, GROUPS.index(t.group), ROLES.index(t.role)))


def num_layers(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    indices = {_layer_index(name) for name, _ in model.named_modules()} - {None}
    if not indices:
        raise ValueError(f"cannot tell the number of layers of {type(model).__name__}")
    return max(indices) + 1


def module(model: nn.Module, target: LinearTarget) -> nn.Module:
    return model.get_submodule(target.name)


def weight(model: nn.Module, target: LinearTarget) -> torch.Tensor:
    """The matrix as ``(d_out, d_in)`` (a view of the parameter: do not modify in place)."""
    w = module(model, target).weight
    return w.t() if target.transposed else w


def set_weight(model: nn.Module, target: LinearTarget, value: torch.Tensor) -> None:
    """Overwrite the matrix from a ``(d_out, d_in)`` tensor (any dtype/device; cast to the parameter's)."""
    import torch

    param = module(model, target).weight
    expected = (target.d_out, target.d_in)
    if tuple(value.shape) != expected:
        raise ValueError(f"{target.name}: new weight has shape {tuple(value.shape)}, expected {expected}")
    value = value.t() if target.transposed else value
    with torch.no_grad():
        param.copy_(value.to(device=param.device, dtype=param.dtype))


def to_storage(target: LinearTarget, value: torch.Tensor) -> torch.Tensor:
    """A ``(d_out, d_in)`` tensor in the parameter's own layout (transposed for ``Conv1D``)."""
    return value.t().contiguous() if target.transposed else value.contiguous()
