"""Local backend: trials side by side over the visible GPUs or over CPU slots.

Each trial runs as ``python -m launchers.trial DIR`` (or under ``torchrun`` when a trial asks for
several GPUs), with its GPUs in ``CUDA_VISIBLE_DEVICES`` and its CPU share in
``OMP_NUM_THREADS``. Ctrl-C (or SIGTERM) makes every running trial checkpoint and stop; the
children also get SIGTERM if the launcher itself is killed (``PR_SET_PDEATHSIG``), so a re-run of
the same command resumes them instead of racing an orphan.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launchers import state
from launchers.sweep import Sweep, Trial
from launchers.trial import EXIT_BUSY
from lintrans.errors import EXIT_PREEMPTED

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the launcher dies, however it dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Running:
    trial: Trial
    proc: subprocess.Popen
    gpus: list[int]
    log: Path


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def command(trial: Trial, gpus: int) -> list[str]:
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                "-m", "launchers.trial", str(trial.run_dir)]  # fmt: skip
    return [sys.executable, "-m", "launchers.trial", str(trial.run_dir)]


def slots_for(sweep: Sweep, gpus_per_trial: int) -> int:
    if "slots" in sweep.section("local"):
        return max(1, sweep.section("local")["slots"])
    if gpus_per_trial:
        return max(1, gpu_count() // gpus_per_trial)
    return max(1, (os.cpu_count() or 1) // max(1, sweep.resources.get("cpus", 1)))


def run(sweep: Sweep, trials: list[Trial], say=print) -> int:
    """Run ``trials`` to completion (or until interrupted); returns 0, or 130 after Ctrl-C."""
    per_trial = sweep.resources.get("gpus", 0)
    slots = slots_for(sweep, per_trial)
    free_gpus = list(range(gpu_count())) if per_trial else []
    threads = str(max(1, sweep.resources.get("cpus", (os.cpu_count() or 1) // slots)))
    queue = list(trials)
    running: list[Running] = []
    stop = {"requested": False}

    def on_signal(signum, frame) -> None:
        stop["requested"] = True
        for r in running:
            r.proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    say(f"local: {len(trials)} trials, {slots} at a time" + (f", {per_trial} GPU(s) each" if per_trial else ""))
    try:
        while queue or running:
            while queue and len(running) < slots and not stop["requested"]:
                trial = queue.pop(0)
                gpus = [free_gpus.pop(0) for _ in range(per_trial)]
                env = dict(os.environ, LINTRANS_BACKEND="local", OMP_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
                if per_trial:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
                log = trial.run_dir / "train.log"
                with open(log, "a") as out:
                    proc = subprocess.Popen(command(trial, per_trial), stdout=out, stderr=subprocess.STDOUT, env=env,
                                            preexec_fn=_die_with_parent)  # fmt: skip
                state.write_launch(trial.run_dir, "local", str(proc.pid), str(log))
                running.append(Running(trial, proc, gpus, log))
                say(f"  started  {trial.id} {trial.label} (pid {proc.pid}, log {log})")
            time.sleep(0.2)
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                free_gpus += r.gpus
                code = r.proc.returncode
                if code == EXIT_BUSY and not stop["requested"]:
                    queue.append(r.trial)  # another process holds it (e.g. an exiting orphan): retry
                    time.sleep(1)
                    continue
                st = state.summary(r.trial.run_dir)
                shown = "interrupted" if st["state"] == "running" else st["state"]  # killed before it could say
                detail = f": {st['reason']}" if st.get("reason") else ""
                say(f"  {shown:<8} {r.trial.id} {r.trial.label} (exit {code}){detail}")
            if stop["requested"] and not running:
                break
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if stop["requested"]:
        say(f"local: interrupted; {len(queue)} trials not started, running ones checkpointed "
            f"(exit {EXIT_PREEMPTED}); re-run the same command to resume")  # fmt: skip
        return 130
    return 0
