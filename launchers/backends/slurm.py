"""SLURM backend: job arrays through submitit (its public executor API), watched with squeue and sacct.

One array per sweep (split when larger than the cluster's ``MaxArraySize``), throttled with
``%N``; each task (one per DDP rank: ``resources.nodes`` x ``tasks_per_node``, one task per GPU)
runs the trial entry point as a child process. The job's options, setup lines and srun arguments
come from the one script writer, :mod:`launchers.backends.sbatch_script`, which also documents the
preemption contract: on USR2 (``signal_delay_s`` before the limit) submitit calls
:meth:`SlurmTrial.checkpoint`, which makes the trial checkpoint (exit 75) and hands back the same
call, and submitit requeues the task; ``scontrol requeue`` (SIGTERM) does the same through SLURM.

:meth:`SlurmBackend.observe` asks ``squeue`` (queued, running, with the pending reason) and
``sacct`` (how a job ended: FAILED, OUT_OF_MEMORY, NODE_FAIL, TIMEOUT, CANCELLED, BOOT_FAIL), so
``status`` agrees with the scheduler even when a task died before Python started.
"""

from __future__ import annotations

import logging
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
from launchers.backends import Backend
from launchers.backends.sbatch_script import (
    interpreter,
    options,
    render,
    setup_lines,
    srun_args,
    submitit_parameters,
)
from launchers.state import Observation
from launchers.sweep import Sweep, Trial
from launchers.trial import record_crash
from lintrans.errors import UsageError
from lintrans.procenv import EXIT_PREEMPTED, is_rank0

QUEUED = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING", "RESIZING", "SUSPENDED"}
RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}
CHECKPOINT_WAIT_S = 300


REACH_TIMEOUT_S = 10  # a controller that does not answer `scontrol show config` in this time is unreachable
ACCOUNTING_TIMEOUT_S = 30  # sacct that has not answered by then (slurmdbd down, hanging): no accounting
log = logging.getLogger(__name__)


def slurm_command(*args: str, timeout: float = 60) -> str:
    """Run a SLURM client command; a cluster that cannot be reached is bad input, said in one line."""
    try:
        out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UsageError(
            f"{args[0]} not found: this machine has no SLURM client (install it, or use --backend local)"
        ) from None
    except subprocess.TimeoutExpired:
        raise UsageError(
            f"{args[0]} did not answer within {timeout:.0f} s: is slurmctld reachable "
            f"(SLURM_CONF={os.environ.get('SLURM_CONF', 'unset')})?"
        ) from None
    if out.returncode != 0:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        raise UsageError(f"{' '.join(args[:3])} failed: {lines[-1] if lines else f'exit {out.returncode}'}")
    return out.stdout


def scontrol_config(timeout: float = 60) -> dict[str, str]:
    out = slurm_command("scontrol", "show", "config", timeout=timeout)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^(\w+)\s+=\s+(.*)$", out, re.MULTILINE)}


def chunks(trials: list[Trial], size: int) -> list[list[Trial]]:
    return [trials[i : i + size] for i in range(0, len(trials), size)]


def check_partition(partition: str | None) -> None:
    if partition is None:
        return
    known = set(slurm_command("sinfo", "-h", "-o", "%R").split())
    if partition not in known:
        raise UsageError(
            f"slurm.partition '{partition}' does not exist on this cluster; valid: {', '.join(sorted(known))}"
        )


def exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it (``waitid`` with ``WNOWAIT``).

    A child already reaped has exited too. ``--signal`` reaches the trial as well as submitit's
    process, and when the signal lands on another thread of that process, its handler runs only once
    the interrupted ``Popen.wait`` has reaped the checkpointed trial, before it stores the exit code.
    ``waitid`` then raises ``ChildProcessError``, inside ``Popen.wait``, which takes it for exit 0:
    the job ended "completed" with its trial preempted, never requeued (a CI run of the time-limit
    test saw this).
    """
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


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
        after the checkpoint, late enough for a real time limit to kill the job); :func:`exited`
        watches the child without reaping it.
        """
        import submitit

        proc = self.proc
        if proc is not None and proc.returncode is None and not exited(proc.pid):
            proc.send_signal(signal.SIGUSR2)  # the contract's signal (sbatch_script.PREEMPT_SIGNAL)
            deadline = time.time() + CHECKPOINT_WAIT_S
            while time.time() < deadline:
                if exited(proc.pid):
                    break
                time.sleep(0.1)
            else:
                proc.kill()
        return submitit.helpers.DelayedSubmission(SlurmTrial(), trial_dir)

    def __getstate__(self) -> dict:
        return {"proc": None}


