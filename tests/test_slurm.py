"""The tiny DAG through a real single-node SLURM cluster (scripts/slurm) with the repo's profile,
checked against the same plan built by hand (tests/tiny_store.py: every job's command, in this
process; tests/test_workflow.py checks that this is what a local `snakemake` writes).

Needs root on Debian (the scripts install Debian 12's SLURM packages and start the daemons without
systemd); skipped elsewhere, or with MEMCTL_TEST_SLURM=0. The cluster is started once per module
(installing the packages the first time) and stopped afterwards when this module started it and no
other test session is using it.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_store
import yaml

from memctl.store import hash_path

REPO = Path(__file__).resolve().parents[1]
TINY = Path(__file__).with_name("tiny_config.yaml")
SCRIPTS = REPO / "scripts" / "slurm"
STATE = Path(os.environ.get("MEMCTL_SLURM_STATE", "/var/lib/memctl-slurm"))
#: Wall-clock limit of one Snakemake run; `timeout -k` because a stuck plugin ignores SIGTERM.
RUN_LIMIT_S = 1500
#: The test's run checks job states as early as the plugin allows: 1 s after a submission or a
#: finished job instead of the profile's 5 s (Snakemake's own interval counts only until the plugin's
#: first check). On the test's command line only: the profile is the user's.
FAST_STATUS_CHECKS = ("--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1")
#: Seconds between the test run's job-state checks. The plugin waits 10 s longer after each check
#: that finds nothing finished (1, 12, 33, 64 s after a submission, up to 180 s apart), and no
#: option changes that: a 15-second job was seen finished after 33 s, and the tiny DAG's eleven
#: levels took 466 s of which most was waiting (2026-12-07, idle VM). The test's Snakemake runs
#: with the plugin's interval held at this value instead (STEADY_POLL_LAUNCHER); everything else,
#: the profile included, is as a user runs it.
STEADY_POLL_S = 2
STEADY_POLL_LAUNCHER = (
    "import snakemake_executor_plugin_slurm as slurm\n"
    "assert isinstance(slurm.Executor.next_seconds_between_status_checks, property)\n"
    f"slurm.Executor.next_seconds_between_status_checks = property(lambda self: {STEADY_POLL_S}, lambda self, value: None)\n"
    "from snakemake.cli import main\n"
    "main()\n"
)


def one_job_per_rule(cfg: dict) -> dict:
    """The tiny config cut down so that every rule still runs, once (evaluate once per edit
    family), with `resources.gpu` on: the model-running rules ask SLURM for a GPU."""
    cfg["resources"]["gpu"] = True
    cfg["resources"]["allow_cpu_fallback"] = True  # the test cluster's GPU is a fake gres: CPU is fine
    if cfg.get("curvature", {}).get("edits"):
        cfg["curvature"]["edits"] = cfg["curvature"]["edits"][:1]
    if cfg.get("masks"):
        cfg["masks"]["modes"] = cfg["masks"].get("modes", ["none"])[:1]
        cfg["masks"]["sweep"] = {"sparsities": [], "sparsity_modes": [], "thresholds": [], "baselines": False}
    if cfg.get("pruning"):
        cfg["pruning"]["methods"] = cfg["pruning"].get("methods", ["magnitude"])[:1]
    if cfg.get("csp"):
        cfg["csp"]["modes"] = cfg["csp"].get("modes", ["down"])[:1]
    return cfg


def _skip_reason() -> str | None:
    if os.environ.get("MEMCTL_TEST_SLURM") == "0":
        return "MEMCTL_TEST_SLURM=0"
    if not Path("/etc/debian_version").exists() or shutil.which("apt-get") is None:
        return "the local SLURM cluster (scripts/slurm) needs Debian with apt-get"
    if os.geteuid() != 0:
        return "the local SLURM cluster (scripts/slurm) installs packages and starts daemons as root"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


def _env() -> dict:
    # Jobs inherit this environment (sbatch --export=ALL): the `memctl` console script next to this
    # Python, offline HF hubs (set in conftest).
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _alive(pidfile: Path) -> bool:
    try:
        return Path(f"/proc/{int(pidfile.read_text())}").exists()
    except (OSError, ValueError):
        return False


def _script(name: str, *args: str, timeout: int = 600) -> float:
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPTS / name), *args], check=False, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted(STATE.glob("log/*.log")))
        pytest.fail(f"{name} {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}\n{logs}")
    return time.monotonic() - start


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running cluster with accounting. Yields the seconds that install and start took."""
    import snakemake_executor_plugin_slurm  # noqa: F401  (pip install -e ".[test]" brings it)

    # The cluster's own config, not the quick-failing copy conftest gives the other tests' runs.
    from conftest import SLURM_DOWN_CONF_VAR

    patch = pytest.MonkeyPatch()
    if os.environ.get(SLURM_DOWN_CONF_VAR) and os.environ.get("SLURM_CONF") == os.environ[SLURM_DOWN_CONF_VAR]:
        patch.delenv("SLURM_CONF")
    # A shared lock for as long as this session uses the cluster: the last user stops it.
    STATE.mkdir(parents=True, exist_ok=True)
    users = open(STATE / "users.lock", "w")  # noqa: SIM115
    fcntl.flock(users, fcntl.LOCK_SH)
    was_up = _alive(STATE / "run" / "slurmctld.pid")
    install_s = _script("install.sh")
    start_s = _script("start.sh")
    yield {"install_s": install_s, "start_s": start_s, "was_up": was_up, "users": users}
    try:
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        sole_user = True
    except BlockingIOError:
        sole_user = False  # another session still uses it
    try:
        if sole_user and not was_up:
            _script("stop.sh", timeout=120)
    finally:
        users.close()
        patch.undo()


