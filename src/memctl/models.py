"""Load causal LMs and their tokenizers from a local HF directory or a hub id.

One function serves the demo model (a local directory written by ``demo-pretrain``) and hub models
(Pythia, GPT-Neo, OLMo-2) on a cluster. ``trust_remote_code`` stays off unless the config turns it on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from memctl.config import ConfigError

# torch is imported inside the functions that need it: the Snakefile imports model_tag from here,
# and every Snakemake process (one per job on a cluster) would otherwise pay torch's ~5 s import.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    import torch

    if name not in DTYPE_NAMES:
        raise ConfigError(f"model.dtype: unknown dtype {name!r}; known: {DTYPE_NAMES}")
    return getattr(torch, name)

# Architectures whose attention needs the eager implementation in recent transformers.
_EAGER_ATTENTION = {"gpt_neo"}


#: What a job that asks for a GPU it does not see is told (the workflow's device settings).
GPU_HINT = ("The config asks for a GPU (resources.gpu: true): run the job where one is, or set "
            "resources.allow_cpu_fallback: true to run it on the CPU")


def resolve_device(name: str = "auto", what: str = "model.device", types: tuple[str, ...] | None = None,
                   hint: str = GPU_HINT):
    """The one device resolution of every command. ``auto``: the GPU when one is visible, else the
    CPU. A named accelerator (``cuda``, ``cuda:N``, ``mps``) must be there: no silent fall-back to
    the CPU. ``what`` names the setting in errors, ``types`` limits the device types a command
    supports, ``hint`` says what to change when a CUDA GPU is missing. The workflow passes ``cuda``
    when the config asks for a GPU (``resources.gpu: true``) unless ``resources.allow_cpu_fallback``
    says the CPU is fine."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"{what}: {name!r} is not a device ({err})") from err
    if types is not None and device.type not in types:
        raise ConfigError(f"{what}: {name!r}; use auto or one of {', '.join(types)}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise ConfigError(
                f"{what}: {name!r}, but this job sees no usable CUDA GPU (torch.cuda.is_available() is False; "
                f"CUDA_VISIBLE_DEVICES={visible if visible is not None else '<unset>'}; torch "
                f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'}). {hint}"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{what}: {name!r}, but this job sees {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{what}: {name!r}, but MPS is not available on this machine")
    return device


def model_tag(model_settings: Mapping[str, Any]) -> str:
    """Short, path-safe name for a model (``EleutherAI/pythia-70m`` -> ``EleutherAI__pythia-70m``)."""
    if model_settings.get("tag"):
        return str(model_settings["tag"])
    name = model_settings.get("name_or_path") or "demo"
    name = str(name).rstrip("/")
    if model_settings.get("source") == "local":
        name = Path(name).name
    tag = re.sub(r"[^A-Za-z0-9._-]+", "__", name)
    rev = model_settings.get("revision")
    return f"{tag}@{re.sub(r'[^A-Za-z0-9._-]+', '_', rev)}" if rev else tag


def load_tokenizer(ref: str | os.PathLike, settings: Mapping[str, Any] | None = None):
    """Tokenizer with left padding and a pad token (needed for batched greedy decoding)."""
    from transformers import AutoTokenizer

    settings = settings or {}
    _check_model_dir(ref, settings)
    tok = AutoTokenizer.from_pretrained(
        str(ref),
        revision=settings.get("revision"),
        trust_remote_code=bool(settings.get("trust_remote_code", False)),
    )
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer of {ref} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_placement(settings: Mapping[str, Any]) -> None:
    """``model.device_map`` / ``model.max_memory``: known values, and no budget without a map."""
    device_map, max_memory = settings.get("device_map"), settings.get("max_memory")
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ConfigError(f"model.device_map: {device_map!r} is not one of {DEVICE_MAPS}")
    if max_memory is not None:
        if device_map is None:
            raise ConfigError("model.max_memory needs model.device_map (e.g. auto): it budgets the placement")
        if not isinstance(max_memory, Mapping) or not max_memory:
            raise ConfigError(f"model.max_memory: {max_memory!r} is not a mapping of device -> memory")
        bad = [k for k in max_memory if not re.fullmatch(r"[0-9]+|cpu|disk", str(k))]
        if bad:
            raise ConfigError(f"model.max_memory: keys {bad} are not devices (GPU indices 0, 1, ..., cpu, disk)")


def _max_memory(settings: Mapping[str, Any]) -> dict | None:
    """``max_memory`` with GPU indices as ints, as accelerate expects (YAML / JSON keys are strings)."""
    budget = settings.get("max_memory")
    if budget is None:
        return None
    return {int(k) if str(k).isdigit() else str(k): v for k, v in budget.items()}


def placement_plan(ref: str | os.PathLike, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Where ``device_map`` + ``max_memory`` put each module, without loading a weight (an empty
    model from the config, :func:`accelerate.infer_auto_device_map`). Devices in ``max_memory`` need
    not be present: a GPU cluster's placement can be planned on a laptop."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoModelForCausalLM

    settings = settings or {}
    check_placement(settings)
    cfg = load_config(ref, settings)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype(settings.get("dtype", "float32")))
    return dict(infer_auto_device_map(model, max_memory=_max_memory(settings),
                                      no_split_module_classes=model._no_split_modules or [],
                                      dtype=torch_dtype(settings.get("dtype", "float32"))))


def _check_model_dir(ref: str | os.PathLike, settings: Mapping[str, Any]) -> None:
    """A demo / local model is a HF model directory with its ``config.json``: FileNotFoundError
    naming the directory and the missing file otherwise (not transformers' traceback)."""
    if settings.get("source") not in ("demo", "local"):
        return
    if not Path(ref).is_dir():
        raise FileNotFoundError(f"model directory not found: {ref}")
    if not (Path(ref) / "config.json").is_file():
        raise FileNotFoundError(f"{ref}: no config.json in the model directory (a Hugging Face model directory "
                                "holds config.json, the weights and the tokenizer, as save_pretrained writes them)")


def load_model(ref: str | os.PathLike, settings: Mapping[str, Any] | None = None):
    """Causal LM in eval mode on the configured device and dtype.

    With ``device_map`` (``auto`` ...; optionally budgeted per device by ``max_memory``) accelerate
    spreads the layers over the visible GPUs (then the CPU) instead: for models larger than one GPU.
    """
    from transformers import AutoModelForCausalLM

    settings = settings or {}
    ref = str(ref)
    _check_model_dir(ref, settings)
    trust = bool(settings.get("trust_remote_code", False))
    revision = settings.get("revision")
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(settings.get("dtype", "float32")),
        "revision": revision,
        "trust_remote_code": trust,
    }
    attn = settings.get("attn_implementation")
    if attn is None:
        if load_config(ref, settings).model_type in _EAGER_ATTENTION:
            attn = "eager"
    if attn:
        kwargs["attn_implementation"] = attn
    # Load straight onto the target device: a 7B model never needs a full copy in host memory.
    device = resolve_device(settings.get("device", "auto"))
    check_placement(settings)
    if settings.get("device_map"):
        kwargs["device_map"] = settings["device_map"]
        if settings.get("max_memory") is not None:
            kwargs["max_memory"] = _max_memory(settings)
    else:
        kwargs["device_map"] = str(device)
    model = AutoModelForCausalLM.from_pretrained(ref, **kwargs)
    model.eval()
    return model


def load_config(ref: str | os.PathLike, settings: Mapping[str, Any] | None = None):
    """The HF config of a model, without loading its weights."""
    from transformers import AutoConfig

    settings = settings or {}
    _check_model_dir(ref, settings)
    return AutoConfig.from_pretrained(
        str(ref),
        revision=settings.get("revision"),
        trust_remote_code=bool(settings.get("trust_remote_code", False)),
    )


def model_limits(ref: str | os.PathLike, settings: Mapping[str, Any] | None = None) -> tuple[int | None, int]:
    """(vocabulary size, context length) of a model from its HF config, without its weights:
    every token id must be below the first (None when the config does not say), every sequence
    at most the second long."""
    cfg = load_config(ref, settings)
    vocab = getattr(cfg, "vocab_size", None)
    return (int(vocab) if isinstance(vocab, int) and vocab > 0 else None), context_length(cfg)


def context_length(cfg) -> int:
    """Longest sequence the model takes, from its HF config."""
    from memctl.architectures import CONFIG_KEYS

    for key in CONFIG_KEYS["context_length"]:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the context length from {type(cfg).__name__}")
