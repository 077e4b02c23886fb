"""The workflow's plan: every stage's jobs, artifact paths, hashes and labels, from the config.

:func:`build_plan` is a pure function of the validated config (:func:`memctl.config.load_config`)
and the model's dimensions (:func:`memctl.lab.workflow_model_dims`; None when unknown at parse
time). Snakemake's rule files only read the plan: each rule declares the stage's inputs, outputs,
log and benchmark from :meth:`Plan.job` and runs ``memctl <command> <Job.args>``; nothing about
which jobs exist, where they write or how they are keyed lives in the rule files.

Keys. Every artifact directory carries a short hash of the settings and upstream hashes that made
it (:func:`memctl.config.settings_hash`), so two settings never overwrite each other and a lab can
share one root::

    {root}/demo/corpus-<h>/ tokenizer-<h>/ model-<h>/           demo_corpus, demo_tokenizer, demo_pretrain
    {root}/<model tag>/candidates-<h>/candidates.parquet        candidates
    {root}/<model tag>/extract-<h>/<table>.parquet              extract
    {root}/<model tag>/heldout-<h>/, calibration-<h>/, reference-<h>/
    {root}/<model tag>/kfac-<h>/factors, eigen-<h>/eigen, spectrum-<h>/
    {root}/<model tag>/edits/<edit id>/delta.safetensors        apply_edit, train_mask, prune_baseline, balanced_subnet
    {root}/<model tag>/eval-<h>/<edit id>/metrics.parquet       evaluate
    {results_dir}/...                                           report, curvature_report, masks_report

An edit id is the edit family and the hash of exactly the settings and upstream artifacts its job
uses, so changing one edit reruns that edit and its evaluation only.

Families. :func:`build_plan` composes one pure planner per stage family (:mod:`memctl.planning`),
in the order of :data:`FAMILIES`: each reads an immutable :class:`memctl.planning.context.Context`
(the config, the model and the data family's paths, the stages and edits planned so far) and
returns a :class:`memctl.planning.context.FamilyPlan`; nothing is shared or mutated between them.
The records and helpers are re-exported here: ``memctl.plan`` stays the module to import.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from memctl import stages as registry
from memctl.config import ConfigError
from memctl.planning import curvature, data, evaluation, masks, report, vision
from memctl.planning.context import Base, Context, FamilyPlan
from memctl.planning.core import (CORPUS_TABLES, EIGEN_METHOD, EXTRACT_TABLES, RUNTIME_KEYS, SAFE_NAME, SAFE_TAG,
                                  WITHOUT_MEMORIES, Edit, Job, Model, Plan, StagePlan, as_json)
from memctl.planning.report import REPORT_EDIT_FIELDS, results_summary

__all__ = ["CORPUS_TABLES", "EIGEN_METHOD", "EXTRACT_TABLES", "FAMILIES", "REPORT_EDIT_FIELDS", "RUNTIME_KEYS",
           "SAFE_NAME", "SAFE_TAG", "WITHOUT_MEMORIES", "Edit", "Job", "Model", "Plan", "StagePlan", "as_json",
           "build_plan", "results_summary"]

#: The family planners in plan order: each reads what those before it planned. Calibration runs
#: after curvature and masks (the texts they asked for); the report after the evaluation of every
#: edit; vision last (with ``vision.only`` it replaces the targets).
FAMILIES: tuple[tuple[str, Callable[[Context], FamilyPlan]], ...] = (
    ("data", data.plan_data),
    ("curvature", curvature.plan_curvature),
    ("masks", masks.plan_masks),
    ("calibration", data.plan_calibration),
    ("evaluation", evaluation.plan_evaluation),
    ("report", report.plan_report),
    ("downstream", evaluation.plan_downstream),
    ("vision", vision.plan_vision),
)


def build_plan(config: Mapping[str, Any], dims: Any = None, *, python_version: str | None = None) -> Plan:
    """The plan of a validated config (:func:`memctl.config.load_config`).

    ``dims`` (a :class:`memctl.lab.ModelDims`) gives the layer count that sweeps over every layer
    need; ``python_version`` keys the demo corpus (read from the running Python's standard library).
    Raises :class:`memctl.config.ConfigError` naming the key when the config asks for something the
    model cannot do.
    """
    problems = registry.stage_threads_problems(config["resources"])
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    ctx = Context(Base.of(config, dims, python_version or "{}.{}".format(*sys.version_info[:2])))
    for _, planner in FAMILIES:
        ctx = ctx.extend(planner(ctx))
    return ctx.plan()