def _config() -> dict:
    return one_job_per_rule(yaml.safe_load(TINY.read_text()))


def _workdir(path: Path) -> Path:
    (path / "config").mkdir(parents=True)
    (path / "config" / "config.yaml").write_text(yaml.safe_dump(_config()))
    return path


def _start(workdir: Path, *args: str) -> subprocess.Popen:
    cmd = ["timeout", "-k", "20", str(RUN_LIMIT_S), sys.executable, "-c", STEADY_POLL_LAUNCHER,
           "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]
    log = open(workdir / "snakemake.out", "w")  # noqa: SIM115
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=_env())


def _finish(proc: subprocess.Popen, workdir: Path, what: str) -> str:
    proc.wait()
    out = (workdir / "snakemake.out").read_text()
    if proc.returncode != 0:
        _cancel_jobs_of(workdir)
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in workdir.glob("results/logs/**/*.log"))
        pytest.fail(f"{what} failed (exit {proc.returncode}{', timed out' if proc.returncode in (124, 137) else ''}):\n"
                    f"{out[-6000:]}\n--- rule logs ---\n{logs[-6000:]}")
    return out


def _abort(proc: subprocess.Popen, workdir: Path) -> None:
    """Stop a run that is no longer wanted (the test failed beside it), and its queued jobs."""
    if proc.poll() is None:
        # `timeout` passes SIGINT on; Snakemake then cancels its jobs (SIGTERM would wait for them).
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # `timeout` leads a process group of its own
            proc.wait()
    _cancel_jobs_of(workdir)  # whatever it left in the queue


def _cancel_jobs_of(workdir: Path) -> None:
    """Jobs a failed or killed run left in the queue (only this run's: same working directory)."""
    listing = subprocess.run(["squeue", "-h", "-o", "%i %Z"], check=False, capture_output=True, text=True).stdout
    ids = [line.split()[0] for line in listing.splitlines() if line.split()[1:] == [str(workdir)]]
    if ids:
        subprocess.run(["scancel", *ids], check=False)


def _jobs_of_run(out: str) -> tuple[dict[str, dict], dict[str, str]]:
    """From Snakemake's output: snakemake job id -> {rule, gpu, local}, snakemake job id -> SLURM id."""
    jobs: dict[str, dict] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"^(local)?rule (\w+):$", line.strip())
        if m:
            current = {"rule": m.group(2), "local": bool(m.group(1)), "gpu": 0}
            continue
        if current is None:
            continue
        m = re.match(r"^jobid: (\d+)$", line.strip())
        if m:
            jobs[m.group(1)] = current
        m = re.search(r"resources: .*\bgpu=(\d+)", line)
        if m:
            current["gpu"] = int(m.group(1))
    submitted = dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", out))
    return jobs, submitted