class SlurmBackend(Backend):
    name = "slurm"
    waits = False  # returns once the arrays are queued

    def __init__(self, say: Callable[[str], None] = print) -> None:
        self.say = say
        self.config: dict[str, str] | None = None  # `scontrol show config`, once `check` asked

    def check(self, sweep: Sweep) -> None:
        """The controller answers (within :data:`REACH_TIMEOUT_S`) and knows the sweep's partition."""
        self.config = scontrol_config(timeout=REACH_TIMEOUT_S)
        check_partition(sweep.slurm.partition)

    # ---------------------------------------------------------------- submitit

    def executor(self, sweep: Sweep):
        import submitit

        ex = submitit.SlurmExecutor(
            folder=sweep.dir / "slurm" / "%j",
            max_num_timeout=sweep.slurm.max_requeues,
            python=shlex.join(interpreter(sweep)),  # submitit's worker, and the trial it starts, run in it
        )
        ex.update_parameters(**submitit_parameters(sweep))
        return ex

    def describe(self, sweep: Sweep, trials: list[Trial]) -> str:
        return f"slurm: {len(trials)} trials as job arrays (%{sweep.slurm.array_parallelism}) through submitit"

    def submit(self, sweep: Sweep, trials: list[Trial]) -> int:
        """Submit ``trials`` as job arrays; returns once they are queued."""
        if self.config is None:
            self.check(sweep)
        size = int(self.config.get("MaxArraySize", "1001"))
        ex = self.executor(sweep)
        for part in chunks(trials, size):
            jobs = ex.map_array(SlurmTrial(), [str(t.run_dir.resolve()) for t in part])
            for trial, job in zip(part, jobs, strict=True):
                state.write_launch(trial.run_dir, "slurm", job.job_id, str(job.paths.stdout))
            self.say(f"slurm: submitted array {jobs[0].job_id.split('_')[0]} with {len(part)} tasks "
                     f"(%{sweep.slurm.array_parallelism})")  # fmt: skip
        return 0

    def dry_run(self, sweep: Sweep, trials: list[Trial]) -> str:
        """The job the array is, from the one script writer; submitit adds its own srun line that runs the tasks."""
        logs = sweep.dir.resolve() / "slurm" / "%A_%a" / "%A_%a_0_log.out"
        srun = " ".join(["srun", "--unbuffered", "--output", "<task log>", *srun_args(sweep), *interpreter(sweep)])
        wckey = "" if "wckey" in sweep.slurm.additional else "--wckey=submitit and "  # given, or dropped with null
        body = [
            f"# submitit adds {wckey}its own srun line for each task, as the command:",
            f"# {srun} -u -m submitit.core._submit <folder> (submitit's worker), which calls SlurmTrial",
            "# on the task's trial directory",
        ]
        text = render(options(sweep, max(1, len(trials)), str(logs)), setup_lines(sweep), body)
        return f"# SLURM job submitit would submit for {len(trials)} trial(s):\n{text}"

    # ---------------------------------------------------------------- watching and stopping

    def observe(self, trials: list[Trial]) -> dict[str, Observation]:
        """One ``squeue`` and one ``sacct``, each asked only about this sweep's jobs (``-j``), never the whole queue."""
        jobs = {}
        for t in trials:
            ln = state.launch(t.run_dir)
            if ln.get("backend") == "slurm" and ln.get("job_id"):
                jobs[str(ln["job_id"])] = t.id
        if not jobs:
            return {}
        out: dict[str, Observation] = {}
        for job, st, reason in job_records("squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(arrays(jobs))):
            for task in array_tasks(job):
                if task in jobs:
                    phase = "running" if st in RUNNING else "queued"
                    out[jobs[task]] = Observation(phase, f"{st} ({reason})" if reason and reason != "None" else st)
        ended = [j for j in jobs if jobs[j] not in out]
        if not ended:
            return out
        for job, st, exit_code in accounting(ended):
            st = st.split()[0] if st else st  # "CANCELLED by 0"
            for task in array_tasks(job):
                if task in jobs and jobs[task] not in out:
                    phase = "queued" if st in QUEUED else "running" if st in RUNNING else "ended"
                    out[jobs[task]] = Observation(phase, f"{st} (exit {exit_code})" if phase == "ended" else st)
        for job in ended:  # not in squeue, and sacct has no word of it (no accounting): it left the queue
            out.setdefault(jobs[job], Observation("ended", "VANISHED (left the queue; no accounting record)"))
        return out

    def cancel(self, trials: list[Trial]) -> int:
        """``scancel`` the queued and running tasks of ``trials``; running trials checkpoint on SIGTERM."""
        seen = self.observe(trials)
        return scancel({t.run_dir: str(state.launch(t.run_dir).get("job_id")) for t in trials
                        if t.id in seen and seen[t.id].phase != "ended"})  # fmt: skip


def arrays(jobs) -> list[str]:
    """The job ids to ask the scheduler about: each array once (``12`` for ``12_0`` and ``12_1``)."""
    return sorted({job.split("_")[0] for job in jobs})


def array_tasks(job: str) -> list[str]:
    """The tasks a job record stands for: ``5_[1-2,4%1]`` (tasks that never started, as ``sacct`` and
    ``squeue`` list them) is ``5_1, 5_2, 5_4``; ``5_7`` and ``9`` stand for themselves."""
    m = re.fullmatch(r"(\d+)_\[([\d,-]+)(?:%\d+)?\]", job)
    if not m:
        return [job]
    base, ranges = m.groups()
    tasks = []
    for part in ranges.split(","):
        first, _, last = part.partition("-")
        tasks += [f"{base}_{i}" for i in range(int(first), int(last or first) + 1)]
    return tasks


def job_records(*command: str, timeout: float = 60) -> list[tuple[str, str, str]]:
    """The ``|``-separated three-field lines of a ``squeue``/``sacct`` call; none once the jobs left.

    ``squeue -j`` of jobs that all left the queue is an error ("Invalid job id specified"), not an
    empty answer: that means nothing is queued or running.
    """
    try:
        text = slurm_command(*command, timeout=timeout)
    except UsageError as exc:
        if "Invalid job id" in str(exc):
            return []
        raise
    return [tuple([*line.split("|"), "", ""][:3]) for line in text.splitlines() if line.strip()]


_no_accounting: list[str] = []  # said once per command


def accounting(jobs: list[str]) -> list[tuple[str, str, str]]:
    """``sacct``'s records of jobs that left ``squeue``; none where the site keeps no accounting.

    Without accounting (``sacct`` missing, storage disabled, slurmdbd down or silent) a job that left
    the queue has ended, how is unknown: the trial's own records say whether it finished, and a trial
    that says it runs but holds no lock is failed, never shown running. That is said once, in one line.
    """
    try:
        return job_records("sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", ",".join(arrays(jobs)),
                           timeout=ACCOUNTING_TIMEOUT_S)  # fmt: skip
    except UsageError as exc:
        if not _no_accounting:
            _no_accounting.append(str(exc))
            log.warning("no SLURM accounting (%s): jobs that left the queue are judged by their trials' records", exc)
        return []


def scancel(jobs: dict[Path, str]) -> int:
    """Mark each trial (run directory -> its job) cancelled, then ``scancel`` the jobs; how many jobs."""
    for trial_dir in jobs:
        state.mark_launch(trial_dir, "cancelled")
    if jobs:
        slurm_command("scancel", *sorted(set(jobs.values())))
    return len(set(jobs.values()))
