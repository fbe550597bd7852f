"""SLURM backend: job arrays through submitit, or plain sbatch scripts with a manifest.

submitit: one array per sweep (split when larger than the cluster's ``MaxArraySize``), throttled
with ``%N``; each task runs the trial entry point as a child process. On the time-limit or
preemption signal (USR2, ``signal_delay_s`` before the limit) submitit calls
:meth:`SlurmTrial.checkpoint`, which makes the trial checkpoint and hands back the same call, and
submitit requeues the task; ``scontrol requeue`` (SIGTERM) does the same through SLURM. The trial
counts its starts and fails after ``max_requeues``. Multi-GPU and multi-node trials are srun tasks
that the DDP set-up reads (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``).

``--sbatch-only`` writes plain array scripts that read each task's trial directory from a
manifest by ``SLURM_ARRAY_TASK_ID``. No value from a sweep file is written into shell text:
scripts carry only validated names, numbers and ``shlex``-quoted paths; overrides travel in
``trial.json``.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from launchers import state
from launchers.sweep import Sweep, Trial
from lintrans.atomic import write_text
from lintrans.errors import EXIT_PREEMPTED, UsageError

SAFE = re.compile(r"[A-Za-z0-9_.,:=/+-]+")


def scontrol_config() -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^(\w+)\s+=\s+(.*)$", out, re.MULTILINE)}


def max_array_size() -> int:
    return int(scontrol_config().get("MaxArraySize", "1001"))


def chunks(trials: list[Trial], size: int) -> list[list[Trial]]:
    return [trials[i : i + size] for i in range(0, len(trials), size)]


def queued_jobs() -> set[str]:
    """Job ids SLURM still knows as pending or running, one entry per array task (``123_4``)."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def _checked(sweep: Sweep) -> dict:
    """Sweep values that end up in ``#SBATCH`` lines must be plain tokens."""
    sec = sweep.section("slurm")
    for key in ("partition", "account", "qos", "constraint"):
        if key in sec and not SAFE.fullmatch(sec[key]):
            raise UsageError(f"{sweep.path}: slurm.{key}: {sec[key]!r} is not a plain SLURM name")
    if not SAFE.fullmatch(str(sweep.dir.resolve())):
        raise UsageError(f"run directory {sweep.dir.resolve()} has characters SLURM paths cannot carry")
    return sec


def resources(sweep: Sweep) -> dict:
    """Per-trial resources: one task per GPU (srun tasks feed the DDP set-up), else one task."""
    r, sec = sweep.resources, _checked(sweep)
    gpus = r.get("gpus", 0)
    return {
        "nodes": r.get("nodes", 1),
        "tasks_per_node": max(1, gpus),
        "gpus_per_node": gpus,
        "cpus_per_task": r.get("cpus", 1),
        "mem_gb": r.get("mem_gb"),
        "time_min": r.get("time_min", 60),
        "partition": sec.get("partition"),
        "account": sec.get("account"),
        "qos": sec.get("qos"),
        "constraint": sec.get("constraint"),
        "array_parallelism": sec.get("array_parallelism", 256),
        "signal_delay_s": sec.get("signal_delay_s", 120),
    }


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
        if code == EXIT_PREEMPTED:  # SIGTERM from scontrol requeue / scancel: SLURM decides what follows
            print(f"trial checkpointed (exit {code})", flush=True)
        elif code not in (0, 1):
            raise RuntimeError(f"trial entry point exited with {code}")
        return code

    def checkpoint(self, trial_dir: str):
        """Called by submitit on the requeue signal: stop the trial at a checkpoint, call again."""
        import submitit

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            try:
                self.proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return submitit.helpers.DelayedSubmission(SlurmTrial(), trial_dir)

    def __getstate__(self) -> dict:
        return {"proc": None}


def executor(sweep: Sweep):
    import submitit

    r = resources(sweep)
    ex = submitit.SlurmExecutor(folder=sweep.dir / "slurm" / "%j", max_num_timeout=sweep.section("slurm").get(
        "max_requeues", 3))  # fmt: skip
    params = {
        "job_name": f"lintrans-{sweep.name}",
        "nodes": r["nodes"],
        "ntasks_per_node": r["tasks_per_node"],
        "cpus_per_task": r["cpus_per_task"],
        "time": r["time_min"],
        "array_parallelism": r["array_parallelism"],
        "signal_delay_s": r["signal_delay_s"],
        "stderr_to_stdout": True,
    }
    if r["gpus_per_node"]:
        params["gpus_per_node"] = r["gpus_per_node"]
    if r["mem_gb"]:
        params["mem"] = f"{r['mem_gb']}GB"
    for key in ("partition", "account", "qos", "constraint"):
        if r[key]:
            params[key] = r[key]
    ex.update_parameters(**params)
    return ex


