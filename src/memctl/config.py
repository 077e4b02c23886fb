"""Configuration: schema validation with defaults, per-stage subsections, settings hashes.

The Snakefile calls :func:`load_config` before any job is scheduled, so a wrong key, type or value
fails at once with a message that names it. Stage commands receive their subsection as JSON
(``--settings``), exactly the value Snakemake sees as the rule's params.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from yaml.constructor import ConstructorError

# Prefix/suffix presets used by peers (reference facts): Pythia memorization evals, the LM
# extraction benchmark and the pruning paper, the K-FAC paper.
EXTRACTION_PRESETS: dict[str, tuple[int, int]] = {
    "32/32": (32, 32),
    "50/50": (50, 50),
    "64/48": (64, 48),
}


class ConfigError(ValueError):
    """A configuration value is missing, misspelt, of the wrong type or out of range."""


# ------------------------------------------------------------------------------- strict YAML


class DuplicateKeyError(ConstructorError):
    """A YAML mapping names one key twice (PyYAML would silently keep the last value)."""

    def __init__(self, key: Any, line: int, first_line: int, mark) -> None:
        self.key, self.line, self.first_line = key, line, first_line
        super().__init__(None, None, f"duplicate key {key!r} (line {line}; first at line {first_line})", mark)

    def __str__(self) -> str:
        return f"line {self.line}: duplicate key {self.key!r} (first at line {self.first_line})"


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping holding one key twice. Keys brought in by a
    merge (``<<: *anchor``) may be overridden; two keys written in one mapping may not."""


def _construct_strict_mapping(loader: StrictLoader, node, deep: bool = False):
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: construct_mapping names it
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise DuplicateKeyError(key, line, first, key_node.start_mark)
            seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_strict_mapping)


def load_yaml(text: str) -> Any:
    """Parse YAML text like ``yaml.safe_load``, but refuse duplicate mapping keys
    (:class:`DuplicateKeyError`, a ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader


#: A config or settings file larger than this is not one (a binary given by mistake, a data file).
MAX_YAML_BYTES = 16 * 1024 * 1024


def read_yaml_text(path: Path) -> str:
    """The text of a YAML file given as a config (or extended by one), or :class:`ConfigError`
    naming it: missing, not a regular file, too large, or not UTF-8 text (a leading byte-order
    mark is allowed)."""
    try:
        if not path.is_file():
            if path.exists():
                raise ConfigError(f"{path}: not a regular file, so not a YAML config")
            raise ConfigError(f"config file not found: {path}")
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes is not a YAML config (at most {MAX_YAML_BYTES:,} bytes)")
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from err
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a YAML config: not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                          f"{err.start}); a config is a YAML mapping of sections") from None


def schema_path() -> Path:
    return Path(str(resources.files("memctl") / "schemas" / "config.schema.yaml"))


def stage_schema_paths() -> list[Path]:
    """Schemas of the edit stages' config subsections: ``schemas/stages/<section>.schema.yaml``.

    Each stage family owns one file; :func:`load_schema` adds it under its section name.
    """
    return sorted(Path(str(resources.files("memctl") / "schemas" / "stages")).glob("*.schema.yaml"))


def load_schema() -> dict[str, Any]:
    """The core schema plus every stage fragment (one top-level section each): a fresh copy, parsed
    once per process for as long as the files are unchanged (each parse takes ~0.15 s of
    pure-Python YAML, and planning, validation and every stage's settings read it)."""
    paths = [schema_path(), *stage_schema_paths()]
    schema = copy.deepcopy(_parsed_schema(tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)))
    return _with_registered_methods(schema)


def _with_registered_methods(schema: dict[str, Any]) -> dict[str, Any]:
    """``pruning.methods`` may list the registered pruning baselines (:mod:`memctl.edit_methods`,
    the one place that declares them): their names become the items' enum here, at load time."""
    from memctl.edit_methods import baseline_methods

    methods = schema["properties"].get("pruning", {}).get("properties", {}).get("methods")
    if methods is not None:
        methods["items"] = {**methods.get("items", {}), "enum": list(baseline_methods())}
    return schema


