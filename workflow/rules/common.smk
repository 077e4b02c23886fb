# Read by every file in workflow/rules/: the validated config and the plan (memctl.plan). They declare
# rules only; which jobs exist, their paths, hashes, labels and command arguments are planned by
# tested package code. No side effects at parse time.
from pathlib import Path

from memctl import lab, stages
from memctl.config import ConfigError, workflow_config
from memctl.plan import build_plan

try:
    _resolved = workflow_config(
        config,
        list(workflow.overwrite_configfiles or []),
        workflow.config_settings.overwrite_config or {},
        Path.cwd(),
        Path(workflow.basedir),
    )
    DIMS = lab.workflow_model_dims(_resolved)
    PLAN = build_plan(_resolved, DIMS)
except ConfigError as err:
    raise WorkflowError(str(err))
config.clear()
config.update(_resolved)

ENV = "../../envs/memctl.yaml"
GPU = bool(config["resources"]["gpu"])


def outputs(stage):
    """The stage's outputs: directories marked, report items captioned (workflow/report/).

    Files are marked ``update``: Snakemake neither deletes them before the job (memctl replaces
    each one atomically when its new version is complete) nor after a failure (it puts back the
    copy it took before the job), so a stage that fails, a forced report on a corrupt input among
    them, leaves its previous outputs in place. Directories (models, tokenizers, K-FAC factors,
    eigenbases) are not: Snakemake would copy them whole before every rerun of their job."""
    plan = PLAN.stage(stage)
    marked = {}
    for name, path in plan.outputs.items():
        path = directory(path) if name in plan.directories else update(path)
        if name in plan.shown:
            category, caption = plan.shown[name]
            path = report(path, caption=f"../report/{caption}", category=category)
        marked[name] = path
    return marked


def inputs(stage):
    return lambda wildcards: dict(PLAN.job(stage, wildcards).inputs)


def args(stage):
    """``memctl <command>`` arguments of the job, shell-quoted."""
    return lambda wildcards: PLAN.job(stage, wildcards).arg_string


def code(stage):
    """Hash of the code the stage runs: editing it reruns the stage and its dependants."""
    return stages.code_hash(stage)


def threads(stage):
    return stages.job_threads(stage, config["resources"])


def resources(stage):
    """Memory and wall time from the model's size (memctl.lab), growing with each retry."""
    spec = stages.get(stage)

    def mem_mb(wildcards, attempt):
        if DIMS is None:
            return spec.mem_mb * attempt
        return lab.estimate_mem_mb(DIMS, stage, config, gpu=GPU, attempt=attempt)

    def runtime(wildcards, attempt):
        if DIMS is None:
            return spec.runtime_min * attempt
        return lab.estimate_runtime_min(
            DIMS, stage, config, gpu=GPU, attempt=attempt, floor_min=spec.runtime_min
        )

    extra = {"gpu": int(GPU)} if spec.gpu else {}
    # batch sizes: how fast, not what (memctl.plan.Job.runtime); resources do not trigger reruns
    jobs = PLAN.stage(stage).jobs
    for name in next(iter(jobs.values())).runtime if jobs else ():
        extra[name] = lambda wildcards, name=name: PLAN.job(stage, wildcards).runtime[name]
    return {"mem_mb": mem_mb, "runtime": runtime, **extra}


def constraints(stage):
    """The stage's wildcard matches its own job keys only (edit rules share one output pattern)."""
    plan = PLAN.stage(stage)
    return {plan.wildcard: plan.constraint} if plan.wildcard else {}


def vision_resources(stage):
    """The registry's request, growing with each retry (memctl.lab sizes language models only)."""
    spec = stages.get(stage)
    extra = {"gpu": int(GPU)} if spec.gpu else {}
    return {
        "mem_mb": lambda wildcards, attempt: spec.mem_mb * attempt,
        "runtime": lambda wildcards, attempt: spec.runtime_min * attempt,
        **extra,
    }