def submit(sweep: Sweep, trials: list[Trial], say=print) -> list[str]:
    """Submit ``trials`` as job arrays; returns the array job ids."""
    size = max_array_size()
    ex = executor(sweep)
    array_ids = []
    for part in chunks(trials, size):
        jobs = ex.map_array(SlurmTrial(), [str(t.run_dir.resolve()) for t in part])
        for trial, job in zip(part, jobs, strict=True):
            state.write_launch(trial.run_dir, "slurm", job.job_id, str(job.paths.stdout))
        array_ids.append(jobs[0].job_id.split("_")[0])
        say(f"slurm: submitted array {array_ids[-1]} with {len(part)} tasks (%{resources(sweep)['array_parallelism']})")
    return array_ids


def dry_run_script(sweep: Sweep, n: int) -> str:
    """The exact sbatch text submitit generates for an array of ``n`` tasks."""
    from submitit.slurm.slurm import _make_sbatch_string

    ex = executor(sweep)
    params = {k: v for k, v in ex.parameters.items() if k != "array_parallelism"}
    params["map_count"] = n
    params["array_parallelism"] = ex.parameters.get("array_parallelism", 256)
    return _make_sbatch_string(
        command=" ".join(
            [shlex.quote(sys.executable), "-u", "-m", "submitit.core._submit", shlex.quote(str(ex.folder))]
        ),
        folder=ex.folder,
        **params,
    )


def sbatch_scripts(sweep: Sweep, trials: list[Trial], folder: Path) -> list[Path]:
    """Plain sbatch array scripts (no submitit) + manifests of trial directories."""
    r = resources(sweep)
    paths = []
    for n, part in enumerate(chunks(trials, max_array_size())):
        manifest = folder / f"{sweep.name}.{n}.manifest"
        write_text(manifest, "".join(f"{t.run_dir.resolve()}\n" for t in part))
        logs = (sweep.dir / "slurm").resolve()
        logs.mkdir(parents=True, exist_ok=True)
        lines = [
            "#!/bin/bash",
            f"#SBATCH --job-name=lintrans-{sweep.name}",
            f"#SBATCH --array=0-{len(part) - 1}%{r['array_parallelism']}",
            f"#SBATCH --output={logs}/%A_%a.log",
            f"#SBATCH --nodes={r['nodes']}",
            f"#SBATCH --ntasks-per-node={r['tasks_per_node']}",
            f"#SBATCH --cpus-per-task={r['cpus_per_task']}",
            f"#SBATCH --time={r['time_min']}",
            f"#SBATCH --signal=B:USR1@{r['signal_delay_s']}",
            "#SBATCH --requeue",
            "#SBATCH --open-mode=append",
        ]
        if r["gpus_per_node"]:
            lines.append(f"#SBATCH --gpus-per-node={r['gpus_per_node']}")
        if r["mem_gb"]:
            lines.append(f"#SBATCH --mem={r['mem_gb']}G")
        lines += [f"#SBATCH --{k}={r[k]}" for k in ("partition", "account", "qos", "constraint") if r[k]]
        lines += [
            "set -uo pipefail",
            f"cd {shlex.quote(str(Path.cwd().resolve()))}",
            f"manifest={shlex.quote(str(manifest.resolve()))}",
            'trial_dir=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$manifest")',
            "export LINTRANS_BACKEND=sbatch PYTHONUNBUFFERED=1",
            'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
            "# USR1 (time limit / preemption, sent to this shell by --signal=B:USR1) reaches the",
            "# trainers through srun; they checkpoint and exit 75, and the task requeues itself.",
            f'srun {shlex.quote(sys.executable)} -m launchers.trial "$trial_dir" &',
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
        path = folder / f"{sweep.name}.{n}.sbatch"
        write_text(path, "\n".join(lines) + "\n")
        paths.append(path)
    return paths


def cancel(trials: list[Trial], say=print) -> int:
    """``scancel`` the queued tasks of ``trials``; the trials checkpoint on SIGTERM and stay resumable."""
    queued = queued_jobs()
    ids = sorted({state.launch(t.run_dir).get("job_id") for t in trials} & queued)
    if ids:
        subprocess.run(["scancel", *ids], check=True)
    say(f"slurm: cancelled {len(ids)} task(s)")
    return len(ids)
