"""Settings of one masks / baseline job, checked against the config schema fragments.

A job gets a slice of its config section (plus the mode, sparsity and threshold of that job) as
``--settings`` JSON. The job schemas are derived from ``schemas/stages/{masks,pruning}.schema.yaml``
so that defaults and limits live in one place, and a hand-written bad value fails before any model
is loaded, with the key named (``masks.lr: -1 is less than or equal to the minimum of 0``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from memctl.config import ConfigError, _DefaultFillingValidator

#: Memorization terms of the mask objective (memctl.masks.regularizers implements them).
MODES = ("none", "up", "down", "reciprocal")
PRUNING_METHODS = ("magnitude", "wanda", "sparsegpt")
FORMS = ("sequential", "one_pass")


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


@cache
def prune_job_schema() -> dict[str, Any]:
    masks = fragment("masks")["properties"]
    return _job_schema(
        fragment("pruning"),
        drop=("methods", "forms", "balanced_subnet"),
        add={
            "method": {"enum": list(PRUNING_METHODS)},
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


def resolve_mask_job(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A ``train-mask`` job's settings with defaults; fails early naming the bad key."""
    job = _resolve(mask_job_schema(), settings, "masks")
    if job["mode"] == "down" and job.get("threshold") is None:
        raise ConfigError("invalid masks settings:\n  masks.threshold: mode 'down' needs a learning threshold t")
    if not has_sparsity_term(job) and job["eval_mask"] == "topk":
        raise ConfigError(
            "invalid masks settings:\n  masks.eval_mask: 'topk' cuts the mask to the target sparsity, but "
            "lambda_s 0 has no sparsity term (the target is not part of the objective); use 'threshold'")
    return job


def has_sparsity_term(job: Mapping[str, Any]) -> bool:
    """Whether a mask job's objective has the sparsity regularizer (``lambda_s > 0``).

    Without it (paper Table 5's memorization-only row) there is no target sparsity to reach: the
    final mask is the threshold rule at whatever sparsity training gave.
    """
    return float(job["lambda_s"]) > 0


def resolve_own_memories(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The ``masks.own_memories`` settings of a sample_memories job (rows, seed) with defaults."""
    schema = copy.deepcopy(fragment("masks")["properties"]["own_memories"])
    schema.pop("default", None)
    return _resolve(schema, settings, "masks.own_memories")


def resolve_prune_job(settings: Mapping[str, Any]) -> dict[str, Any]:
    job = _resolve(prune_job_schema(), settings, "pruning")
    if job["second_moments"] == "kfac" and job["form"] != "one_pass" and job["method"] != "magnitude":
        raise ConfigError(
            "invalid pruning settings:\n  pruning.second_moments: 'kfac' factors come from the unpruned "
            "model, so they serve the one_pass form only"
        )
    return job


def resolve_balanced_subnet(settings: Mapping[str, Any]) -> dict[str, Any]:
    return _resolve(balanced_subnet_schema(), settings, "pruning.balanced_subnet")
