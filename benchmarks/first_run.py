"""The first run, measured: the default DAG from scratch in a temporary working directory, then
the no-op rerun.

    python benchmarks/first_run.py                          # config/config.yaml (the quick tour)
    python benchmarks/first_run.py --configfile config/paper.yaml --cores 2

Prints the wall time of the whole run, the jobs and summed job wall time per stage (from the
artifacts' provenance sidecars, which every stage writes, cached rules included), and the no-op
rerun's wall time and job count. Nothing is asserted: the README quotes what this prints, with the
date and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def snakemake(work: Path, cores: int, configfile: str | None, *extra: str) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work), "--cores", str(cores)]
    if configfile:
        cmd += ["--configfile", str(Path(configfile).resolve())]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    start = time.perf_counter()
    proc = subprocess.run([*cmd, *extra], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"snakemake failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return wall, proc.stdout + proc.stderr


def per_stage(root: Path) -> dict[str, tuple[int, float]]:
    """(jobs, summed wall seconds) per stage, one record per job (its outputs share one record)."""
    jobs: dict[str, dict[str, float]] = defaultdict(dict)
    for side in root.rglob("*.meta.json"):
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError):
            continue
        stage = meta.get("stage")
        if stage and "wall_time_s" in meta:
            jobs[stage][f"{meta.get('started')}|{side.parent}"] = float(meta["wall_time_s"])
    return {stage: (len(runs), sum(runs.values())) for stage, runs in jobs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", default=None, help="default: config/config.yaml of the repo")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", default=None, help="run in this directory (kept) instead of a temporary one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="memctl-first-run-") as tmp:
        work = Path(args.keep or tmp)
        (work / "config").mkdir(parents=True, exist_ok=True)
        if not args.configfile:
            (work / "config" / "config.yaml").write_text((REPO / "config" / "config.yaml").read_text())
        wall, out = snakemake(work, args.cores, args.configfile)
        done = re.findall(r"(\d+) of (\d+) steps \(100%\) done", out)
        rerun_wall, rerun_out = snakemake(work, args.cores, args.configfile)
        nothing = "Nothing to be done" in rerun_out
        print(f"# first run: {time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} CPUs, "
              f"{platform.processor() or platform.machine()}, --cores {args.cores}, "
              f"config {args.configfile or 'config/config.yaml'}")
        print(f"total wall: {wall:.1f} s ({wall / 60:.1f} min), jobs: {done[-1][1] if done else '?'}")
        print(f"{'stage':<18}{'jobs':>6}{'sum of job wall s':>20}")
        for stage, (n, seconds) in sorted(per_stage(work / "results").items(), key=lambda kv: -kv[1][1]):
            print(f"{stage:<18}{n:>6}{seconds:>20.1f}")
        print(f"no-op rerun: {rerun_wall:.1f} s, {'0 jobs (Nothing to be done)' if nothing else 'JOBS SCHEDULED'}")


if __name__ == "__main__":
    main()
