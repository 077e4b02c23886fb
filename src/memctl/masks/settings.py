"""Settings of one masks / baseline job, checked against the config schema fragments.

A job gets a slice of its config section (plus the mode, sparsity and threshold of that job) as
``--settings`` JSON. The job schemas are derived from ``schemas/stages/{masks,pruning}.schema.yaml``
so that defaults and limits live in one place, and a bad value fails at plan time, before any model
is loaded, with the key named (``masks.lr: -1 is less than or equal to the minimum of 0``).

A ``train-mask``, ``prune``, ``sample-memories``, ``balanced-subnet`` or ``csp`` job is resolved
once, by the planner (:func:`resolve_mask_job`, :func:`resolve_prune_job`,
:func:`resolve_own_memories`, :func:`resolve_balanced_subnet`,
:func:`memctl.masks.csp.resolve_job`: the schema check, the defaults and the cross-key rules),
into a frozen :class:`MaskJob`, :class:`PruneJob`, :class:`OwnMemories`, :class:`BalancedSubnetJob`
or :class:`memctl.masks.csp.CspJob`; its ``--settings`` JSON is their ``to_json()``, and the command
rebuilds the object with ``from_json()``, which checks keys, types and the schema's limits (every
key present, none unknown) and fills nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from memctl.config import ConfigError, _DefaultFillingValidator, parse_settings
from memctl.edit_methods import FORMS, baseline, baseline_methods

#: Memorization terms of the mask objective (memctl.masks.regularizers implements them).
MODES = ("none", "up", "down", "reciprocal")


@cache
def fragment(section: str) -> dict[str, Any]:
    """The schema of one top-level config section (``masks`` or ``pruning``)."""
    path = Path(str(resources.files("memctl") / "schemas" / "stages" / f"{section}.schema.yaml"))
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _job_schema(base: Mapping[str, Any], drop: tuple[str, ...], add: Mapping[str, Any], required: list[str]):
    schema = copy.deepcopy(dict(base))
    for key in drop:
        schema["properties"].pop(key, None)
    schema["properties"].update(copy.deepcopy(dict(add)))
    schema["required"] = required
    schema.pop("default", None)
    return schema


#: Keys of the config's ``masks`` section that are not settings of one train_mask job.
CONFIG_ONLY = ("enabled", "modes", "sweep", "ablations", "seeds", "lambda_s", "threshold", "own_memories")


def lambda_s_of(masks: Mapping[str, Any], mode: str) -> float:
    """The sparsity coefficient of ``mode`` in a config's ``masks`` section: the shared number, or the
    mode's entry of the per-mode mapping (which must name it: ``masks.lambda_s.<mode>``)."""
    value = masks["lambda_s"]
    if isinstance(value, Mapping):
        if mode not in value:
            given = ", ".join(f"{k}: {v:g}" for k, v in value.items()) or "none"
            raise ConfigError(
                f"masks.lambda_s.{mode}: the per-mode mapping gives no value for mode {mode!r} (given: {given}); "
                f"name every planned mode, or give one number for all (the paired design)")
        return float(value[mode])
    return float(value)


def lambda_s_paired(masks: Mapping[str, Any], modes) -> bool:
    """Whether ``modes`` share one lambda_s (a number, or a mapping with one value for them all)."""
    return len({lambda_s_of(masks, m) for m in modes}) <= 1


@cache
def mask_job_schema() -> dict[str, Any]:
    return _job_schema(
        fragment("masks"),
        drop=CONFIG_ONLY,
        add={
            "mode": {"enum": list(MODES)},
            # 0 turns the sparsity term off (paper Table 5's memorization-only row): no target to reach
            "lambda_s": {"type": "number", "minimum": 0},
            "threshold": {"type": ["number", "null"], "exclusiveMinimum": 0, "default": None},
            "seed": {"type": "integer", "minimum": 0, "default": 0,
                     "description": "Seeds the gate noise, the low-rank factors and the data order (one of masks.seeds)."},
        },
        required=["mode", "lambda_s"],
    )


