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
    """Cross-key rules that a JSON schema cannot express clearly."""
    problems = []
    model = cfg["model"]
    if model["source"] != "demo" and not model.get("name_or_path"):
        problems.append("model.name_or_path: required when model.source is not 'demo'")
    cand = cfg["candidates"]
    if cand["source"] in ("jsonl", "parquet", "npy") and not cand.get("path"):
        problems.append(f"candidates.path: required when candidates.source is '{cand['source']}'")
    if cand["source"] == "hf" and not cand.get("hf_name"):
        problems.append("candidates.hf_name: required when candidates.source is 'hf'")
    if cand["source"] == "demo" and model["source"] != "demo":
        problems.append("candidates.source: 'demo' candidates need model.source 'demo'")
    held = cfg["heldout"]
    if held["source"] == "demo" and model["source"] != "demo":
        problems.append("heldout.source: 'demo' held-out text needs model.source 'demo'")
    if held["source"] in ("text", "jsonl", "parquet") and not held.get("path"):
        problems.append(f"heldout.path: required when heldout.source is '{held['source']}'")
    if held["source"] == "hf" and not held.get("hf_name"):
        problems.append("heldout.hf_name: required when heldout.source is 'hf'")
    calib = cfg["calibration"]
    if calib["source"] == "demo" and model["source"] != "demo":
        problems.append("calibration.source: 'demo' calibration text needs model.source 'demo'")
    if calib["source"] in ("text", "jsonl", "parquet") and not calib.get("path"):
        problems.append(f"calibration.path: required when calibration.source is '{calib['source']}'")
    if calib["source"] == "hf" and not calib.get("hf_name"):
        problems.append("calibration.hf_name: required when calibration.source is 'hf'")
    ext = cfg["extract"]
    if ext.get("preset") is None and (ext.get("prefix_len") is None or ext.get("suffix_len") is None):
        problems.append("extract: set either preset or both prefix_len and suffix_len")
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
