"""SLURM test clusters started by the project's own script (slurm/cluster.sh), for the tests.

Every cluster has its own folder under /tmp and its own free ports, so tests never disturb each
other, the benchmarks' cluster, or a cluster someone runs on the default ports.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from launchers import state
from tests.conftest import ROOT, require, status_of, table_rows, trial_dirs, wait_until

FINAL = ("done", "failed", "stopped")
STATUS_FIELDS = ("state", "reason", "step", "n_iters", "attempt", "preemptions", "resumed_from", "job_id", "updated")
LOG_LINES = 15

SCRIPT = str(ROOT / "slurm" / "cluster.sh")
BENCH_PORTS = {26817, 26818, 26819, 23306}  # bench/sweep_overhead.py's cluster


def _port_free(port: int) -> bool:
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_ports() -> dict[str, str]:
    """Five consecutive free ports: slurmctld, slurmd (n1), slurmdbd, slurmd n2, MariaDB.

    cluster.sh gives node i the port LINTRANS_SLURMD_PORT + i - 1, skipping the other daemons' ports.
    """
    for _ in range(200):
        base = random.randrange(20000, 32000, 10)
        block = range(base, base + 5)
        if not BENCH_PORTS.intersection(block) and all(_port_free(p) for p in block):
            return {
                "LINTRANS_SLURMCTLD_PORT": str(base),
                "LINTRANS_SLURMD_PORT": str(base + 1),
                "LINTRANS_SLURMDBD_PORT": str(base + 2),
                "LINTRANS_SLURM_MYSQL_PORT": str(base + 4),
            }
    raise RuntimeError("no block of 5 free ports found")


class Cluster:
    def __init__(self, folder: Path, env: dict[str, str]):
        self.dir, self.env = folder, env

    def script(self, *args: str, timeout: float = 180, env_extra: dict | None = None) -> subprocess.CompletedProcess:
        """``slurm/cluster.sh ARGS DIR`` for this cluster (``env_extra``: settings such as MaxArraySize)."""
        env = {**self.env, **(env_extra or {})}
        return subprocess.run(["bash", SCRIPT, *args, str(self.dir)], env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A SLURM client command (sbatch, squeue, ...) against this cluster."""
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def out(self, *args: str, timeout: float = 60) -> str:
        return self.run(*args, timeout=timeout).stdout

    def job(self, job: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, Reason, ...)."""
        line = self.run("scontrol", "show", "job", "-o", job, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def node_state(self, node: str) -> str:
        return self.run("sinfo", "-h", "-N", "-n", node, "-o", "%T", check=False).stdout.strip()

    def queued(self, job_name: str) -> bool:
        """Whether a job called ``job_name`` is pending, running or completing."""
        return bool(self.run("squeue", "-h", "-n", job_name, "-o", "%i", check=False).stdout.strip())

    def sacct_states(self, job: str) -> list[str]:
        """States of every run of the job, requeued ones included (``sacct -D``)."""
        out = self.run("sacct", "-n", "-X", "-D", "-P", "-j", job, "-o", "state", check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]


def start_cluster(nodes: int, prefix: str) -> Cluster:
    require("slurmctld")
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # munge needs o+x on every parent
    folder.chmod(0o755)
    env = dict(os.environ, **free_ports(), LINTRANS_SLURM_GPUS="2", SLURM_CONF=str(folder / "etc" / "slurm.conf"))
    env.pop("LINTRANS_SLURM_DIR", None)
    cluster = Cluster(folder, env)
    started = cluster.script("start", "--nodes", str(nodes))
    if started.returncode != 0:
        stop_cluster(cluster)
        pytest.fail(f"cluster.sh start --nodes {nodes} failed:\n{started.stdout}{started.stderr}")
    return cluster


def stop_cluster(cluster: Cluster) -> None:
    cluster.script("stop")
    shutil.rmtree(cluster.dir, ignore_errors=True)


def cluster_fixture(nodes: int, prefix: str):
    """A module-scoped pytest fixture: a cluster of ``nodes`` started for the module, stopped after it."""

    @pytest.fixture(scope="module")
    def fixture():
        cluster = start_cluster(nodes, prefix)
        try:
            yield cluster
        finally:
            stop_cluster(cluster)

    return fixture


def wait_final(cluster: Cluster, runs: Path, sweep: str, n: int = 1, timeout: float = 900) -> list[dict]:
    """Until ``lintrans table`` (which asks the scheduler) shows ``n`` final trials of ``sweep``; its rows.

    ``table`` imports torch, seconds of CPU that a 2-core machine takes from the very trials it
    waits for, so it is asked once the sweep's jobs have left ``squeue``, and every 30 s while one
    stays queued (held, or waiting for a node that is down).
    """
    name = Path(sweep).stem  # the tests' sweep files are named after their sweeps
    asked = [-math.inf]

    def finished():
        if cluster.queued(f"lintrans-{name}") and time.monotonic() - asked[0] < 30:
            return None
        asked[0] = time.monotonic()
        if len(trial_dirs(runs, name)) < n:
            return None
        rows = table_rows(runs, sweep, extra_env={"SLURM_CONF": cluster.env["SLURM_CONF"]})
        return rows if len(rows) == n and all(r["status"] in FINAL for r in rows) else None

    return wait_until(f"{n} final trials of {sweep}", finished, timeout, every=2,
                      describe=lambda: seen(cluster, runs, name))  # fmt: skip


def seen(cluster: Cluster, runs: Path, name: str) -> str:
    """What the scheduler and the trials of sweep ``name`` say now: the text a timed-out wait fails with."""
    trials = trial_dirs(runs, name)
    jobs = sorted({str(job).split("_")[0] for trial in trials if (job := state.launch(trial).get("job_id"))})
    queue = cluster.run("squeue", "-h", "-n", f"lintrans-{name}", "-o", "%i %T %r %M/%l", check=False).stdout
    lines = ["squeue:", queue]
    if jobs:
        fields = "JobID,State,Start,End,Elapsed,Reason"
        lines += ["sacct:", cluster.run("sacct", "-n", "-X", "-D", "-P", "-j", ",".join(jobs), "-o", fields,
                                        check=False).stdout]  # fmt: skip
    for trial in trials:
        shown = {k: v for k, v in status_of(trial).items() if k in STATUS_FIELDS}
        lines.append(f"{trial.name} status.json: {shown}")
    for log in sorted((runs / "sweeps" / name / "slurm").rglob("*_log.out")):
        text = log.read_text(errors="replace").replace("\r", "\n").splitlines()
        bars = [line for line in text if "%|" in line]  # tqdm's, which would hide the submitit lines
        events = [line for line in text if line.strip() and "%|" not in line][-LOG_LINES:]
        lines += [f"{log.name} (its last {LOG_LINES} lines but progress bars, then the last bar):", *events, *bars[-1:]]
    return "\n".join(lines)
