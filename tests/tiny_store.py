"""The suite's one tiny store: the tiny config's whole plan, every job run by hand.

:func:`build` writes a working directory (``config/config.yaml``: ``tests/tiny_config.yaml`` with a
tiny vision track and a local lm-eval task, so that every stage of the registry has a job), plans
it with the package's planner (what ``workflow/rules/common.smk`` does) and runs each job's
command, the command line its rule runs (:meth:`memctl.plan.Job.command`), in dependency order.
The commands run in this Python process through the ``memctl`` dispatcher (:func:`memctl.cli.main`),
each with its log file as stdout/stderr: the same arguments, the same code, without paying the
import of torch and transformers once per job. ``tests/test_contracts.py`` holds it to what a user's
``snakemake`` writes: Snakemake finds it complete and its rules print exactly these command lines;
``tests/test_slurm.py`` compares a SLURM run's tables with a by-hand build byte for byte.

``conftest.py`` builds it once per session (fixture ``tiny_store``); tests that only read it use it
in place, tests that change it take a copy (fixture ``tiny_store_copy``, :func:`copy`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = Path(__file__).with_name("tiny_config.yaml")

#: The vision track at test size (a 2-block ViT on 160 synthetic images, two strengths per method).
TINY_VISION: dict[str, Any] = {
    "enabled": True,
    "data": {"max_train": 160, "max_held_out": 40},
    "model": {"patch_size": 4, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 32},
    "train": {"epochs": 4, "batch_size": 32, "eval_every": 2},
    "kfac": {"max_images": 64, "batch_size": 32},
    "edits": {"strengths": {"kfac": [0.8, 0.95], "svd": [0.2, 0.5]}},
    "spectrum": {"max_images": 32},
}

#: A 9-question multiple-choice task in lm-eval's YAML format (``downstream.include_path``).
CLOZE_WORDS = ["the", "of", "and", "to", "in", "is", "that", "for"]


def write_cloze_task(tasks: Path) -> Path:
    """A local lm-eval task ``cloze`` (JSONL + task YAML) in ``tasks``; returns the directory."""
    tasks.mkdir(parents=True, exist_ok=True)
    w = CLOZE_WORDS
    docs = [{"question": " ".join(w[i % 8:] + w[:i % 8]), "choices": w[:3], "label": i % 3} for i in range(9)]
    (tasks / "cloze.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (tasks / "cloze.yaml").write_text(
        f"task: cloze\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'cloze.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n")
    return tasks


def tiny_config(work: Path) -> dict[str, Any]:
    """The shared store's config: the tiny config, plus the vision track and a local downstream
    task (the main masks table's edits) and K-FAC collected in two shards, so that every stage of the
    registry runs."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["curvature"]["data"]["shards"] = 2  # collect_kfac in two shards, and merge_kfac
    cfg["vision"] = json.loads(json.dumps(TINY_VISION))
    cfg["downstream"] = {"tasks": ["cloze"], "include_path": str(write_cloze_task(work / "tasks")),
                         "batch_size": 4, "edits": "main"}
    return cfg


def make_workdir(work: Path, cfg: Mapping[str, Any] | None = None) -> Path:
    """``work/config/config.yaml`` with ``cfg`` (default: :func:`tiny_config`)."""
    (work / "config").mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(work) if cfg is None else cfg
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(dict(cfg)))
    return work


@contextlib.contextmanager
def inside(work: Path):
    old = Path.cwd()
    os.chdir(work)
    try:
        yield
    finally:
        os.chdir(old)


def plan_of(work: Path):
    """The plan Snakemake makes in ``work`` (its ``config/config.yaml``), as ``common.smk`` does."""
    from memctl import lab
    from memctl.config import workflow_config
    from memctl.plan import build_plan

    with inside(work):
        cfg = workflow_config({}, [], {}, Path.cwd(), REPO)
        return build_plan(cfg, lab.workflow_model_dims(cfg))


def _paths(value: Any) -> list[str]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def ordered(jobs: Iterable[Any]) -> list[Any]:
    """Jobs in an order where each comes after the jobs that write its inputs."""
    jobs = list(jobs)
    producer = {out: i for i, job in enumerate(jobs) for out in job.outputs.values()}
    needs = {i: {producer[p] for v in job.inputs.values() for p in _paths(v) if p in producer} - {i}
             for i, job in enumerate(jobs)}
    done: list[int] = []
    while len(done) < len(jobs):
        ready = [i for i in range(len(jobs)) if i not in done and needs[i] <= set(done)]
        if not ready:
            raise RuntimeError(f"a cycle among {[jobs[i].stage for i in set(range(len(jobs))) - set(done)]}")
        done += ready
    return [jobs[i] for i in done]


def needed(plan) -> list[Any]:
    """The jobs ``rule all`` needs (what ``snakemake`` runs), in dependency order."""
    wanted = set(plan.artifacts())
    return ordered(job for job in plan.jobs() if wanted & set(job.outputs.values()))


def memctl_in_process(*args: Any, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``memctl ARGS`` through the dispatcher (:func:`memctl.cli.main`) in this process, in ``cwd``:
    its exit code, stdout and stderr as a subprocess would give them (an exception the dispatcher
    lets through: its traceback on stderr, exit 1). Torch's threads, the umask and the root
    logger's handlers (pytest's, set aside so that the command logs to its stderr as in a process
    of its own) are put back afterwards."""
    import torch

    from memctl import cli

    argv = [str(a) for a in args]
    umask, torch_threads = os.umask(0o022), torch.get_num_threads()
    os.umask(umask)
    root = logging.getLogger()
    handlers, root.handlers = root.handlers, []
    out, err = io.StringIO(), io.StringIO()
    try:
        with inside(cwd or Path.cwd()), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main(argv)
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)
            except Exception:  # noqa: BLE001  (what a process would print before dying)
                traceback.print_exc()
                code = 1
    finally:
        os.umask(umask)
        torch.set_num_threads(torch_threads)
        root.handlers = handlers
    return subprocess.CompletedProcess(["memctl", *argv], code, out.getvalue(), err.getvalue())


def run_by_hand(work: Path, job, threads: int = 1) -> float:
    """Run ``job``'s command line (as its rule runs it) in this process, in ``work``, its output
    written to its log; returns the seconds it took. A failing command raises with its log."""
    line = job.command(threads=threads)
    start = time.perf_counter()
    done = memctl_in_process(*shlex.split(line)[1:], cwd=work)  # without "memctl"
    seconds = time.perf_counter() - start
    log = work / job.log
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"{line} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    return seconds


def build(work: Path, cfg: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Write ``work``'s config and run every job ``rule all`` needs by hand; returns seconds per
    job (``stage/key``)."""
    make_workdir(work, cfg)
    return {f"{job.stage}/{job.key}": run_by_hand(work, job) for job in needed(plan_of(work))}


def copy(store: Path, dest: Path) -> Path:
    """A private copy of a store's working directory (symlinks kept, times preserved so that
    Snakemake sees the same up-to-date outputs)."""
    shutil.copytree(store, dest, symlinks=True)
    return dest
