"""Configuration: schema validation with defaults, per-stage subsections, settings hashes.

The Snakefile calls :func:`load_config` before any job is scheduled, so a wrong key, type or value
fails at once with a message that names it. Stage commands receive their subsection as JSON
(``--settings``), exactly the value Snakemake sees as the rule's params.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

# Prefix/suffix presets used by peers (reference facts): Pythia memorization evals, the LM
# extraction benchmark and the pruning paper, the K-FAC paper.
EXTRACTION_PRESETS: dict[str, tuple[int, int]] = {
    "32/32": (32, 32),
    "50/50": (50, 50),
    "64/48": (64, 48),
}


class ConfigError(ValueError):
    """A configuration value is missing, misspelt, of the wrong type or out of range."""


def schema_path() -> Path:
    return Path(str(resources.files("memctl") / "schemas" / "config.schema.yaml"))


def stage_schema_paths() -> list[Path]:
    """Schemas of the edit stages' config subsections: ``schemas/stages/<section>.schema.yaml``.

    Each stage family owns one file; :func:`load_schema` adds it under its section name.
    """
    return sorted(Path(str(resources.files("memctl") / "schemas" / "stages")).glob("*.schema.yaml"))


def load_schema() -> dict[str, Any]:
    """The core schema plus every stage fragment (one top-level section each)."""
    with open(schema_path(), encoding="utf-8") as fh:
        schema = yaml.safe_load(fh)
    for path in stage_schema_paths():
        section = path.name.removesuffix(".schema.yaml")
        with open(path, encoding="utf-8") as fh:
            schema["properties"][section] = yaml.safe_load(fh)
    return schema


def _extend_with_defaults(validator_class):
    """A validator that fills in ``default`` values of object properties while it validates."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_DefaultFillingValidator = _extend_with_defaults(jsonschema.Draft202012Validator)


def _where(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    return path or "<top level>"


def validate_config(config: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """Return a validated copy of ``config`` with defaults filled in, or raise :class:`ConfigError`.

    Every problem is reported, each with the dotted key it concerns.
    """
    resolved = copy.deepcopy(dict(config))
    validator = _DefaultFillingValidator(load_schema())
    errors = sorted(validator.iter_errors(resolved), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = []
        for err in errors:
            if err.validator == "additionalProperties":
                allowed = sorted(err.schema.get("properties", {}))
                lines.append(f"{_where(err)}: {err.message}; allowed keys: {', '.join(allowed)}")
            else:
                lines.append(f"{_where(err)}: {err.message}")
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(lines))
    _check_semantics(resolved, source)
    # Resolved once, here: every stage, the plan and the resource estimates read these.
    ext = resolved["extract"]
    ext["prefix_len"], ext["suffix_len"] = prefix_suffix_lengths(ext)
    return resolved


def _check_semantics(cfg: dict[str, Any], source: str) -> None:
    """Cross-key rules that a JSON schema cannot express clearly (:func:`_section_problems` for
    each data section), and, for the demo model, whose dimensions are in the config, the
    extraction window against its context (:func:`model_fit_problems`)."""
    problems = []
    model = cfg["model"]
    if model["source"] != "demo" and not model.get("name_or_path"):
        problems.append("model.name_or_path: required when model.source is not 'demo'")
    for section in ("candidates", "heldout", "calibration", "extract"):
        problems += _section_problems(section, cfg[section])
    for section, what in (("candidates", "candidates"), ("heldout", "held-out text"),
                          ("calibration", "calibration text")):
        if cfg[section]["source"] == "demo" and model["source"] != "demo":
            problems.append(f"{section}.source: 'demo' {what} need{'s' if section != 'candidates' else ''} "
                            "model.source 'demo'")
    if not problems and model["source"] == "demo":
        demo = cfg["demo"]
        problems += model_fit_problems(
            cfg, demo["tokenizer"]["vocab_size"], demo["architecture"]["context_length"],
            "demo.architecture.context_length",
        )
    if problems:
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(problems))


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML config file as a mapping; errors name the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(raw).__name__}")
    return raw


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``: mappings merge key by key, anything else (lists included)
    is replaced whole."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def compose(raw: Mapping[str, Any], search: list[Path], _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Resolve ``extends:``. A config is complete by itself (every key it leaves out takes the
    schema default), or names the one file it extends with ``extends: PATH``: that file's config
    (itself composed) with this one's keys on top. A relative PATH is looked up in ``search``
    (the extending file's directory; for Snakemake the working directory, then the workflow's)."""
    raw = dict(raw)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"extends: expected the path of a config file, got {parent!r}")
    candidates = [Path(parent)] if Path(parent).is_absolute() else [d / parent for d in search]
    found = next((p.resolve() for p in candidates if p.is_file()), None)
    if found is None:
        raise ConfigError(f"extends: {parent} not found (looked in {', '.join(str(d) for d in search)})")
    if found in _chain:
        raise ConfigError(f"extends: {found} extends itself ({' -> '.join(map(str, (*_chain, found)))})")
    base = compose(read_yaml(found), [found.parent], (*_chain, found))
    return merge(base, raw)


def load_config(path: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Read a YAML config file (or take a mapping), resolve ``extends:`` and validate it."""
    if isinstance(path, Mapping):
        return validate_config(compose(path, [Path.cwd()]))
    path = Path(path)
    return validate_config(compose(read_yaml(path), [path.resolve().parent]), source=str(path))