def prune_job_schema() -> dict[str, Any]:
    """A ``prune`` job's schema; ``method``: the registered pruning baselines (memctl.edit_methods)."""
    return _prune_job_schema(tuple(baseline_methods()))


@cache
def _prune_job_schema(methods: tuple[str, ...]) -> dict[str, Any]:
    masks = fragment("masks")["properties"]
    return _job_schema(
        fragment("pruning"),
        drop=("methods", "forms", "balanced_subnet"),
        add={
            "method": {"enum": list(methods)},
            "form": {"enum": list(FORMS), "default": "sequential"},
            "sparsity": masks["sparsity"],
        },
        required=["method"],
    )


@cache
def balanced_subnet_schema() -> dict[str, Any]:
    # on_unconverged is a job setting (the config's pruning.balanced_subnet section does not list it
    # yet): fail unless a job says flag.
    unconverged = {
        **fragment("masks")["properties"]["on_unconverged"],
        "description": "A BalancedSubnet whose final mask is (almost) its random initial one: fail the job, or flag it.",
    }
    bsn = fragment("pruning")["properties"]["balanced_subnet"]
    add = {} if "on_unconverged" in bsn.get("properties", {}) else {"on_unconverged": unconverged}
    return _job_schema(bsn, drop=("enabled",), add=add, required=[])


def _resolve(schema: Mapping[str, Any], settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    resolved = copy.deepcopy(dict(settings))
    errors = sorted(_DefaultFillingValidator(schema).iter_errors(resolved), key=lambda e: list(map(str, e.path)))
    if errors:
        lines = []
        for err in errors:
            key = ".".join([where, *map(str, err.absolute_path)])
            if err.validator == "additionalProperties":
                known = err.schema.get("properties", {})
                allowed = ", ".join(sorted(known))
                for extra in sorted(set(err.instance) - set(known)):
                    lines.append(f"{key}.{extra}: unknown key; allowed keys: {allowed}")
            else:
                lines.append(f"{key}: {err.message}")
        raise ConfigError(f"invalid {where} settings:\n  " + "\n  ".join(lines))
    return resolved


class Resolved(Mapping):
    """Base of a job's settings resolved at plan time (:class:`MaskJob`, :class:`PruneJob`,
    :class:`OwnMemories`, :class:`BalancedSubnetJob`, :class:`memctl.masks.csp.CspJob`): a frozen
    dataclass with a typed field per key of its job schema, in the order of the ``--settings`` JSON
    (sorted keys). Values keep their JSON type (``lambda_s: 240``
    stays an integer; a list is a tuple), so :meth:`to_json` writes the planned text byte for byte;
    :meth:`from_json` reads it back checking keys, types and limits, filling nothing. Also a read-only mapping
    (``job["lr"]``, ``dict(job)``) for code that takes plain settings."""

    where = ""  #: the settings' config key, in messages
    resolver = ""  #: the function of the class's module that resolves them (at plan time)
    schema = ""  #: the function of the class's module that gives their job schema (limits checked on reading)

    @classmethod
    def absent(cls, settings: Mapping[str, Any]) -> dict[str, str]:
        """Fields that ``settings`` do not carry (the field is None, the key is left out of the JSON
        and may not be given), with the reason: none here (:class:`memctl.masks.csp.CspJob`: ``theta``
        in mode ``up``)."""
        return {}

    def _keys(self) -> list[str]:
        absent = self.absent({k: getattr(self, k) for k in _field_types(type(self))})
        return [k for k in _field_types(type(self)) if k not in absent]

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (tuples as lists), in field (sorted key) order."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(self, k)) for k in self)}

    def to_json(self) -> str:
        """The ``--settings`` text: canonical JSON, as :func:`memctl.planning.core.as_json` writes it."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any], *, limits: bool = True):
        """Resolved settings as they come back from JSON: every key present, none unknown, each of its
        field's type (a :class:`ConfigError` naming the key otherwise); nothing filled in and no schema
        defaults applied (the resolver did that, once, at plan time); the schema's limits checked again."""
        hints, where, absent = _field_types(cls), cls.where, cls.absent(settings)
        problems = [f"{where}.{k}: unknown key; allowed keys: {', '.join(hints)}" for k in settings if k not in hints]
        problems += [f"{where}.{k}: not a setting of this job: {why}" for k, why in absent.items() if k in settings]
        missing = [k for k in hints if k not in settings and k not in absent]
        if missing:
            problems.append(f"{where}: missing key{'s' * (len(missing) > 1)} {', '.join(missing)} (planned "
                            f"settings list every key: {cls.__module__}.{cls.resolver}(...).to_json())")
        problems += [f"{where}.{k}: {settings[k]!r} is not of type {_type_name(hint)}"
                     for k, hint in hints.items() if k in settings and not _is_of(hint, settings[k])]
        if problems:
            raise ConfigError(f"invalid {where} settings:\n  " + "\n  ".join(problems))
        # the schema's limits and choices, checked (a hand-edited `tau: -1` is refused, naming the
        # key, before any model is loaded); every key is present, so nothing is filled in
        if limits:  # (the resolvers have just checked them: they pass limits=False)
            schema = getattr(sys.modules[cls.__module__], cls.schema)()  # the class's module (csp.py: CspJob)
            _resolve(schema, {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}, where)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}, **dict.fromkeys(absent))

    @classmethod
    def from_json(cls, text: str):
        """The settings of a ``--settings`` argument (inline JSON or ``@file``): :meth:`from_dict`."""
        return cls.from_dict(parse_settings(text))


@cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class MaskJob(Resolved):
    """One ``train-mask`` job's settings, resolved (every key of :func:`mask_job_schema`, defaults
    filled): built once by :func:`resolve_mask_job` at plan time, carried as ``--settings``
    (:meth:`to_json`), rebuilt by the command (:meth:`from_json`: keys and types checked, nothing
    filled). Limits, defaults and descriptions live in ``schemas/stages/masks.schema.yaml`` only.

    ``steps`` / ``lr`` null are derived per run from the data and the gates
    (:func:`memctl.masks.training.resolve_budget`), not defaults.
    """

    where = "masks"
    resolver = "resolve_mask_job"
    schema = "mask_job_schema"

    batch_size: int
    bf16: bool | Literal["auto"]  # the planner resolves `auto`; a job run by hand may keep it
    calibration_windows: int | None
    checkpoint_every: int
    eval_mask: str
    gate: str
    groups: tuple[str, ...]
    keep_checkpoint: bool
    lambda_m: float
    lambda_s: float
    log_every: int
    logit_init: float
    logit_rank: int | None
    lr: float | None
    mem_batch_size: int
    mem_loss_tokens: str
    min_lr_ratio: float
    mode: str
    offset: float
    on_unconverged: str
    seed: int
    sparsity: float
    sparsity_tolerance: float
    steps: int | None
    tau: float
    threshold: float | None
    warmup_steps: int
    weight_decay: float


@dataclass(frozen=True)
class PruneJob(Resolved):
    """One ``prune`` job's settings, resolved by :func:`resolve_prune_job` (keys: :func:`prune_job_schema`)."""

    where = "pruning"
    resolver = "resolve_prune_job"
    schema = "prune_job_schema"

    batch_size: int
    block_size: int
    calibration_windows: int
    damp: float
    form: str
    groups: tuple[str, ...]
    method: str
    second_moments: str
    sparsity: float


@dataclass(frozen=True)
class OwnMemories(Resolved):
    """A ``sample-memories`` job's ``masks.own_memories`` settings, resolved by :func:`resolve_own_memories`."""

    where = "masks.own_memories"
    resolver = "resolve_own_memories"
    schema = "own_memories_schema"

    rows: int | None
    seed: int


