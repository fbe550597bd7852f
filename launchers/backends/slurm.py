"""SLURM backend: job arrays through submitit, or plain sbatch scripts with a manifest.

submitit: one array per sweep (split when larger than the cluster's ``MaxArraySize``), throttled
with ``%N``; each task (one per DDP rank: ``resources.nodes`` x ``tasks_per_node``, one task per
GPU) runs the trial entry point as a child process. On the time-limit or preemption signal
(USR2, ``signal_delay_s`` before the limit) submitit calls :meth:`SlurmTrial.checkpoint`, which
makes the trial checkpoint and hands back the same call, and submitit requeues the task;
``scontrol requeue`` (SIGTERM) does the same through SLURM. The job's environment comes from
``slurm.setup`` (shell lines written by the sweep author: ``module load``, ``conda activate``,
``source venv/bin/activate``), which run before the trial and fail the job if one fails.

``--sbatch-only`` writes plain array scripts that read each task's trial directory from a
manifest by ``SLURM_ARRAY_TASK_ID``; every submission gets its own script and manifest, never
rewritten. No value from a sweep's axes is written into shell text: scripts carry only
validated tokens, numbers, ``shlex``-quoted paths and the author's own setup lines; overrides
travel in ``trial.json``.

:meth:`SlurmBackend.observe` asks ``squeue`` (queued, running, with the pending reason) and
``sacct`` (how a job ended: FAILED, OUT_OF_MEMORY, NODE_FAIL, TIMEOUT, CANCELLED, BOOT_FAIL), so
``status`` agrees with the scheduler even when a task died before Python started.
"""

from __future__ import annotations

import datetime
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from launchers import state
from launchers.state import Observation
from launchers.sweep import Sweep, Trial
from launchers.trial import record_crash
from lintrans.atomic import write_text
from lintrans.errors import UsageError
from lintrans.procenv import EXIT_PREEMPTED, is_rank0

SAFE_PATH = re.compile(r"[A-Za-z0-9_.,:=/+@%-]+")
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING", "RESIZING", "SUSPENDED"}
RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
CHECKPOINT_WAIT_S = 300


def _slurm(*args: str) -> str:
    """Run a SLURM client command; a cluster that cannot be reached is bad input, said in one line."""
    try:
        out = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UsageError(
            f"{args[0]} not found: this machine has no SLURM client (install it, or use --backend local)"
        ) from None
    except subprocess.TimeoutExpired:
        raise UsageError(f"{args[0]} did not answer within 60 s: is slurmctld reachable (SLURM_CONF)?") from None
    if out.returncode != 0:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        raise UsageError(f"{' '.join(args[:3])} failed: {lines[-1] if lines else f'exit {out.returncode}'}")
    return out.stdout


def scontrol_config() -> dict[str, str]:
    out = _slurm("scontrol", "show", "config")
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^(\w+)\s+=\s+(.*)$", out, re.MULTILINE)}


def chunks(trials: list[Trial], size: int) -> list[list[Trial]]:
    return [trials[i : i + size] for i in range(0, len(trials), size)]


def check_partition(partition: str | None) -> None:
    if partition is None:
        return
    known = set(_slurm("sinfo", "-h", "-o", "%R").split())
    if partition not in known:
        raise UsageError(
            f"slurm.partition '{partition}' does not exist on this cluster; valid: {', '.join(sorted(known))}"
        )


def resources(sweep: Sweep) -> dict:
    """What a task asks of SLURM. Memory goes out in whole megabytes (``--mem=7680M``), never ``7.5GB``."""
    r, s = sweep.resources, sweep.slurm
    if not SAFE_PATH.fullmatch(str(sweep.dir.resolve())):
        raise UsageError(f"run directory {sweep.dir.resolve()} has characters SLURM paths cannot carry")
    return {
        "nodes": r.nodes,
        "ntasks_per_node": r.tasks,
        "cpus_per_task": r.cpus,
        "gpus_per_node": r.gpus or None,
        "mem": f"{round(r.mem_gb * 1024)}M" if r.mem_gb else None,
        "time": r.time_min,
        "partition": s.partition,
        "account": s.account,
        "qos": s.qos,
        "constraint": s.constraint,
    }


def setup_lines(sweep: Sweep) -> list[str]:
    """The author's setup lines, run with ``set -e`` so that one failing fails the job before the trial."""
    if not sweep.slurm.setup:
        return []
    return [
        "set -e  # a failing setup line fails the job (the trial has not started)",
        "trap 'echo \"lintrans: setup line failed (exit $?): $BASH_COMMAND\" >&2' ERR",
        *sweep.slurm.setup,
        "trap - ERR",
        "set +e",
    ]