@functools.lru_cache(maxsize=4)
def _parsed_schema(files: tuple[tuple[str, int, int], ...]) -> dict[str, Any]:
    """The schema of :func:`load_schema` from ``files`` (path, mtime, size: the cache key)."""
    core, *stages = (Path(path) for path, _, _ in files)
    schema = load_yaml(core.read_text(encoding="utf-8"))
    for path in stages:
        section = path.name.removesuffix(".schema.yaml")
        schema["properties"][section] = load_yaml(path.read_text(encoding="utf-8"))
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

    # "integer" means an int: JSON Schema also counts 640.0 as one, and a float count reaching the code
    # (range(640.0), a tensor shape) fails long after validation.
    type_checker = validator_class.TYPE_CHECKER.redefine(
        "integer", lambda checker, instance: isinstance(instance, int) and not isinstance(instance, bool))
    return jsonschema.validators.extend(validator_class, {"properties": set_defaults}, type_checker=type_checker)


_DefaultFillingValidator = _extend_with_defaults(jsonschema.Draft202012Validator)


def _where(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    return path or "<top level>"


_NUMBER_TEXT = re.compile(r"[-+]?(\d[\d_]*)?(\.\d*)?([eE][-+]?\d+)?")


def _hint(err: jsonschema.ValidationError) -> str:
    """What to write instead, for the type errors YAML's number rules cause: ``1e12`` and ``1.0e12``
    read as text (YAML 1.1 numbers in exponent form need a point and a sign: ``1.0e+12``), a count
    written as a float (``1.0e+12``, ``640.0``)."""
    if err.validator != "type":
        return ""
    wanted = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
    value = err.instance
    bound = err.schema.get("maximum")
    bound = bound if isinstance(bound, (int, float)) and not isinstance(bound, bool) else None
    limit = "" if bound is None else f" (at most {bound:,})"

    def whole(number: float) -> str:
        fits = number.is_integer() and (bound is None or abs(number) <= bound) and abs(number) < 1e18
        return f"write a whole number{limit}" + (f", e.g. {int(number)}" if fits else "")

    if isinstance(value, str) and ("integer" in wanted or "number" in wanted) and any(c.isdigit() for c in value) \
            and _NUMBER_TEXT.fullmatch(value.strip()):
        try:
            number = float(value.replace("_", ""))
        except ValueError:
            return ""
        instead = whole(number) if "integer" in wanted and "number" not in wanted else \
            f"write {yaml.safe_dump(number).splitlines()[0]}{limit}"
        return f" (YAML reads {value} as text, not a number: {instead})"
    if isinstance(value, float) and "integer" in wanted and "number" not in wanted:
        return f" (a count: {whole(value)}, without a decimal point or exponent)"
    return ""


def _error_lines(errors: list[jsonschema.ValidationError], prefix: str | None = None) -> list[str]:
    lines = []
    for err in errors:
        where = _where(err) if prefix is None else ".".join([prefix, *(str(p) for p in err.absolute_path)])
        if err.validator == "additionalProperties":
            allowed = sorted(err.schema.get("properties", {}))
            lines.append(f"{where}: {err.message}; allowed keys: {', '.join(allowed)}")
        else:
            lines.append(f"{where}: {err.message}{_hint(err)}")
    return lines


def validate_config(
    config: Mapping[str, Any], source: str = "config", *, workdir: str | os.PathLike | None = None,
    basedir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Return a validated copy of ``config`` with defaults filled in, or raise :class:`ConfigError`.

    Every problem is reported, each with the dotted key it concerns. ``root`` and ``results_dir``
    are resolved against ``workdir`` (default: the working directory) and checked against the
    project checkouts (:func:`store_location_problems`; ``basedir`` is the workflow's).
    """
    resolved = copy.deepcopy(dict(config))
    validator = _DefaultFillingValidator(load_schema())
    errors = sorted(validator.iter_errors(resolved), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(_error_lines(errors)))
    _check_semantics(resolved, source)
    workdir = Path.cwd() if workdir is None else Path(workdir)
    problems = store_location_problems(resolved["root"], resolved["results_dir"], workdir,
                                       project_dirs(workdir, basedir))
    if problems:
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(problems))
    # Resolved once, here: every stage, the plan and the resource estimates read these.
    ext = resolved["extract"]
    ext["prefix_len"], ext["suffix_len"] = prefix_suffix_lengths(ext)
    return resolved


# ------------------------------------------------------------------- where the store may live

#: System trees a store may never be in (nor be).
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin",
                "/sys", "/usr", "/System", "/Library", "/Applications", "/private/etc", "/private/var/db")
#: System directories a store may not be (a directory of its own inside one is fine: /scratch/x,
#: /tmp/run1, /home/me/store).
SYSTEM_DIRS = ("/", "/home", "/Users", "/root", "/var", "/var/tmp", "/var/lib", "/var/log", "/var/cache", "/tmp",
               "/opt", "/mnt", "/media", "/srv", "/snap", "/private", "/private/tmp", "/private/var", "/Volumes")
#: Files that make a working directory a project checkout (its files must never be in the store).
PROJECT_MARKERS = ("Snakefile", "workflow/Snakefile", ".git", "pyproject.toml", "setup.py")


def project_dirs(workdir: str | os.PathLike, basedir: str | os.PathLike | None = None) -> list[Path]:
    """The project checkouts a store must stay out of: the workflow's base directory (the one
    holding the Snakefile), the checkout this memctl runs from (an editable install), and the
    working directory when it is a project (it holds a Snakefile, ``.git``, ``pyproject.toml``...)."""
    found = []
    if basedir is not None:
        found.append(Path(basedir))
    package_checkout = Path(__file__).resolve().parents[2]
    if (package_checkout / "Snakefile").is_file():
        found.append(package_checkout)
    workdir = Path(workdir)
    if any((workdir / marker).exists() for marker in PROJECT_MARKERS):
        found.append(workdir)
    out: list[Path] = []
    for path in found:
        path = Path(os.path.abspath(path)).resolve()
        if path not in out:
            out.append(path)
    return out


def store_path_problems(value: Any, key: str, workdir: str | os.PathLike | None = None,
                        projects: list[Path] | None = None) -> list[str]:
    """Why ``value`` cannot be ``root`` / ``results_dir`` (``key``), each naming the key, the value
    and the reason: a ``..`` component or a control character; the filesystem root, a system
    directory, the home directory; the project checkout or an ancestor of it (the store would hold
    the project's own files: ``memctl verify --repair`` and stage rewrites must never reach them).
    A relative value is resolved against ``workdir`` (default: the working directory), symlinks
    followed."""
    from pathlib import PurePosixPath

    if not isinstance(value, str):
        return []  # the schema names it
    if any(part == ".." for part in PurePosixPath(value).parts):
        return [f"{key}: {value!r} contains '..'; give the store's path without it"]
    if any(ord(c) < 32 for c in value):
        return [f"{key}: {value!r} contains a control character (newline, tab, ...)"]
    workdir = Path.cwd() if workdir is None else Path(workdir)
    projects = project_dirs(workdir) if projects is None else projects
    given = Path(os.path.normpath(workdir / value))
    real = given.resolve()
    shown = repr(value) + (f" (resolves to {real})" if str(real) != value else "")
    fix = (f"; point {key} at a directory of its own"
           f" (e.g. {'results' if key == 'root' else 'results/tables'}, or /scratch/$USER/memctl)")
    for path in dict.fromkeys((given, real)):
        if str(path) == "/":
            return [f"{key}: {shown} is the filesystem root /{fix}"]
        tree = next((t for t in SYSTEM_TREES if path == Path(t) or path.is_relative_to(t)), None)
        if tree is not None:
            where = "the system directory" if path == Path(tree) else "inside the system directory"
            return [f"{key}: {shown} is {where} {tree}{fix}"]
        if str(path) in SYSTEM_DIRS:
            return [f"{key}: {shown} is the system directory {path}{fix}"]
    home = Path(os.path.expanduser("~"))
    for protected, what in [*((p, "the project checkout") for p in projects), (home.resolve(), "your home directory")]:
        if protected == real:
            return [f"{key}: {shown} is {what} {protected}: the store would hold its files{fix}"]
        if protected.is_relative_to(real):
            return [f"{key}: {shown} is an ancestor of {what} {protected}: the store would hold its files{fix}"]
    return []


def store_location_problems(root: Any, results_dir: Any, workdir: str | os.PathLike | None = None,
                            projects: list[Path] | None = None) -> list[str]:
    """:func:`store_path_problems` of ``root`` and ``results_dir``, and how they overlap: the
    tables directory may be inside the store (``results/tables``), never the store itself or a
    directory holding it."""
    workdir = Path.cwd() if workdir is None else Path(workdir)
    projects = project_dirs(workdir) if projects is None else projects
    problems = (store_path_problems(root, "root", workdir, projects)
                + store_path_problems(results_dir, "results_dir", workdir, projects))
    if not problems and isinstance(root, str) and isinstance(results_dir, str):
        store = Path(os.path.normpath(workdir / root)).resolve()
        tables = Path(os.path.normpath(workdir / results_dir)).resolve()
        if store.is_relative_to(tables):
            what = "is the store itself" if store == tables else "holds the whole store"
            problems.append(f"results_dir: {results_dir!r} {what} (root: {root!r}): the tables and the files kept "
                            f"beside them would sit among the store's artifacts; give results_dir a directory of "
                            f"its own (e.g. {root.rstrip('/') or '/'}/tables)")
    return problems


def check_store_path(value: str, key: str, workdir: str | os.PathLike | None = None) -> None:
    """Raise :class:`ConfigError` with the first of :func:`store_path_problems`."""
    problems = store_path_problems(value, key, workdir)
    if problems:
        raise ConfigError(problems[0])


def _label_problems(cfg: Mapping[str, Any]) -> list[str]:
    """Edit labels a user gave (``curvature.edits[i].label``) must tell the edits apart in the
    tables: no two alike, none equal to a label the plan gives another edit."""
    from memctl.edit_methods import family
    from memctl.labels import CURVATURE_LABELS as LABELS
    from memctl.labels import FIXED_LABELS

    reserved = {**FIXED_LABELS, **{m.label: m.description for name in ("mask", "baseline")
                                   for m in family(name).values()}}
    problems, seen = [], {}
    for i, spec in enumerate(cfg.get("curvature", {}).get("edits", [])):
        label = spec.get("label")
        if label is None:
            continue
        key = f"curvature.edits[{i}].label"
        own = {v: f"{m} edits without a label" for m, v in LABELS.items() if m != spec.get("method")}
        if label in seen:
            problems.append(f"{key}: {label!r} is also the label of {seen[label]}: two edits with one label cannot "
                            "be told apart in the tables; give each edit its own label")
        elif label in reserved or label in own:
            problems.append(f"{key}: {label!r} is the label of {reserved.get(label) or own[label]}; choose "
                            "another")
        seen.setdefault(label, f"curvature.edits[{i}]")
    return problems


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
    problems += _label_problems(cfg)
    if not problems and model["source"] == "demo":
        demo = cfg["demo"]
        problems += model_fit_problems(
            cfg, demo["tokenizer"]["vocab_size"], demo["architecture"]["context_length"],
            "demo.architecture.context_length",
        )
    if problems:
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(problems))


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML config file as a mapping; errors name the file (and the line of a duplicate key)."""
    path = Path(path)
    text = read_yaml_text(path)
    try:
        raw = load_yaml(text)
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}; YAML would keep only the last value silently: remove one") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
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
    try:
        parent_raw = read_yaml(found)
    except ConfigError as err:
        raise ConfigError(f"extends: {parent}: {err}") from None
    base = compose(parent_raw, [found.parent], (*_chain, found))
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
        for file in configfiles:  # Snakemake has read them already, but keeps the last of two equal keys
            read_yaml(file)
        raw = compose(config, [Path(configfiles[-1]).resolve().parent, *search])
        source = ", ".join(map(str, configfiles))
    else:
        default = next((d / "config" / "config.yaml" for d in search if (d / "config" / "config.yaml").is_file()), None)
        if default is None:
            raise ConfigError("no config: pass --configfile FILE (or create config/config.yaml)")
        raw = merge(compose(read_yaml(default), [default.parent, *search]), compose(overrides, search))
        source = str(default)
    return validate_config(raw, source=source, workdir=workdir, basedir=basedir)


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
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"settings file {path}: cannot read it as UTF-8 text ({err})") from err
        try:
            loaded = load_yaml(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"settings file {path}: not valid YAML: {err}") from None
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
    lines = _error_lines(errors, prefix=path)
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


#: Where :func:`native_bf16` reads the CPU's flags (Linux).
CPUINFO = "/proc/cpuinfo"


def native_bf16(gpu: bool = False) -> bool:
    """Whether bf16 autocast is fast here: on a GPU, or on a CPU whose flags (Linux
    ``/proc/cpuinfo``) show native bf16 instructions (``avx512_bf16``, ``amx_bf16``). Elsewhere
    (AVX2-only x86, unknown platforms) torch emulates bf16 and a bf16 forward pass runs several
    times slower than fp32 (7x for one linear layer on an AVX2 EPYC, measured 2026-12-06)."""
    if gpu:
        return True
    try:
        flags = Path(CPUINFO).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(f" {flag}" in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_bf16(value: Any, gpu: bool = False) -> bool:
    """``demo.train.bf16`` / ``masks.bf16``: ``auto`` -> :func:`native_bf16`; a boolean is kept."""
    return native_bf16(gpu) if value == "auto" else bool(value)