def workflow_config(
    config: Mapping[str, Any], configfiles: list[str], overrides: Mapping[str, Any], workdir: Path, basedir: Path
) -> dict[str, Any]:
    """The config a Snakemake run uses, validated.

    With ``--configfile`` the given files are the config, complete by themselves or extending what
    they name (``extends:``); the demo's settings are never inherited silently. Without one,
    ``config/config.yaml`` of the working directory (else of the workflow) is the config. Values
    of ``--config`` go on top either way.
    """
    search = [workdir, basedir]
    if configfiles:
        raw = compose(config, [Path(configfiles[-1]).resolve().parent, *search])
        source = ", ".join(map(str, configfiles))
    else:
        default = next((d / "config" / "config.yaml" for d in search if (d / "config" / "config.yaml").is_file()), None)
        if default is None:
            raise ConfigError("no config: pass --configfile FILE (or create config/config.yaml)")
        raw = merge(compose(read_yaml(default), [default.parent, *search]), compose(overrides, search))
        source = str(default)
    return validate_config(raw, source=source)


def prefix_suffix_lengths(extract: Mapping[str, Any]) -> tuple[int, int]:
    """Resolve the extraction window: explicit lengths win over the preset."""
    if extract.get("prefix_len") is not None and extract.get("suffix_len") is not None:
        return int(extract["prefix_len"]), int(extract["suffix_len"])
    preset = extract.get("preset")
    if preset not in EXTRACTION_PRESETS:
        raise ConfigError(f"extract.preset: unknown preset {preset!r}; known: {sorted(EXTRACTION_PRESETS)}")
    return EXTRACTION_PRESETS[preset]


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def settings_hash(*parts: Any, length: int = 10) -> str:
    """Short, stable hash of settings (and upstream hashes) used in artifact paths."""
    digest = hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()
    return digest[:length]


def parse_settings(value: str | None) -> dict[str, Any]:
    """Parse a ``--settings`` argument: inline JSON, or ``@file`` with JSON/YAML."""
    if value is None or value == "":
        return {}
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as err:
            raise ConfigError(f"settings file not found: {path}") from err
        loaded = yaml.safe_load(text)
    else:
        try:
            loaded = json.loads(value)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--settings is not valid JSON ({err}): {value[:200]}") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"--settings must be a JSON object, got {type(loaded).__name__}")
    return loaded


# --------------------------------------------------------------------------- stage settings


#: File name endings and the format they say a file has (a declared source must not contradict them).
_EXTENSION_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl",
                      ".json": "jsonl", ".jsonl.gz": "jsonl", ".npy": "npy", ".txt": "text"}
#: Formats a declared source reads besides its own (plain text may well be JSON).
_ALSO_READS = {"text": {"jsonl"}, "jsonl": {"text"}}


def _section_problems(section: str, settings: Mapping[str, Any]) -> list[str]:
    """Cross-key problems of one section, each naming its key: a file source without a path, a hub
    source without a name, a path whose ending contradicts the declared source, an extraction
    window given neither as a preset nor as both lengths."""
    problems = []
    if section == "extract":
        if settings.get("preset") is None and (settings.get("prefix_len") is None or settings.get("suffix_len") is None):
            problems.append("extract: set either preset or both prefix_len and suffix_len")
        return problems
    if section not in ("candidates", "heldout", "calibration"):
        return problems
    src = settings.get("source")
    files = ("jsonl", "parquet", "npy") if section == "candidates" else ("text", "jsonl", "parquet")
    path = settings.get("path")
    if src in files and not path:
        problems.append(f"{section}.path: required when {section}.source is '{src}'")
    if src == "hf" and not settings.get("hf_name"):
        problems.append(f"{section}.hf_name: required when {section}.source is 'hf'")
    if src in files and path:
        name = str(path).lower()
        ending = ".jsonl.gz" if name.endswith(".jsonl.gz") else Path(name).suffix
        found = _EXTENSION_FORMATS.get(ending)
        if found is not None and found != src and found not in _ALSO_READS.get(src, ()):
            fix = f"set {section}.source: {found}, or " if found in files else ""
            problems.append(f"{section}.source: '{src}', but {section}.path {path} is named like a {found} file; "
                            f"{fix}point {section}.path at a {src} file")
    return problems


def section_schema(path: str) -> dict[str, Any]:
    """The schema of the config subsection at dotted ``path`` (``extract``, ``curvature.data``)."""
    node: Mapping[str, Any] = load_schema()
    for part in path.split("."):
        props = node.get("properties", {})
        if part not in props:
            raise ConfigError(f"no config section {path!r} (known at that level: {', '.join(sorted(props))})")
        node = props[part]
    return dict(node)


