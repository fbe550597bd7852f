"""Local backend: trials side by side over this machine's GPUs or CPU slots.

Each trial runs as ``python -m launchers.trial DIR`` (under ``torchrun --standalone`` when it has
several DDP tasks), with its GPUs in ``CUDA_VISIBLE_DEVICES`` (``""`` for CPU trials) and its
CPU share in ``OMP_NUM_THREADS``. The GPU pool is ``--gpus`` if given, else the inherited
``CUDA_VISIBLE_DEVICES`` (indices or UUIDs), else every device torch sees. Ctrl-C (or SIGTERM)
makes every running trial checkpoint and stop; the children also get SIGTERM if the launcher
itself is killed (``PR_SET_PDEATHSIG``). A trial that crashes (killed, out of memory) is
restarted from its checkpoint up to ``local.max_restarts`` times; interruptions you asked for do
not count.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from launchers import state, status
from launchers.backends import Backend
from launchers.progress import Progress
from launchers.state import Observation
from launchers.sweep import Sweep, Trial
from launchers.trial import record_crash
from lintrans.errors import UsageError
from lintrans.procenv import EXIT_BUSY, EXIT_FAILED, EXIT_PREEMPTED, die_with_parent, same_process

GPU_ID = re.compile(r"^(\d+|GPU-[0-9a-fA-F-]+|MIG-[0-9a-zA-Z/-]+)$")


def gpu_pool(flag: str | None, env: dict[str, str], device_count: Callable[[], int]) -> list[str]:
    """The GPU ids trials may use: ``--gpus 0,3``, else ``CUDA_VISIBLE_DEVICES``, else all devices."""
    if flag is not None:
        ids = [g.strip() for g in flag.split(",") if g.strip()]
        bad = [g for g in ids if not GPU_ID.match(g)]
        if bad or len(set(ids)) != len(ids):
            raise UsageError(f"--gpus {flag!r}: a comma-separated list of distinct GPU indices or UUIDs")
        return ids
    if "CUDA_VISIBLE_DEVICES" in env:
        return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() and g.strip() != "-1"]
    return [str(i) for i in range(device_count())]


def slots(sweep: Sweep, pool: list[str]) -> int:
    """How many trials run at once: GPUs are never shared; CPU trials split the cores."""
    r = sweep.resources
    if r.nodes > 1:
        raise UsageError(
            f"{sweep.path}: resources.nodes={r.nodes}: the local backend runs on one node; use slurm or ray"
        )
    if r.gpus:
        if r.gpus > len(pool):
            raise UsageError(
                f"{sweep.path}: a trial asks for {r.gpus} GPU(s) but the local pool has {len(pool)} "
                f"({','.join(pool) or 'none'}; from --gpus or CUDA_VISIBLE_DEVICES)"
            )
        fit = len(pool) // r.gpus
        return min(fit, sweep.local.slots or fit)
    return sweep.local.slots or max(1, (os.cpu_count() or 1) // (r.cpus * r.tasks))


def command(trial: Trial, tasks: int) -> list[str]:
    if tasks > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tasks}",
                "-m", "launchers.trial", str(trial.run_dir)]  # fmt: skip
    return [sys.executable, "-m", "launchers.trial", str(trial.run_dir)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@dataclass
class Running:
    trial: Trial
    proc: subprocess.Popen
    gpus: list[str]


class LocalBackend(Backend):
    name = "local"

    def __init__(self, gpus: str | None = None) -> None:
        self.gpu_flag = gpus
        self.progress: Progress | None = None  # while `submit` runs: its lines go above the progress line

    def say(self, message: str) -> None:
        (self.progress.say if self.progress else print)(message)

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument(
            "--gpus", default=None, help="local: GPU ids to use, e.g. 0,3 (default: CUDA_VISIBLE_DEVICES)"
        )

    @classmethod
    def from_args(cls, args) -> LocalBackend:
        return cls(gpus=args.gpus)

    def describe(self, sweep: Sweep, trials: list[Trial]) -> str:
        pool = gpu_pool(self.gpu_flag, dict(os.environ), _device_count) if sweep.resources.gpus else []
        n = slots(sweep, pool)
        return f"local: {len(trials)} trials, {n} at a time" + (f" over GPUs {','.join(pool)}" if pool else "")

    def observe(self, trials: list[Trial]) -> dict[str, Observation]:
        out = {}
        for t in trials:
            ln = state.launch(t.run_dir)
            if ln.get("backend") != "local" or not str(ln.get("job_id") or "").isdigit():
                continue
            alive = _alive(int(ln["job_id"]))
            out[t.id] = (
                Observation("running", "") if alive else Observation("ended", f"(process {ln['job_id']} exited)")
            )
        return out

    def cancel(self, trials: list[Trial]) -> int:
        """SIGTERM the running trials (they checkpoint and exit 75: resumable), each checked first to be
        the very process its ``status.json`` names, on this machine (what it skips, it says); stamp the
        others that have not ended cancelled, so that a launcher holding them in its queue starts none
        of them (they are ``stopped``, cancelled before they started, and the next ``run`` starts them).
        Returns how many trials it stopped or kept from starting."""
        stopped = 0
        for t in trials:
            st = state.status(t.run_dir)
            if not state.is_running(t.run_dir):
                if st.get("state", "pending") not in ("done", "failed", "stopped"):  # it may wait in a queue
                    if state.launch(t.run_dir):
                        state.mark_launch(t.run_dir, "cancelled")
                    else:
                        state.write_launch(t.run_dir, "local", None, None, cancelled=state.now())
                    stopped += 1
                continue
            if not same_process(st.get("host"), st.get("pid"), st.get("pid_start")):
                self.say(f"local: not cancelling {t.id}: process {st.get('pid')} on {st.get('host')} is not "
                         f"this machine's trial process (another host, or the pid was reused)")  # fmt: skip
                continue
            state.mark_launch(t.run_dir, "cancelled")
            os.kill(st["pid"], signal.SIGTERM)
            stopped += 1
        return stopped

    def submit(self, sweep: Sweep, trials: list[Trial]) -> int:
        """Run ``trials`` to the end (or until interrupted): 0, 1 if any failed, 130 after Ctrl-C or when
        ``lintrans cancel`` stopped some (a queued trial it stamped cancelled is never started)."""
        began = state.now()
        r = sweep.resources
        pool = gpu_pool(self.gpu_flag, dict(os.environ), _device_count) if r.gpus else []
        n_slots = slots(sweep, pool)
        threads = str(r.cpus)
        queue, running, restarts, failed = list(trials), [], {}, []
        stop = {"requested": False}

        def on_signal(signum, frame) -> None:
            stop["requested"] = True
            for job in running:
                job.proc.send_signal(signal.SIGTERM)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        gpu_note = f", {r.gpus} GPU(s) each from {','.join(pool)}" if r.gpus else ""
        self.say(f"local: {len(trials)} trials, {n_slots} at a time{gpu_note}")
        self.progress = Progress(len(trials), sweep.local.progress_s)
        try:
            while queue or running:
                while queue and len(running) < n_slots and not stop["requested"]:
                    trial = queue.pop(0)
                    if _cancelled_since(trial, began):
                        self.say(f"  cancelled {trial.id} {trial.label} (before it started)")
                        continue
                    running.append(self._start(trial, [pool.pop(0) for _ in range(r.gpus)], threads, r.tasks))
                time.sleep(0.2)
                for job in [j for j in running if j.proc.poll() is not None]:
                    running.remove(job)
                    pool += job.gpus
                    self._finished(job, sweep, queue, restarts, failed, stop["requested"])
                if stop["requested"] and not running:
                    break
                self.progress.update(len(trials) - len(queue) - len(running), [j.trial for j in running])
            self.progress.update(len(trials) - len(queue), [], force=True)
        finally:
            self.progress.close()
            self.progress = None
            for s, h in previous.items():
                signal.signal(s, h)
        if stop["requested"]:
            self.say(f"local: interrupted; {len(queue)} trials not started, running ones checkpointed "
                     f"(exit {EXIT_PREEMPTED}); re-run the same command to resume")  # fmt: skip
            return 130
        cancelled = [t for t in trials if _cancelled_since(t, began)]
        if cancelled:
            self.say(f"local: {status.plural(len(cancelled), 'trial')} cancelled (`lintrans cancel`); "
                     f"re-run the same command to resume them")  # fmt: skip
        return EXIT_FAILED if failed else 130 if cancelled else 0

    def _start(self, trial: Trial, gpus: list[str], threads: str, tasks: int) -> Running:
        env = dict(os.environ, LINTRANS_BACKEND="local", OMP_NUM_THREADS=threads, PYTHONUNBUFFERED="1",
                   CUDA_VISIBLE_DEVICES=",".join(gpus))  # fmt: skip
        log = trial.run_dir / "train.log"
        with open(log, "a") as out:
            proc = subprocess.Popen(command(trial, tasks), stdout=out, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=die_with_parent)  # fmt: skip
        state.write_launch(trial.run_dir, "local", str(proc.pid), str(log))
        self.say(f"  started  {trial.id} {trial.label} (pid {proc.pid}, log {log})")
        return Running(trial, proc, gpus)

    def _finished(self, job: Running, sweep: Sweep, queue, restarts, failed, stopping: bool) -> None:
        code, trial = job.proc.returncode, job.trial
        if code == EXIT_BUSY and not stopping:
            queue.append(trial)  # another process holds it (e.g. an exiting orphan): retry
            time.sleep(1)
            return
        crash = record_crash(trial.run_dir, code, asked_to_stop=stopping)
        if crash and not stopping:
            restarts[trial.id] = restarts.get(trial.id, 0) + 1
            if restarts[trial.id] <= sweep.local.max_restarts:
                self.say(f"  restart  {trial.id} {trial.label} ({crash}; restart {restarts[trial.id]} "
                         f"of {sweep.local.max_restarts})")  # fmt: skip
                queue.insert(0, trial)
                return
        st = status.view(trial.run_dir)
        detail = f": {st.reason}" if st.reason else ""
        if st.state == "failed":
            failed.append(trial)
        self.say(f"  {st.state:<8} {trial.id} {trial.label} (exit {code}){detail}")


def _cancelled_since(trial: Trial, began: str) -> bool:
    """``lintrans cancel`` stamped the trial's launch after this launcher began."""
    return state.launch(trial.run_dir).get("cancelled", "") >= began


def _device_count() -> int:
    import torch

    return torch.cuda.device_count()
