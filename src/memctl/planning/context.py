"""What the family planners share: the run's fixed facts (:class:`Base`: config, model dimensions,
store roots, log, benchmark and stage construction), what the data family exports (:class:`Data`,
:class:`Corpus`), the calibration texts the consumers ask for (:class:`Calibration`), a family's
result (:class:`FamilyPlan`), and the immutable :class:`Context` that carries what the families
before a planner planned."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from types import MappingProxyType
from typing import Any

from memctl import stages as registry
from memctl.config import ConfigError
from memctl.planning.core import ORIGIN, Edit, Job, Model, Plan, StagePlan, store_path



@dataclass(frozen=True)
class Base:
    """The run's fixed facts: the validated config, the model's dimensions, the store's roots."""

    config: Mapping[str, Any]
    dims: Any  #: a :class:`memctl.lab.ModelDims`, or None when unknown at parse time
    python_version: str  #: keys the demo corpus
    root: str
    results: str
    gpu: bool

    @classmethod
    def of(cls, config: Mapping[str, Any], dims: Any, python_version: str) -> Base:
        return cls(config, dims, python_version, store_path(config["root"], "root"),
                   store_path(config["results_dir"], "results_dir"), bool(config["resources"]["gpu"]))

    def log(self, stage: str, name: str) -> str:
        return f"{self.root}/logs/{stage}/{name}.log"

    def bench(self, stage: str, name: str) -> str | None:
        return None if registry.get(stage).cache else f"{self.root}/benchmarks/{stage}/{name}.tsv"

    def stage(self, name: str, jobs: list[Job], *, wildcard: str | None = None, outputs: Mapping[str, str] | None = None,
              directories: tuple[str, ...] = (), log: str | None = None, shown: Mapping | None = None) -> StagePlan:
        """Stage ``name`` of ``jobs``; with a ``wildcard``, ``outputs`` and ``log`` are patterns in
        it (the benchmark pattern follows the log's name)."""
        if wildcard is None:
            if len(jobs) != 1:
                raise ValueError(f"stage {name}: one job expected without a wildcard, got {len(jobs)}")
            outputs, log, bench = jobs[0].outputs, jobs[0].log, jobs[0].benchmark
        else:
            log = log or f"{self.root}/logs/{name}/{{{wildcard}}}.log"
            stem = PurePosixPath(log).name.removesuffix(".log")
            bench = self.bench(name, stem)
        keyed = {job.key: job for job in jobs}
        if len(keyed) != len(jobs):
            raise ValueError(f"stage {name}: two jobs share a key")
        return StagePlan(name, wildcard, dict(outputs or {}), directories, log, bench, keyed, dict(shown or {}))


@dataclass(frozen=True)
class Corpus:
    """The demo's corpus: its directory and tables (read where a section's source is ``demo``)."""

    dir: str
    files: Mapping[str, str]  #: ``corpus_<table>`` -> path

    def inputs(self, config: Mapping[str, Any], section: str) -> dict[str, str]:
        """A local data file (candidates / text) is an input: replacing it reruns what read it."""
        settings = config[section]
        if settings["source"] in ("jsonl", "parquet", "npy", "text") and settings.get("path"):
            return {"data": settings["path"]}
        if settings["source"] == "hf" and os.path.exists(settings.get("hf_name") or ""):
            return {"data": settings["hf_name"]}
        if settings["source"] == "demo":
            return dict(self.files)
        return {}

    def args(self, config: Mapping[str, Any], section: str) -> list[str]:
        return ["--corpus", self.dir] if config[section]["source"] == "demo" else []


@dataclass(frozen=True)
class Data:
    """What the data family exports (``Context.data``): artifact paths and hashes later families key on."""

    corpus: Corpus
    candidates: str
    extract_hash: str
    tables: Mapping[str, str]  #: extract table -> path
    #: every sequence an evaluation or validation split scores: calibration windows sharing an
    #: ``disjoint_ngram``-token run with one are dropped
    evaluated: tuple[str, ...]
    disjoint_ngram: int
    heldout: str
    reference: str
    evaluate_settings: Mapping[str, Any]  #: the ``evaluate`` section less its runtime knobs
    eval_runtime: Mapping[str, int]
    eval_hash: str
    eval_dir: str

    def metrics(self, edit: str) -> str:
        return f"{self.eval_dir}/{edit}/metrics.parquet"


@dataclass(frozen=True)
class Calibration:
    """Calibration windows a consumer reads (:func:`memctl.planning.data.calibration_windows`)."""

    consumer: str  #: ``kfac`` or ``masks``
    without_memories: bool  #: the curvature ablation's text (not what the consumer's report names)
    path: str
    hash: str
    job: Job  #: the ``calibration`` job that writes it (one per hash)


@dataclass(frozen=True)
class FamilyPlan:
    """What one family planner returns: new stages, new edits, targets, calibration texts it reads,
    and named values later families read (``exports``)."""

    stages: tuple[StagePlan, ...] = ()
    edits: tuple[Edit, ...] = ()  #: new edits, in order
    replaced: tuple[Edit, ...] = ()  #: edits planned before, with new info (they keep their place)
    targets: tuple[str, ...] = ()
    targets_at: str = "end"  #: "end", "start" (before the targets so far) or "only" (replace them)
    calibration: tuple[Calibration, ...] = ()
    exports: Mapping[str, Any] = field(default_factory=dict)


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Context:
    """What the families planned so far (read-only): each planner reads it and returns a
    :class:`FamilyPlan`; :meth:`extend` gives the next family's context."""

    base: Base
    stages: Mapping[str, StagePlan] = field(default_factory=lambda: _frozen({}))
    edits: Mapping[str, Edit] = field(default_factory=lambda: _frozen({"none": ORIGIN}))
    targets: tuple[str, ...] = ()
    calibration: tuple[Calibration, ...] = ()
    exports: Mapping[str, Any] = field(default_factory=lambda: _frozen({}))

    @property
    def config(self) -> Mapping[str, Any]:
        return self.base.config

    @property
    def model(self) -> Model:
        return self.exports["model"]

    @property
    def data(self) -> Data:
        return self.exports["data"]

    def extend(self, family: FamilyPlan) -> Context:
        """This context with ``family``'s stages, edits, targets, calibration and exports added."""
        stages, edits, exports = dict(self.stages), dict(self.edits), dict(self.exports)
        for s in family.stages:
            if s.name in stages:
                raise ValueError(f"stage {s.name} is planned twice")
            stages[s.name] = s
        for e in family.edits:
            if e.id in edits:
                raise ConfigError(f"edit id {e.id!r} is planned twice")
            edits[e.id] = e
        for e in family.replaced:
            if e.id not in edits:
                raise ValueError(f"edit {e.id} replaced before it is planned")
            edits[e.id] = e
        if set(family.exports) & set(exports):
            raise ValueError(f"exported twice: {sorted(set(family.exports) & set(exports))}")
        exports.update(family.exports)
        targets = {"end": (*self.targets, *family.targets), "start": (*family.targets, *self.targets),
                   "only": family.targets}[family.targets_at]
        return replace(self, stages=_frozen(stages), edits=_frozen(edits), targets=targets,
                       calibration=(*self.calibration, *family.calibration), exports=_frozen(exports))

    def plan(self) -> Plan:
        return Plan(self.config, self.base.root, self.base.results, self.model, dict(self.stages), dict(self.edits),
                    tuple(dict.fromkeys(self.targets)))
