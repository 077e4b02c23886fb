"""Contract of every stage in the registry, on the shared tiny store (``tests/tiny_store.py``).

Each stage's jobs were run by hand with the command line their rule runs; here, per stage: every
output the plan names exists, each artifact output carries a sidecar that verifies, whose stage is
the job's and whose inputs are the job's inputs with the hashes of the files on disk. A stage
added to :data:`memctl.stages.STAGES` is covered by this file as soon as the tiny store plans a
job for it (``test_the_tiny_store_runs_every_stage_of_the_registry`` fails until it does).

Then the workflow: Snakemake, on that store, finds nothing to do (every rule's inputs and
outputs are the plan's), and the command each rule prints is :meth:`memctl.plan.Job.command`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from memctl import stages
from memctl.store import hash_path, sidecar_path, verify

REPO = Path(__file__).resolve().parents[1]


def flat(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def test_the_tiny_store_runs_every_stage_of_the_registry(tiny_plan):
    planned = {job.stage for job in tiny_plan.jobs()}
    assert set(stages.STAGES) - planned == set(), "give the tiny store (tests/tiny_store.py) a job of these stages"


@pytest.mark.parametrize("stage", list(stages.STAGES))
def test_stage_contract(stage, tiny_store, tiny_plan):
    """The stage's command, run by hand with its rule's arguments, wrote what the plan names."""
    jobs = list(tiny_plan.stage(stage).jobs.values())
    assert jobs, f"the tiny store plans no {stage} job"
    registry = stages.get(stage)
    for job in jobs:
        assert (tiny_store / job.log).is_file(), job.log
        with_sidecar = 0
        for name, out in job.outputs.items():
            path = tiny_store / out
            assert path.exists(), f"{stage} {job.key}: output {name} ({out}) missing"
            if out.endswith(".meta.json"):
                continue
            side = sidecar_path(path)
            if not side.exists():
                continue  # a plain output (a report page); the tables beside it carry the provenance
            with_sidecar += 1
            assert verify(path) == [], out
            record = json.loads(side.read_text())
            assert record["stage"] in (stage, registry.command), (out, record["stage"])
            planned = {str(p) for v in job.inputs.values() for p in flat(v)}
            for key, entry in record.get("inputs", {}).items():
                for item in flat(entry):
                    recorded = item["path"]
                    # a planned input, a file inside one, or the directory of planned files (a corpus)
                    assert recorded in planned or any(
                        recorded.startswith(p + "/") or p.startswith(recorded + "/") for p in planned
                    ), f"{stage} {job.key}: {out} records input {key}={recorded}, not among the plan's inputs"
                    assert item["sha256"] == hash_path(tiny_store / recorded), (stage, out, recorded)
        assert with_sidecar, f"{stage} {job.key}: no output with a provenance sidecar"


def snakemake(work: Path, *args: str, timeout: int = 600) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work),
                           "--cores", "1", *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def test_snakemake_finds_the_hand_built_store_complete_and_its_rules_run_the_planned_commands(tiny_store, tiny_plan):
    """Snakemake's rules ask for exactly the plan's files (nothing to do on the store the commands
    wrote by hand), and a forced dry run prints, for every job, the command the store was built
    with (threads aside: Snakemake gives each job its own)."""
    assert "Nothing to be done" in snakemake(tiny_store, "-n")
    printed = snakemake(tiny_store, "-n", "-p", "--forceall")
    commands = {re.sub(r"--threads \d+ ", "", line.partition("Shell command: ")[2].split(" > ")[0])
                for line in printed.splitlines() if "Shell command: memctl " in line}
    wanted = {re.sub(r"--threads \d+ ", "", job.command(threads=1)) for job in tiny_plan.jobs()
              if set(job.outputs.values()) & set(tiny_plan.artifacts())}
    assert wanted and wanted == commands, (sorted(wanted - commands)[:3], sorted(commands - wanted)[:3])