def _sacct(ids: list[str], want: int, timeout: float = 30) -> dict[str, dict]:
    """sacct rows of these jobs once all of them are listed as finished (slurmdbd lags a little)."""
    fields = ["JobID", "JobName", "State", "ReqTRES", "AllocTRES", "Comment", "WorkDir"]
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", ",".join(fields)],
            capture_output=True, text=True, check=True,
        ).stdout
        rows = {r["JobID"]: r for r in (dict(zip(fields, line.split("|"))) for line in out.splitlines() if line)}
        done = [r for r in rows.values() if r["State"] not in ("PENDING", "RUNNING", "COMPLETING")]
        if len(done) >= want or time.monotonic() > deadline:
            return rows
        time.sleep(1)


def _rules(workdir: Path) -> list[str]:
    """The rules the workflow declares for this working directory's config."""
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                           "--list-rules"], capture_output=True, text=True, env=_env(), check=True).stdout.split()


def check_slurm_run(via_slurm: Path, out: str, rules: list[str], by_hand: Path, reference: list) -> int:
    """The SLURM run's jobs, their accounting and GPU requests, and its outputs against the by-hand
    build of the same config (``reference``: its plan's jobs, each run once by hand; ``rules``:
    what the workflow declares). Returns the number of SLURM jobs."""
    # Every job of the DAG but the local `all` ran as a SLURM job, and sacct lists it as completed.
    jobs, submitted = _jobs_of_run(out)
    remote = {jid: job for jid, job in jobs.items() if not job["local"]}
    assert len(remote) >= 8 and set(submitted) == set(remote), (sorted(remote), sorted(submitted))
    # ... the same jobs as the plan's (what `rule all` needs, run by hand; a rule per stage), and
    # every rule of the workflow but `all` among them.
    assert {job["rule"] for job in jobs.values() if job["local"]} == {"all"}
    planned = sorted(job.stage for job in reference)
    assert sorted(job["rule"] for job in remote.values()) == planned
    # downstream (lm-eval tasks) is declared but idle without downstream.tasks (tests/test_downstream.py)
    optional = {"all", "downstream", "downstream_report"}
    assert set(rules) - optional <= set(planned), "one_job_per_rule() left a rule out"
    rows = _sacct(list(submitted.values()), want=len(submitted))
    for jid, slurm_id in submitted.items():
        rule = remote[jid]["rule"]
        row = rows.get(slurm_id)
        assert row is not None, f"sacct does not list job {slurm_id} ({rule})"
        assert row["State"] == "COMPLETED", (rule, row)
        assert row["Comment"].startswith(f"rule_{rule}"), (rule, row)
        assert Path(row["WorkDir"]) == via_slurm
        # GPU rules asked for (and got) the fake GPU; the others did not.
        wants_gpu = remote[jid]["gpu"] > 0
        assert ("gres/gpu=1" in row["ReqTRES"]) == wants_gpu, (rule, row["ReqTRES"])
        assert ("gres/gpu=1" in row["AllocTRES"]) == wants_gpu, (rule, row["AllocTRES"])
    gpu_rules = {job["rule"] for job in remote.values() if job["gpu"]}
    assert {"demo_pretrain", "extract", "evaluate"} <= gpu_rules
    assert {"demo_corpus", "report"}.isdisjoint(gpu_rules)

    # The same tables and model as the by-hand build (the tiny DAG is deterministic;
    # train_log.parquet records tokens/s, wall-clock).
    tables = sorted(p.relative_to(by_hand) for p in by_hand.glob("results/**/*.parquet") if p.name != "train_log.parquet")
    assert len(tables) >= 12
    assert tables == sorted(
        p.relative_to(via_slurm) for p in via_slurm.glob("results/**/*.parquet") if p.name != "train_log.parquet"
    )
    for rel in tables:
        if rel.parts[:3] == ("results", "tables", "masks"):
            # the masks tables carry each edit's measured wall time (the cost column): the rest must match
            import pandas as pd

            a, b = pd.read_parquet(via_slurm / rel), pd.read_parquet(by_hand / rel)
            timed = [c for c in a.columns if c.startswith("wall_time")]
            pd.testing.assert_frame_equal(a.drop(columns=timed), b.drop(columns=timed), obj=str(rel))
            continue
        assert hash_path(via_slurm / rel) == hash_path(by_hand / rel), rel
    (model,) = (p.relative_to(by_hand) for p in by_hand.glob("results/demo/model-*") if p.is_dir())
    assert hash_path(by_hand / model / "model.safetensors") == hash_path(via_slurm / model / "model.safetensors")
    assert (via_slurm / "results" / "tables" / "results.md").read_text() == (
        by_hand / "results" / "tables" / "results.md").read_text()

    return len(submitted)