def validate_section(path: str, settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate what a stage command is handed (its ``--settings`` JSON) against the schema of the
    config subsection at dotted ``path`` (``"extract"``, ``"heldout"``, ``"curvature.data"``).

    Returns a copy with the schema defaults filled in, or raises :class:`ConfigError` listing
    every problem, each named ``path.key`` like the workflow's own validation (the section's
    cross-key rules included: a file source needs a path, ...). A command run by hand gets the
    same checks as the workflow.
    """
    if settings is None:
        settings = {}
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{path}: settings must be a JSON object, got {type(settings).__name__}")
    resolved = copy.deepcopy(dict(settings))
    validator = _DefaultFillingValidator(section_schema(path))
    errors = sorted(validator.iter_errors(resolved), key=lambda e: list(map(str, e.absolute_path)))
    lines = []
    for err in errors:
        where = ".".join([path, *(str(p) for p in err.absolute_path)])
        if err.validator == "additionalProperties":
            allowed = sorted(err.schema.get("properties", {}))
            lines.append(f"{where}: {err.message}; allowed keys: {', '.join(allowed)}")
        else:
            lines.append(f"{where}: {err.message}")
    if not lines:
        lines = _section_problems(path, resolved)
    if lines:
        raise ConfigError(f"invalid {path} settings:\n  " + "\n  ".join(lines))
    return resolved


# ----------------------------------------------------------------------- config against the model


def model_fit_problems(
    cfg: Mapping[str, Any], vocab_size: int | None, context: int | None, context_from: str
) -> list[str]:
    """What a validated config asks of a model with ``vocab_size`` ids and ``context`` positions
    that it cannot give: an extraction window (prefix + suffix) or held-out / calibration windows
    longer than the context, or ``npy`` candidates (read here, memory-mapped) holding ids outside
    the vocabulary."""
    problems = []
    ext = cfg["extract"]
    if context is not None:
        context = int(context)
        try:
            prefix, suffix = prefix_suffix_lengths(ext)
        except ConfigError as err:
            return [str(err)]
        if prefix + suffix > context:
            given = (f"preset {ext['preset']!r}" if ext.get("preset") and ext["preset"] in EXTRACTION_PRESETS
                     and EXTRACTION_PRESETS[ext["preset"]] == (prefix, suffix) else "prefix_len / suffix_len")
            problems.append(
                f"extract: prefix_len + suffix_len = {prefix} + {suffix} = {prefix + suffix} tokens ({given}) exceed "
                f"the model's context length of {context} ({context_from}); choose a shorter preset or set "
                f"extract.prefix_len / extract.suffix_len"
            )
        for section in ("heldout", "calibration"):
            n = cfg[section].get("context_length")
            if n is not None and int(n) > context:
                problems.append(f"{section}.context_length: {n} exceeds the model's context length of {context} "
                                f"({context_from})")
    cand = cfg["candidates"]
    if vocab_size is not None and cand["source"] == "npy" and cand.get("path") and not cand.get("source_tokenizer"):
        problems += _npy_vocab_problems(Path(cand["path"]), int(vocab_size))
    return problems


def _npy_vocab_problems(path: Path, vocab_size: int) -> list[str]:
    """Token ids outside ``[0, vocab_size)`` in npy candidate arrays (files that cannot be read
    are left to the candidates stage, which names them)."""
    import numpy as np

    files = sorted(path.glob("*_prefix.npy")) + sorted(path.glob("*_suffix.npy")) + sorted(
        path.glob("*_preprefix.npy")) if path.is_dir() else [path]
    for file in files:
        try:
            arr = np.load(file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            continue
        if arr.ndim != 2 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            continue
        bad = (arr < 0) | (arr >= vocab_size)
        if bad.any():
            r, c = (int(x) for x in np.argwhere(bad)[0])
            hint = ("; ids written with another tokenizer (the LM extraction benchmark's are GPT-2's)? set "
                    "candidates.source_tokenizer") if arr[r, c] >= 0 else ""
            return [
                f"candidates.path: {file} row {r} column {c}: token id {int(arr[r, c])} is outside the model's "
                f"vocabulary of {vocab_size} ids (0..{vocab_size - 1}; {int(bad.any(axis=1).sum())} of "
                f"{arr.shape[0]} rows have such ids){hint}"
            ]
    return []


def check_model_fit(cfg: Mapping[str, Any], dims: Any) -> None:
    """Raise :class:`ConfigError` when a validated config asks more of the model than it has
    (:func:`model_fit_problems`). ``dims`` is :func:`memctl.lab.workflow_model_dims` (its
    ``vocab_size`` and ``context_length``); None (a hub model not in the local cache) checks
    nothing here: the candidates stage checks against the model it loads."""
    if dims is None:
        return
    model = cfg["model"]
    context_from = ("demo.architecture.context_length" if model["source"] == "demo"
                    else f"model.name_or_path {model.get('name_or_path')}")
    problems = model_fit_problems(cfg, getattr(dims, "vocab_size", None), getattr(dims, "context_length", None),
                                  context_from)
    if problems:
        raise ConfigError("invalid config for this model:\n  " + "\n  ".join(problems))