@dataclass(frozen=True)
class BalancedSubnetJob(Resolved):
    """A ``balanced-subnet`` job's ``pruning.balanced_subnet`` settings, resolved by
    :func:`resolve_balanced_subnet` (keys: :func:`balanced_subnet_schema`)."""

    where = "pruning.balanced_subnet"
    resolver = "resolve_balanced_subnet"
    schema = "balanced_subnet_schema"

    balance: float
    batch_size: int
    epochs: int
    loss_tokens: str
    lr: float
    momentum: float
    on_unconverged: str
    ratio: float
    retain: str
    roles: tuple[str, ...]
    score_init: str
    seed: int
    weight_decay: float


def _is_of(hint: Any, value: Any) -> bool:
    """Whether a JSON value fits a field type (a bool is no number; an int is a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_of(a, value) for a in args)
    if origin is Literal:
        return isinstance(value, str) and value in args
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_is_of(args[0], v) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " or ".join(map(repr, args))
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    return {type(None): "null", float: "number", int: "integer", bool: "boolean", str: "string"}.get(hint, str(hint))


def resolve_mask_job(settings: Mapping[str, Any]) -> MaskJob:
    """A ``train-mask`` job's settings resolved (schema check, defaults, cross-key rules) into a
    :class:`MaskJob`; fails early naming the bad key. The planner calls it, once per job."""
    job = _resolve(mask_job_schema(), settings, "masks")
    if job["mode"] == "down" and job.get("threshold") is None:
        raise ConfigError("invalid masks settings:\n  masks.threshold: mode 'down' needs a learning threshold t")
    if not has_sparsity_term(job) and job["eval_mask"] == "topk":
        raise ConfigError(
            "invalid masks settings:\n  masks.eval_mask: 'topk' cuts the mask to the target sparsity, but "
            "lambda_s 0 has no sparsity term (the target is not part of the objective); use 'threshold'")
    return MaskJob.from_dict(job, limits=False)


def has_sparsity_term(job: Mapping[str, Any]) -> bool:
    """Whether a mask job's objective has the sparsity regularizer (``lambda_s > 0``).

    Without it (paper Table 5's memorization-only row) there is no target sparsity to reach: the
    final mask is the threshold rule at whatever sparsity training gave.
    """
    return float(job["lambda_s"]) > 0


def own_memories_schema() -> dict[str, Any]:
    """The schema of a sample_memories job's settings: ``masks.own_memories`` of the masks schema."""
    schema = copy.deepcopy(fragment("masks")["properties"]["own_memories"])
    schema.pop("default", None)
    return schema


def resolve_own_memories(settings: Mapping[str, Any]) -> OwnMemories:
    """The ``masks.own_memories`` settings of a sample_memories job (rows, seed) with defaults."""
    return OwnMemories.from_dict(_resolve(own_memories_schema(), settings, "masks.own_memories"), limits=False)


def resolve_prune_job(settings: Mapping[str, Any]) -> PruneJob:
    """A ``prune`` job's settings resolved (schema check, defaults) into a :class:`PruneJob`."""
    job = _resolve(prune_job_schema(), settings, "pruning")
    if job["second_moments"] == "kfac" and job["form"] != "one_pass" and baseline(job["method"]).reads_data:
        raise ConfigError(
            "invalid pruning settings:\n  pruning.second_moments: 'kfac' factors come from the unpruned "
            "model, so they serve the one_pass form only"
        )
    return PruneJob.from_dict(job, limits=False)


def resolve_balanced_subnet(settings: Mapping[str, Any]) -> BalancedSubnetJob:
    """A ``balanced-subnet`` job's settings resolved (schema check, defaults) into a
    :class:`BalancedSubnetJob`, once, by the planner."""
    return BalancedSubnetJob.from_dict(_resolve(balanced_subnet_schema(), settings, "pruning.balanced_subnet"),
                                       limits=False)