class SlurmTrial:
    """The callable submitit pickles: runs the trial entry point, and checkpoints on demand.

    Implements submitit's ``checkpoint`` protocol (as ``submitit.helpers.Checkpointable`` does)
    without living in ``__main__``, so the pickle resolves on the compute node.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def __call__(self, trial_dir: str) -> int:
        env = dict(os.environ, LINTRANS_BACKEND="slurm", PYTHONUNBUFFERED="1")
        env.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))  # no oversubscription
        self.proc = subprocess.Popen([sys.executable, "-m", "launchers.trial", trial_dir], env=env)
        code = self.proc.wait()
        if is_rank0():
            record_crash(Path(trial_dir), code)
        if code == EXIT_PREEMPTED:  # SIGTERM from scontrol requeue / scancel: SLURM decides what follows
            print(f"trial checkpointed (exit {code})", flush=True)
            return code
        if code != 0:  # the task (and sacct) must say the trial failed
            raise RuntimeError(f"trial {Path(trial_dir).name} ended with exit {code}; see its status.json")
        return code

    def checkpoint(self, trial_dir: str):
        """Called by submitit on the requeue signal: stop the trial at a checkpoint, call again.

        The interrupted ``__call__`` is inside ``Popen.wait`` and holds its lock, so waiting here
        with ``Popen.wait`` would block until its timeout (this is how a requeue once came 299 s
        after the checkpoint, late enough for a real time limit to kill the job). ``waitid`` with
        ``WNOWAIT`` sees the child exit without reaping it.
        """
        import submitit

        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGUSR1)
            deadline = time.time() + CHECKPOINT_WAIT_S
            while time.time() < deadline:
                if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    break
                time.sleep(0.1)
            else:
                proc.kill()
        return submitit.helpers.DelayedSubmission(SlurmTrial(), trial_dir)

    def __getstate__(self) -> dict:
        return {"proc": None}


class SlurmBackend:
    name = "slurm"

    def __init__(self, say: Callable[[str], None] = print) -> None:
        self.say = say

    # ---------------------------------------------------------------- submitit

    def executor(self, sweep: Sweep):
        import submitit

        r = {k: v for k, v in resources(sweep).items() if v is not None}
        ex = submitit.SlurmExecutor(folder=sweep.dir / "slurm" / "%j", max_num_timeout=sweep.slurm.max_requeues)
        ex.update_parameters(
            job_name=f"lintrans-{sweep.name}",
            array_parallelism=sweep.slurm.array_parallelism,
            signal_delay_s=sweep.slurm.signal_delay_s,
            stderr_to_stdout=True,
            setup=setup_lines(sweep),
            srun_args=list(sweep.slurm.srun_args),
            additional_parameters={"requeue": True, **sweep.slurm.additional},  # NODE_FAIL requeues the job
            **r,
        )
        return ex

    def submit(self, sweep: Sweep, trials: list[Trial]) -> int:
        """Submit ``trials`` as job arrays; returns once they are queued."""
        config = scontrol_config()
        check_partition(sweep.slurm.partition)
        size = int(config.get("MaxArraySize", "1001"))
        ex = self.executor(sweep)
        for part in chunks(trials, size):
            jobs = ex.map_array(SlurmTrial(), [str(t.run_dir.resolve()) for t in part])
            for trial, job in zip(part, jobs, strict=True):
                state.write_launch(trial.run_dir, "slurm", job.job_id, str(job.paths.stdout))
            self.say(f"slurm: submitted array {jobs[0].job_id.split('_')[0]} with {len(part)} tasks "
                     f"(%{sweep.slurm.array_parallelism})")  # fmt: skip
        return 0

    def dry_run(self, sweep: Sweep, trials: list[Trial]) -> str:
        """The exact sbatch text submitit generates for this array."""
        from submitit.slurm.slurm import _make_sbatch_string

        ex = self.executor(sweep)
        params = dict(ex.parameters)
        params["map_count"] = max(1, len(trials))
        command = " ".join(
            [shlex.quote(sys.executable), "-u", "-m", "submitit.core._submit", shlex.quote(str(ex.folder))]
        )
        text = _make_sbatch_string(command=command, folder=ex.folder, **params)
        return f"# sbatch script submitit would submit for {len(trials)} trial(s):\n{text}"

    # ---------------------------------------------------------------- watching and stopping

    def observe(self, trials: list[Trial]) -> dict[str, Observation]:
        jobs = {}
        for t in trials:
            ln = state.launch(t.run_dir)
            if ln.get("backend") == "slurm" and ln.get("job_id"):
                jobs[str(ln["job_id"])] = t.id
        if not jobs:
            return {}
        out: dict[str, Observation] = {}
        for line in _slurm("squeue", "-h", "-r", "-o", "%i|%T|%r").splitlines():
            job, st, reason = ([*line.split("|"), "", ""])[:3]
            if job in jobs:
                phase = "running" if st in RUNNING else "queued"
                out[jobs[job]] = Observation(phase, f"{st} ({reason})" if reason and reason != "None" else st)
        ended = [j for j in jobs if jobs[j] not in out]
        for part in (ended[i : i + 500] for i in range(0, len(ended), 500)):
            for line in _slurm(
                "sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", ",".join(part)
            ).splitlines():
                job, st, exit_code = ([*line.split("|"), "", ""])[:3]
                if job in jobs and jobs[job] not in out:
                    st = st.split()[0]  # "CANCELLED by 0"
                    phase = "queued" if st in QUEUED else "running" if st in RUNNING else "ended"
                    out[jobs[job]] = Observation(phase, f"{st} (exit {exit_code})" if phase == "ended" else st)
        return out

    def cancel(self, trials: list[Trial]) -> int:
        """``scancel`` the queued and running tasks of ``trials``; running trials checkpoint on SIGTERM."""
        seen = self.observe(trials)
        ids = sorted({str(state.launch(t.run_dir).get("job_id")) for t in trials
                      if t.id in seen and seen[t.id].phase != "ended"})  # fmt: skip
        if ids:
            for t in trials:
                if str(state.launch(t.run_dir).get("job_id")) in ids:
                    state.mark_cancelled(t.run_dir)
            _slurm("scancel", *ids)
        return len(ids)

    # ---------------------------------------------------------------- plain sbatch scripts

    def sbatch_scripts(self, sweep: Sweep, trials: list[Trial]) -> list[Path]:
        """Plain sbatch array scripts (no submitit needed on the cluster) and their manifests, unique per call."""
        r = resources(sweep)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
        folder = (sweep.dir / "sbatch" / stamp).resolve()
        size = int(scontrol_config().get("MaxArraySize", "1001")) if _has_slurm() else 1001
        logs = (sweep.dir / "slurm").resolve()
        logs.mkdir(parents=True, exist_ok=True)
        paths = []
        for n, part in enumerate(chunks(trials, max(1, size))):
            manifest = folder / f"{sweep.name}.{n}.manifest"
            write_text(manifest, "".join(f"{t.run_dir.resolve()}\n" for t in part))
            path = folder / f"{sweep.name}.{n}.sbatch"
            write_text(path, sbatch_text(sweep, r, len(part), manifest, logs))
            for t in part:
                state.write_launch(t.run_dir, "sbatch", None, None, script=str(path))
            paths.append(path)
        return paths


def _has_slurm() -> bool:
    try:
        scontrol_config()
    except UsageError:
        return False
    return True


def sbatch_text(sweep: Sweep, r: dict, n: int, manifest: Path, logs: Path) -> str:
    """One array script: the #SBATCH header from validated values, the author's setup, the trial under srun."""
    header = {
        "job-name": f"lintrans-{sweep.name}",
        "array": f"0-{n - 1}%{sweep.slurm.array_parallelism}",
        "output": f"{logs}/%A_%a.log",
        "nodes": r["nodes"],
        "ntasks-per-node": r["ntasks_per_node"],
        "cpus-per-task": r["cpus_per_task"],
        "time": r["time"],
        "signal": f"B:USR1@{sweep.slurm.signal_delay_s}",
        "requeue": True,
        "open-mode": "append",
        "gpus-per-node": r["gpus_per_node"],
        "mem": r["mem"],
        **{k: r[k] for k in ("partition", "account", "qos", "constraint")},
        **sweep.slurm.additional,
    }
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH --{k}" if v is True else f"#SBATCH --{k}={v}" for k, v in header.items() if v is not None]
    srun = shlex.join(["srun", *sweep.slurm.srun_args, sys.executable, "-m", "launchers.trial"])
    lines += [
        *setup_lines(sweep),
        "set -uo pipefail",
        f"cd {shlex.quote(str(Path.cwd().resolve()))}",
        f"manifest={shlex.quote(str(manifest))}",
        'trial_dir=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$manifest")',
        "export LINTRANS_BACKEND=sbatch PYTHONUNBUFFERED=1",
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
        "# USR1 (time limit / preemption, sent to this shell by --signal=B:USR1) reaches the",
        "# trainers through srun; they checkpoint and exit 75, and the task requeues itself.",
        f'{srun} "$trial_dir" &',
        "child=$!",
        "trap 'kill -USR1 \"$child\"' USR1",
        'wait "$child"; code=$?',
        'while [ "$code" -gt 128 ] && kill -0 "$child" 2>/dev/null; do wait "$child"; code=$?; done',
        f'if [ "$code" -eq {EXIT_PREEMPTED} ]; then',
        '  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        "  exit 0",
        "fi",
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"
