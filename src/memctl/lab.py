"""Lab-scale helpers: install a Snakemake profile by name, and size cluster jobs from the model.

``memctl install-profile`` copies ``profiles/<name>`` of this checkout to where Snakemake looks for
named profiles, so that ``snakemake --profile slurm all`` works from any directory.

The estimates are pure functions of the model's dimensions (read from a HF ``config.json``, a
``PretrainedConfig`` or the demo's architecture settings) and the resolved workflow config; the
rules turn them into ``mem_mb`` / ``runtime`` resources (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# --------------------------------------------------------------------------------- model sizes

#: Bytes per element of the ``model.dtype`` values.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Host memory of a ``memctl`` process before any model or data: Python, torch, transformers,
#: pandas (measured RSS ~0.7-1 GB on CPU; CUDA's host-side libraries add a few hundred MB).
BASE_MB = 1536
#: Estimates are multiplied by this before rounding up (allocator slack, fragmentation, copies).
SAFETY = 1.3
#: Requests are rounded up to a multiple of this many MB.
ROUND_MB = 256


@dataclass(frozen=True)
class ModelDims:
    """What the memory of a causal LM depends on, across GPT-NeoX, GPT-Neo, GPT-2, Llama/OLMo-2."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int | None = None  #: grouped-query attention (Llama style); None = num_heads
    context_length: int = 2048
    model_type: str = "gpt_neox"
    gated_mlp: bool = False  #: gate/up/down (Llama, OLMo-2) instead of up/down
    fused_qkv: bool = True  #: one (h -> 3h) matrix (GPT-NeoX, GPT-2) instead of q, k, v
    tied_embeddings: bool = False
    learned_positions: bool = False  #: a (context x h) position table (GPT-2, GPT-Neo, OPT, BigCode)

    @property
    def eager_attention(self) -> bool:
        """GPT-Neo runs with eager attention (batch x heads x seq^2 scores); the others use SDPA."""
        return self.model_type == "gpt_neo"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def linear_shapes(self) -> list[tuple[str, str, int, int]]:
        """``(group, role, d_in, d_out)`` of the attention / MLP matrices of ONE layer, with the
        role names of :mod:`memctl.architectures`."""
        h, i = self.hidden_size, self.intermediate_size
        kv = (self.num_kv_heads or self.num_heads) * self.head_dim
        if self.fused_qkv:
            attn = [("attention", "qkv", h, 3 * h)]
        else:
            attn = [("attention", "q", h, h), ("attention", "k", h, kv), ("attention", "v", h, kv)]
        attn.append(("attention", "o", h, h))
        mlp = [("mlp", "gate", h, i)] if self.gated_mlp else []
        mlp += [("mlp", "up", h, i), ("mlp", "down", i, h)]
        return attn + mlp

    def matrices(self, groups=None, layers=None, roles=None) -> list[tuple[int, str, str, int, int]]:
        """``(layer, group, role, d_in, d_out)`` of every selected matrix (None = all); layers may
        count from the end (negative), as in the config."""
        chosen = None if layers is None else {int(x) % self.num_layers for x in layers}
        return [
            (layer, group, role, d_in, d_out)
            for layer in range(self.num_layers)
            if chosen is None or layer in chosen
            for group, role, d_in, d_out in self.linear_shapes()
            if (groups is None or group in groups) and (roles is None or role in roles)
        ]

    def gated_weights(self, groups=None, layers=None, roles=None) -> int:
        """Weights of the selected attention / MLP matrices (what masks gate, edits change)."""
        return sum(d_in * d_out for *_, d_in, d_out in self.matrices(groups, layers, roles))

    @property
    def num_parameters(self) -> int:
        """All parameters (biases and norms included, approximately)."""
        h = self.hidden_size
        per_layer_small = 4 * h + sum(d_out for *_, d_out in self.linear_shapes())  # norms, biases
        embed = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        positions = self.context_length * h if self.learned_positions else 0
        return self.gated_weights() + self.num_layers * per_layer_small + embed + positions + 2 * h