def test_tiny_dag_through_slurm_equals_a_by_hand_build(slurm_cluster, tmp_path, capsys):
    via_slurm = _workdir(tmp_path / "slurm")
    by_hand = tmp_path / "by_hand"
    # Both at once: the SLURM run mostly waits on the scheduler and status checks, while the
    # reference, the same config's plan, is built by hand in this process.
    t0 = time.monotonic()
    slurm_proc = _start(via_slurm, "--profile", str(REPO / "profiles" / "slurm"), *FAST_STATUS_CHECKS)
    try:
        seconds = tiny_store.build(by_hand, _config())
        by_hand_s = time.monotonic() - t0
        reference = tiny_store.needed(tiny_store.plan_of(by_hand))
        assert len(seconds) == len(reference)
        rules = _rules(via_slurm)  # (--list-rules runs no onstart: it leaves the run alone)
    except BaseException:
        _abort(slurm_proc, via_slurm)
        raise
    out = _finish(slurm_proc, via_slurm, "SLURM run")
    slurm_s = time.monotonic() - t0
    n_jobs = check_slurm_run(via_slurm, out, rules, by_hand, reference)

    with capsys.disabled():
        print(f"\n[slurm] install {slurm_cluster['install_s']:.1f} s, start {slurm_cluster['start_s']:.1f} s"
              f"{' (was up)' if slurm_cluster['was_up'] else ''}; tiny DAG ({n_jobs} SLURM jobs): "
              f"via SLURM {slurm_s:.0f} s, by hand {by_hand_s:.0f} s (run side by side)")


NOACCT_SNAKEFILE = """
rule all:
    input: "cpu.txt", "gpu.txt"

rule cpu:
    output: "cpu.txt"
    shell: "echo cpu $SLURM_JOB_ID > {output}"

rule gpu:
    output: "gpu.txt"
    resources: gpu=1
    shell: "echo gpu $SLURM_JOB_ID $CUDA_VISIBLE_DEVICES > {output}"
"""


def test_profile_for_a_cluster_without_accounting(slurm_cluster, tmp_path):
    """sacct fails on such a cluster; profiles/slurm-noacct (squeue, no account) still finishes."""
    users = slurm_cluster["users"]
    try:  # switching the cluster's mode restarts it: only when no other session is using it
        fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fcntl.flock(users, fcntl.LOCK_SH)  # a failed conversion may have dropped the shared lock
        pytest.skip("another test session is using the local cluster")
    try:
        _script("start.sh", "--no-accounting")
        sacct = subprocess.run(["sacct", "-n"], check=False, capture_output=True, text=True)
        assert sacct.returncode != 0 or "disabled" in sacct.stdout + sacct.stderr
        (tmp_path / "Snakefile").write_text(NOACCT_SNAKEFILE)
        cmd = ["timeout", "-k", "20", "300", sys.executable, "-m", "snakemake", "--profile",
               str(REPO / "profiles" / "slurm-noacct"), "-d", str(tmp_path), "-s", str(tmp_path / "Snakefile")]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=_env(), cwd=tmp_path)
        if proc.returncode != 0:
            _cancel_jobs_of(tmp_path)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        cpu, gpu = (tmp_path / "cpu.txt").read_text().split(), (tmp_path / "gpu.txt").read_text().split()
        assert cpu[0] == "cpu" and cpu[1].isdigit()  # ran inside a SLURM job
        assert gpu[0] == "gpu" and gpu[1].isdigit() and gpu[2:] == ["0"]  # got the (fake) GPU 0
    finally:
        _script("start.sh")  # accounting back on
        fcntl.flock(users, fcntl.LOCK_SH)
