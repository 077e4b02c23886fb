"""The plan's records (:class:`Job`, :class:`StagePlan`, :class:`Edit`, :class:`Model`,
:class:`Plan`) and the helpers every family planner uses (canonical JSON, runtime knobs, sidecar
outputs, model arguments, edit ids). The context the planners pass on is :mod:`memctl.planning.context`."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from memctl import stages as registry
from memctl.config import ConfigError, check_store_path

#: A path-safe edit id / tag.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: A model tag: a safe name, then optionally ``@<revision>`` (memctl.models.model_tag of a pinned hub model).
SAFE_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._-]+)?")
CORPUS_TABLES = ("train", "heldout", "canaries")
EXTRACT_TABLES = ("extraction", "memorized", "nonmemorized", "memorized_train", "memorized_val", "memorized_test", "er_train", "er_test", "ood",
                  "by_copies")
EIGEN_METHOD = "eigh fp64, symmetrized, clamped, descending, sign-fixed"
#: Settings that change how fast a stage runs, not what it writes (``Job.runtime``).
RUNTIME_KEYS = {"extract": ("batch_size",), "reference_topk": ("batch_size", "heldout_batch_size"),
                "evaluate": ("batch_size", "heldout_batch_size")}
#: Appended to the label of each K-FAC edit of curvature.ablations.calibration_without_memories.
WITHOUT_MEMORIES = ", calibration without memories"


def as_json(value: Any) -> str:
    """Canonical JSON: a job's ``--settings`` argument (the same text on every parse)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def store_path(value: str, key: str) -> str:
    """``root`` / ``results_dir``: any path (spaces and shell characters are quoted in every
    command), but no ``..`` component (artifacts would land outside it), no control characters,
    and not ``/``, a system directory, the home directory, the project checkout or an ancestor of
    it (:func:`memctl.config.store_path_problems`, resolved against the working directory)."""
    check_store_path(value, key)
    return value.rstrip("/") or "/"