def _get(cfg: Any, *keys: str, default=None):
    for key in keys:
        value = cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)
        if value is not None:
            return value
    return default


def model_dims(source: Any) -> ModelDims:
    """Dimensions from a HF config: a ``PretrainedConfig``, its dict (``config.json``), a model
    directory or a ``config.json`` path. A :class:`ModelDims` is returned as it is."""
    if isinstance(source, ModelDims):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        source = json.loads(path.read_text())
    from memctl import architectures as arch

    model_type = _get(source, "model_type", default="gpt_neox")
    known = arch.FAMILIES.get(model_type)  # memctl.architectures: the one record per family
    fam = known or arch.Family(gated_mlp=_get(source, "num_key_value_heads") is not None)
    hidden = int(arch.config_value(source, "hidden_size"))
    inter = arch.config_value(source, "intermediate_size")
    return ModelDims(
        vocab_size=int(_get(source, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(arch.config_value(source, "num_layers")),
        intermediate_size=int(inter) if inter else 4 * hidden,  # GPT-2 / GPT-Neo: null = 4h
        num_heads=int(arch.config_value(source, "num_heads")),
        num_kv_heads=_get(source, "num_key_value_heads"),
        context_length=int(arch.config_value(source, "context_length", default=2048)),
        model_type=model_type,
        gated_mlp=fam.gated_mlp,
        fused_qkv=fam.fused_qkv,
        tied_embeddings=bool(_get(source, "tie_word_embeddings", default=fam.tied_embeddings)),
        learned_positions=fam.positions_key is not None,
    )


def demo_dims(demo: Mapping) -> ModelDims:
    """The demo GPT-NeoX from the config's ``demo`` section (before it is trained)."""
    arch = demo.get("architecture", {})
    return ModelDims(
        vocab_size=int(demo.get("tokenizer", {}).get("vocab_size", 4096)),
        hidden_size=int(arch.get("hidden_size", 256)),
        num_layers=int(arch.get("num_hidden_layers", 4)),
        intermediate_size=int(arch.get("intermediate_size", 4 * int(arch.get("hidden_size", 256)))),
        num_heads=int(arch.get("num_attention_heads", 4)),
        context_length=int(arch.get("context_length", 128)),
    )


def local_model_dims(path: str | os.PathLike, key: str = "model.name_or_path") -> ModelDims:
    """Dimensions of a local HF model directory, or :class:`~memctl.config.ConfigError` naming
    ``key``, the directory and what is wrong: not there, not a directory, no ``config.json``, a
    ``config.json`` that is not JSON or lacks the dimensions."""
    from memctl.config import ConfigError

    path = Path(path)
    hint = "a local model is a Hugging Face model directory (config.json, weights, tokenizer), as save_pretrained writes"
    if not path.exists():
        raise ConfigError(f"{key}: {path}: no such directory; {hint}")
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a directory; {hint}")
    file = path / "config.json"
    if not file.is_file():
        raise ConfigError(f"{key}: {path} has no config.json (the model's architecture and dimensions); {hint}")
    try:
        raw = json.loads(file.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{key}: {file} is not a readable JSON file ({type(err).__name__}: {err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: {file} holds a JSON {type(raw).__name__}, not a model config (an object)")
    try:
        return model_dims(raw)
    except (TypeError, ValueError) as err:
        missing = [name for name, keys in (("hidden size", ("hidden_size", "n_embd", "d_model")),
                                           ("layer count", ("num_hidden_layers", "n_layer", "num_layers")),
                                           ("attention heads", ("num_attention_heads", "n_head", "num_heads")),
                                           ("vocabulary size", ("vocab_size",)))
                   if _get(raw, *keys) is None]
        what = f"has no {', '.join(missing)}" if missing else f"has a dimension that is not a number ({err})"
        raise ConfigError(f"{key}: {file} {what}: not the config.json of a causal language model") from None


def workflow_model_dims(config: Mapping) -> ModelDims | None:
    """The model of a resolved workflow config: the demo's settings, a local directory's
    ``config.json``, or a hub model's config when it is in the local HF cache (None otherwise:
    nothing is downloaded while Snakemake parses the workflow). A local model that is not a model
    directory is a :class:`~memctl.config.ConfigError` naming it, before any job runs."""
    from memctl.config import ConfigError

    model = config.get("model", {})
    source = model.get("source", "demo")
    if source == "demo":
        return demo_dims(config.get("demo", {}))
    name = str(model.get("name_or_path", ""))
    path = Path(name)
    if source == "local" or path.is_dir():  # a hub id that names a local directory loads it too
        return local_model_dims(path)
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(
            name, revision=model.get("revision"), local_files_only=True,
            trust_remote_code=bool(model.get("trust_remote_code", False)),
        )
    except OSError:  # not in the local cache (nothing is downloaded at parse time): rules keep their defaults
        return None
    except ValueError as err:  # in the cache, but not a config transformers knows
        raise ConfigError(f"model.name_or_path: {name}: its cached config cannot be read ({err})") from None
    try:
        return model_dims(cfg)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.name_or_path: {name}: its config lacks the model's dimensions ({err})") from None


# --------------------------------------------------------------------------------- the estimate


@dataclass
class MemoryEstimate:
    """Bytes by part; ``host_mb`` is what a job asks SLURM for (``--mem``), ``device_mb`` what
    must fit on the GPU when the job runs on one."""

    parts: dict[str, int] = field(default_factory=dict)
    host_mb: int = 0
    device_mb: int = 0


def _section(settings: Mapping | None, *path: str) -> Mapping:
    node: Any = settings or {}
    for key in path:
        node = node.get(key) or {} if isinstance(node, Mapping) else {}
    return node


def _seq_len(settings) -> int:
    """Prefix + suffix tokens of the extraction (resolved once by :func:`memctl.config.validate_config`;
    a partial config takes the schema's default preset)."""
    from memctl.config import prefix_suffix_lengths

    extract = dict(_section(settings, "extract"))
    if extract.get("prefix_len") is None or extract.get("suffix_len") is None:
        extract.setdefault("preset", "32/32")
    prefix, suffix = prefix_suffix_lengths(extract)
    return prefix + suffix


def _inference_bytes(dims: ModelDims, batch: int, seq: int, act_bytes: int) -> int:
    """Peak of one no-grad forward: fp32 logits and their log-softmax, eager attention scores,
    the widest hidden states, a KV cache."""
    logits = 2 * batch * seq * dims.vocab_size * 4
    scores = batch * dims.num_heads * seq * seq * 4 if dims.eager_attention else 0
    hidden = 2 * batch * seq * (4 * dims.hidden_size + dims.intermediate_size) * act_bytes
    kv_cache = 2 * dims.num_layers * batch * seq * dims.hidden_size * act_bytes
    return logits + scores + hidden + kv_cache


def _backward_bytes(dims: ModelDims, batch: int, seq: int, act_bytes: int) -> int:
    """Activations kept for a backward pass (per layer ~34 s b h bytes in 16-bit, + 5 a s^2 b with
    eager attention; Korthikanti et al. 2022; scaled to the activation dtype) plus logits, softmax
    and their gradient in fp32."""
    scores = 5 * dims.num_heads * seq * seq * batch if dims.eager_attention else 0
    per_layer = (34 * seq * batch * dims.hidden_size + scores) * act_bytes // 2
    return dims.num_layers * per_layer + 3 * batch * seq * dims.vocab_size * 4


def kfac_factor_bytes(dims: ModelDims, groups=None, layers=None, roles=None) -> int:
    """K-FAC factors in fp32: (d_in^2 + d_out^2) * 4 bytes per matrix."""
    return sum((d_in**2 + d_out**2) * 4 for *_, d_in, d_out in dims.matrices(groups, layers, roles))


#: Resource models of :func:`estimate_memory`; each stage of :mod:`memctl.stages` names one.
PROFILES = ("light", "pretrain", "generate", "score", "kfac", "eigh", "edit", "mask", "prune")


def _profile(stage: str) -> str:
    """The resource model of a stage (a :data:`memctl.stages.STAGES` name) or a profile name."""
    from memctl import stages

    if stage in PROFILES:
        return stage
    try:
        return stages.get(stage).profile
    except KeyError as err:
        raise ValueError(f"{err.args[0]}; or a resource profile: {', '.join(PROFILES)}") from None


def estimate_memory(model: Any, stage: str, settings: Mapping | None = None, *, gpu: bool = False) -> MemoryEstimate:
    """Memory of one job of ``stage`` on ``model`` (anything :func:`model_dims` reads).

    ``settings`` is the resolved workflow config (or any part of it; missing values take the
    schema defaults). With ``gpu`` the model, activations and optimizer state live on the device
    and the host holds the process, one staging copy of the weights and what the job saves.
    """
    dims = model_dims(model)
    profile = _profile(stage)
    dtype = str(_section(settings, "model").get("dtype", "float32"))
    wbytes = DTYPE_BYTES.get(dtype, 4)
    weights = dims.num_parameters * wbytes
    context = int(_section(settings, "heldout").get("context_length") or dims.context_length)
    curv = _section(settings, "curvature")
    modules = _section(curv, "modules")
    curv_sel = {"groups": modules.get("groups", ["mlp"]), "layers": modules.get("layers"), "roles": modules.get("roles")}
    masks = _section(settings, "masks")
    mask_sel = {"groups": masks.get("groups", ["attention", "mlp"])}
    device: dict[str, int] = {}  # parts that live on the GPU when there is one
    host: dict[str, int] = {}  # parts that stay in host memory either way

    if profile == "light":
        pass  # text, token ids and tables: small next to the process itself
    elif profile == "pretrain":
        train = _section(settings, "demo", "train")
        batch = int(train.get("batch_size", 32))
        params = dims.num_parameters
        device["weights+grads+adamw"] = params * 16  # fp32 master weights, grads, two moments
        device["activations"] = _backward_bytes(dims, batch, dims.context_length, 2 if train.get("bf16", True) else 4)
    elif profile == "generate":
        batch = int(_section(settings, "extract").get("batch_size", 64))
        device["weights"] = weights
        device["activations"] = _inference_bytes(dims, batch, _seq_len(settings), wbytes)
    elif profile == "score":
        ev = _section(settings, "evaluate")
        device["weights"] = weights
        device["activations"] = max(
            _inference_bytes(dims, int(ev.get("batch_size", 32)), _seq_len(settings), wbytes),
            _inference_bytes(dims, int(ev.get("heldout_batch_size", 4)), context, wbytes),
        )
        if stage == "evaluate":
            device["edit delta"] = dims.gated_weights() * wbytes  # a dense delta: the upper bound
    elif profile == "kfac":
        batch = int(_section(curv, "data").get("batch_size", 8))
        device["weights+grads"] = 2 * weights
        device["activations"] = _backward_bytes(dims, batch, context, wbytes)
        device["kfac factors"] = kfac_factor_bytes(dims, **curv_sel)
        host["saved factors"] = kfac_factor_bytes(dims, **curv_sel)
    elif profile == "eigh":
        # one layer file at a time (memctl.curvature.decompose.decompose_directory): that layer's
        # factors in, its eigenvectors out (same size), fp64 workspace of the largest eigh (on the
        # GPU when there is one)
        chosen = curv_sel["layers"] if curv_sel["layers"] is not None else range(dims.num_layers)
        per_layer = max((kfac_factor_bytes(dims, curv_sel["groups"], [int(i) % dims.num_layers], curv_sel["roles"])
                         for i in chosen), default=0)
        largest = max((max(d_in, d_out) for *_, d_in, d_out in dims.matrices(**curv_sel)), default=0)
        host["one layer's factors+eigenbases"] = 2 * per_layer
        device["eigh workspace"] = 3 * largest**2 * 8
    elif profile == "edit":
        device["weights"] = weights
        device["eigenbases"] = kfac_factor_bytes(dims, **curv_sel)
        device["delta"] = dims.gated_weights(**curv_sel) * 4
        host["saved delta"] = dims.gated_weights(**curv_sel) * 4
    elif profile == "mask":
        batch = int(masks.get("batch_size", 8)) + int(masks.get("mem_batch_size", 8))
        gated = dims.gated_weights(**mask_sel)
        device["weights"] = weights
        # fp32 logit + grad + two AdamW moments = 16 bytes, and the gated weight copy per step
        device["mask logits+adamw"] = gated * 16
        device["masked weights"] = gated * wbytes
        device["activations"] = _backward_bytes(dims, batch, context, wbytes)
        host["saved mask"] = gated * 4
    elif profile == "prune":
        calib = _section(settings, "calibration")
        largest_in = max(d_in for *_, d_in, _ in dims.matrices(**mask_sel))
        device["weights"] = 2 * weights  # the model and the pruned copy
        device["calibration pass"] = _inference_bytes(dims, int(calib.get("batch_size", 8) or 8), context, wbytes)
        device["hessian (sparsegpt)"] = 2 * largest_in**2 * 4
        host["saved mask"] = dims.gated_weights(**mask_sel) // 8

    base = BASE_MB * 2**20
    parts = {"process": base, **device, **host}
    if gpu:
        staging = weights if device else 0
        host_bytes = base + staging + sum(host.values())
        device_bytes = sum(device.values())
    else:
        host_bytes = sum(parts.values())
        device_bytes = 0
    return MemoryEstimate(parts=parts, host_mb=_round_mb(host_bytes), device_mb=_round_mb(device_bytes) if device_bytes else 0)


def _round_mb(nbytes: float) -> int:
    mb = nbytes * SAFETY / 2**20
    return int(math.ceil(mb / ROUND_MB) * ROUND_MB)


def estimate_mem_mb(model: Any, stage: str, settings: Mapping | None = None, *, gpu: bool = False, attempt: int = 1) -> int:
    """Host memory (MB) to ask SLURM for one job of ``stage``: the estimate, times ``attempt``
    (a retry after running out of memory asks for more)."""
    return estimate_memory(model, stage, settings, gpu=gpu).host_mb * max(1, int(attempt))


# ------------------------------------------------------------------------------------- runtime

#: Sustained throughput assumed by :func:`estimate_runtime_min` (FLOP/s): cautious on purpose.
GPU_FLOPS = 20e12
CPU_FLOPS = 100e9


def estimate_runtime_min(
    model: Any, stage: str, settings: Mapping | None = None, *, gpu: bool = False, attempt: int = 1,
    n_candidates: int = 15000, floor_min: int = 10,
) -> int:
    """A generous wall-time limit (minutes) from the FLOPs the stage does (2 x params per token
    forward, 3x that with a backward pass), a cautious throughput, a factor of 3 and ``attempt``.
    ``n_candidates`` stands in for the candidate count, unknown before the candidates stage."""
    dims = model_dims(model)
    profile = _profile(stage)
    params = dims.num_parameters
    context = int(_section(settings, "heldout").get("context_length") or dims.context_length)
    seq = _seq_len(settings)
    curv, masks = _section(settings, "curvature"), _section(settings, "masks")
    if profile == "pretrain":
        train = _section(settings, "demo", "train")
        flops = 6 * params * int(train.get("steps", 640)) * int(train.get("batch_size", 32)) * dims.context_length
    elif profile == "generate":
        flops = 2 * params * n_candidates * seq
    elif profile == "score":
        windows = int(_section(settings, "heldout").get("max_windows") or 512)
        flops = 2 * params * (n_candidates * seq + windows * context)
    elif profile == "kfac":
        tokens = int(_section(curv, "data").get("max_tokens") or 2_000_000)
        flops = 6 * params * tokens + tokens * kfac_factor_bytes(dims) / 2  # + covariance updates
    elif profile == "mask":
        batch = int(masks.get("batch_size", 8)) + int(masks.get("mem_batch_size", 8))
        # steps null = one pass over the calibration windows (memctl.masks.settings)
        windows = int(_section(settings, "calibration").get("max_windows") or 512)
        steps = masks.get("steps") or math.ceil(windows / max(1, int(masks.get("batch_size", 8))))
        flops = 6 * params * int(steps) * batch * context
    elif profile in ("eigh", "edit", "prune"):
        largest = max(max(d_in, d_out) for *_, d_in, d_out in dims.matrices())
        flops = 10 * dims.num_layers * len(dims.linear_shapes()) * largest**3
    else:
        flops = 0
    minutes = 3 * flops / (GPU_FLOPS if gpu else CPU_FLOPS) / 60
    return int(max(floor_min, math.ceil(minutes))) * max(1, int(attempt))


# ----------------------------------------------------------------------------- install-profile

HEADER = "# Installed by `memctl install-profile` from {src}: edit that copy and reinstall (--force).\n"


def user_profile_dir() -> Path:
    """Where Snakemake looks for a named profile after the working directory:
    ``$XDG_CONFIG_HOME/snakemake``, else ``~/.config/snakemake`` (then ``/etc/xdg/snakemake``)."""
    xdg = os.environ.get("XDG_CONFIG_HOME", "").strip()
    return Path(xdg).expanduser() / "snakemake" if xdg else Path.home() / ".config" / "snakemake"


def find_profile(name: str) -> Path:
    """``profiles/<name>`` of the working directory, else of the checkout this package lives in."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = root / "profiles" / name
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no profiles/{name}/config.yaml here or in the memctl checkout; pass --source DIR")


def _outside_paths(config: Mapping, src: Path) -> dict[str, str]:
    """Profile values that Snakemake would resolve against the profile directory (a top-level
    value naming an existing path there) but that point outside it: the copy needs them absolute."""
    found = {}
    for key, value in config.items():
        if not isinstance(value, str) or os.path.isabs(value):
            continue
        target = src / os.path.expanduser(os.path.expandvars(value))
        if target.exists() and src.resolve() not in (target.resolve(), *target.resolve().parents):
            found[key] = str(target.resolve())
    return found


def install_profile(src: Path, dest_root: Path, name: str | None = None, *, force: bool = False, link: bool = False) -> Path:
    """Copy (or symlink) profile directory ``src`` to ``dest_root/<name>``. Returns the new path.

    Files inside the profile come along, so values relative to it still resolve; a value that
    names a path outside it is made absolute in the copy. An existing different profile is only
    replaced with ``force``."""
    src = Path(src).resolve()
    config_file = src / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist")
    dest = Path(dest_root).expanduser() / (name or src.name)
    text = config_file.read_text()
    rewrites = _outside_paths(yaml.safe_load(text) or {}, src)
    if link:
        if rewrites:
            raise ValueError(f"{config_file} names paths outside the profile ({', '.join(rewrites)}): copy it instead")
        if dest.is_symlink() and dest.resolve() == src:
            return dest
        _clear(dest, force)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(src, target_is_directory=True)
        return dest
    if rewrites:
        config = yaml.safe_load(text)
        config.update(rewrites)
        text = "# (relative paths made absolute for the installed copy)\n" + yaml.safe_dump(config, sort_keys=False)
    new_config = HEADER.format(src=src) + text
    if dest.exists() and not dest.is_symlink() and _same_tree(src, dest, new_config):
        return dest
    _clear(dest, force)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "config.yaml").write_text(new_config)
    return dest


def _same_tree(src: Path, dest: Path, new_config: str) -> bool:
    def files(root: Path) -> list[Path]:
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())

    if files(src) != files(dest) or (dest / "config.yaml").read_text() != new_config:
        return False
    return all((src / rel).read_bytes() == (dest / rel).read_bytes() for rel in files(src) if str(rel) != "config.yaml")


def _clear(dest: Path, force: bool) -> None:
    if not (dest.exists() or dest.is_symlink()):
        return
    if not force:
        raise FileExistsError(f"{dest} exists and differs from the profile to install; --force replaces it")
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    else:
        shutil.rmtree(dest)


def cmd_install_profile(args) -> None:
    src = Path(args.source) if args.source else find_profile(args.name)
    dest_root = Path(args.dest).expanduser() if args.dest else user_profile_dir()
    dest = install_profile(src, dest_root, args.as_name or args.name, force=args.force, link=args.link)
    print(f"installed {src} as {dest}{' (symlink)' if args.link else ''}")
    if dest_root.resolve() not in (user_profile_dir().resolve(), Path("/etc/xdg/snakemake")):
        print(f"note: Snakemake looks for named profiles in {user_profile_dir()} and /etc/xdg/snakemake; "
              f"elsewhere use --profile {dest}")
    print(f"run: snakemake --profile {dest.name} all")


def cmd_estimate_resources(args) -> None:
    from memctl.config import load_config

    config = load_config(args.config)
    dims = model_dims(args.model) if args.model else workflow_model_dims(config)
    if dims is None:
        raise SystemExit("memctl estimate-resources: the model's config is not available locally; pass --model DIR")
    gpu = bool(config.get("resources", {}).get("gpu")) if args.gpu is None else args.gpu
    print(f"model: {dims.num_parameters / 1e6:.1f}M parameters, {dims.gated_weights() / 1e6:.1f}M in attention/MLP "
          f"matrices ({dims.model_type}, {dims.num_layers} layers, d={dims.hidden_size}); gpu={gpu}")
    from memctl.stages import STAGES

    print(f"{'stage':<18}{'mem_mb':>10}{'gpu_mb':>10}{'runtime':>9}")
    for stage in STAGES:
        est = estimate_memory(dims, stage, config, gpu=gpu)
        runtime = estimate_runtime_min(dims, stage, config, gpu=gpu)
        print(f"{stage:<18}{est.host_mb:>10}{est.device_mb:>10}{runtime:>9}")


def register(subparsers) -> None:
    """Add the lab subcommands to the main parser."""
    from memctl.arguments import arg, command

    command(subparsers, "install-profile", cmd_install_profile,
            "install a Snakemake profile of this repo by name (snakemake --profile slurm all)",
            arg("--name", default="slurm", help="profile to install: profiles/NAME (default slurm)"),
            arg("--source", default=None, help="profile directory to install (default: profiles/NAME)"),
            arg("--dest", default=None, help="profile root (default $XDG_CONFIG_HOME/snakemake or ~/.config/snakemake)"),
            arg("--as", dest="as_name", default=None, help="installed name (default NAME)"),
            arg("--force", action="store_true", help="replace an existing different profile"),
            arg("--link", action="store_true", help="symlink instead of copying (follows this checkout)"),
            description="Copy profiles/NAME to $XDG_CONFIG_HOME/snakemake/NAME (default ~/.config/snakemake), "
            "where `snakemake --profile NAME` finds it from any directory.")

    command(subparsers, "estimate-resources", cmd_estimate_resources,
            "per-stage memory (mem_mb), GPU memory and runtime estimates for a workflow config",
            arg("config", help="workflow config (YAML)"),
            arg("--model", default=None, help="HF model directory or config.json (default: from the config)"),
            arg("--gpu", default=None, action=argparse.BooleanOptionalAction,
                help="estimate for a GPU run (default: resources.gpu)"))