def split_runtime(stage: str, settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """(settings that shape the stage's output, runtime knobs) of a config section."""
    keys = RUNTIME_KEYS.get(stage, ())
    return ({k: v for k, v in settings.items() if k not in keys},
            {k: int(settings[k]) for k in keys if k in settings})


def with_meta(outs: Mapping[str, str]) -> dict[str, str]:
    """Outputs and their sidecars (``<name>_meta``)."""
    return {**outs, **{f"{k}_meta": f"{v}.meta.json" for k, v in outs.items()}}


# ------------------------------------------------------------------------------- plan objects


@dataclass(frozen=True)
class Job:
    """One job of a stage: what it reads and writes, and the ``memctl`` arguments that do it."""

    stage: str
    key: str  #: the value of the stage's wildcard ("" for a stage with one job)
    inputs: Mapping[str, Any]  #: name -> path (or list of paths)
    outputs: Mapping[str, str]  #: name -> path
    args: tuple[str, ...]  #: ``memctl <command>`` arguments (``--threads`` comes from the rule)
    log: str
    benchmark: str | None
    settings: Mapping[str, Any] = field(default_factory=dict)  #: resolved settings (the ``--settings`` JSON)
    label: str | None = None
    #: knobs that change speed and memory, not the output (batch sizes): flags from the rule's
    #: resources, outside the params, the settings and the hash, so changing one reruns nothing
    runtime: Mapping[str, int] = field(default_factory=dict)

    @property
    def arg_string(self) -> str:
        """The arguments shell-quoted: every path and value reaches the shell as one word."""
        return shlex.join(self.args)

    def command(self, threads: int | None = None) -> str:
        """The command line the rule runs (without the log redirection)."""
        stage = registry.get(self.stage)
        words = ["memctl", stage.command]
        if stage.threads and threads is not None:
            words += ["--threads", str(threads)]
        for name, value in self.runtime.items():
            words += [f"--{name.replace('_', '-')}", str(value)]
        return shlex.join([*words, *self.args])


@dataclass(frozen=True)
class StagePlan:
    """The jobs of one stage and the path patterns its rule declares."""

    name: str
    wildcard: str | None  #: the wildcard that tells jobs apart (None: one job)
    outputs: Mapping[str, str]  #: name -> path pattern
    directories: tuple[str, ...]  #: outputs that are directories
    log: str
    benchmark: str | None
    jobs: Mapping[str, Job]
    shown: Mapping[str, tuple[str, str]] = field(default_factory=dict)  #: output -> (report category, caption)

    @property
    def constraint(self) -> str:
        """A regex that matches exactly this stage's job keys (rules sharing an output pattern)."""
        return "|".join(re.escape(k) for k in self.jobs) or "(?!x)x"


@dataclass(frozen=True)
class Edit:
    """An edit of the model under study, as the evaluation and the reports see it."""

    id: str
    label: str
    stage: str | None  #: the stage that writes its delta (None for the unedited model)
    delta: str | None
    info: Mapping[str, Any] = field(default_factory=dict)  #: family, mode, sparsity, tables ...


#: The unedited model: the first edit of every plan.
ORIGIN = Edit("none", "Origin", None, None, {"family": "origin"})


@dataclass(frozen=True)
class Model:
    """The model under study."""

    source: str
    tag: str  #: its directory name in the store
    ref: str  #: what ``--model`` gets: a directory or a hub id
    key: str  #: hash of what identifies its weights
    dir: str  #: ``{root}/<tag>``
    settings: Mapping[str, Any]  #: the config's ``model`` section with ``tag`` filled in
    inputs: Mapping[str, str]  #: files the model is (a demo or local model directory)


def model_args(model: Model) -> list[str]:
    """The ``--model`` / ``--model-settings`` arguments of every job that loads the model."""
    return ["--model", model.ref, "--model-settings", as_json(dict(model.settings))]


def new_edit(known: Mapping[str, Edit], model: Model, edit_id: str, label: str, stage: str, **info: Any) -> Edit:
    """An edit whose delta ``stage`` writes under the model's ``edits/``; ``known``: the edits planned so far."""
    if not SAFE_NAME.fullmatch(edit_id):
        raise ConfigError(f"edit id {edit_id!r} is not a path-safe name")
    if edit_id in known:
        raise ConfigError(f"edit id {edit_id!r} is planned twice")
    return Edit(edit_id, label, stage, f"{model.dir}/edits/{edit_id}/delta.safetensors", info)


@dataclass(frozen=True)
class Plan:
    config: Mapping[str, Any]
    root: str
    results: str
    model: Model
    stages: Mapping[str, StagePlan]
    edits: Mapping[str, Edit]
    targets: tuple[str, ...]  #: what ``rule all`` asks for

    def stage(self, name: str) -> StagePlan:
        if name not in self.stages:
            raise KeyError(f"the plan has no stage {name!r}")
        return self.stages[name]

    def job(self, stage: str, wildcards: Mapping[str, str] | None = None) -> Job:
        """The job of ``stage`` that Snakemake's ``wildcards`` select."""
        plan = self.stage(stage)
        key = "" if plan.wildcard is None else str(dict(wildcards or {})[plan.wildcard])
        try:
            return plan.jobs[key]
        except KeyError:
            raise KeyError(f"stage {stage} has no job {key!r}") from None

    def jobs(self) -> list[Job]:
        return [job for stage in self.stages.values() for job in stage.jobs.values()]

    def artifacts(self) -> list[str]:
        """Every output of every job the targets depend on, transitively. ``rule all`` asks for
        them: Snakemake looks for missing outputs only among what a target needs, so an artifact
        removed by ``memctl verify --repair`` (or lost to a kill) upstream of up-to-date tables
        would otherwise never be rebuilt."""
        producer = {path: job for job in self.jobs() for path in job.outputs.values()}
        seen: set[tuple[str, str]] = set()
        stack, found = list(self.targets), []
        while stack:
            job = producer.get(stack.pop())
            if job is None or (job.stage, job.key) in seen:
                continue
            seen.add((job.stage, job.key))
            found += job.outputs.values()
            for value in job.inputs.values():
                stack += value if isinstance(value, (list, tuple)) else [value]
        return list(dict.fromkeys(found))
