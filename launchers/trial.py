"""The one trial entry point every backend calls: train -> evaluations -> status.

    python -m launchers.trial runs/sweeps/<sweep>/<trial id>

A trial is a run directory holding ``trial.json`` (base config as an absolute path, the folders it
imports from, overrides, evaluations, resources): every backend runs the same config with the same
``sys.path``, whatever folder it starts in. Running it again resumes from ``checkpoints-meta`` and
redoes only the evaluations that have no record yet; a finished trial returns at once. Every way a
trial can stop ends in a recorded state (:mod:`launchers.state`): done; preempted (a signal during
training or the evaluations: checkpoint written, re-run to resume); failed with a reason (bad
input, a corrupt checkpoint, CUDA missing, non-finite loss, any exception, the requeue limit);
stopped (a scheduler such as ASHA ended it early). Under a multi-process launcher (torchrun, srun
with several tasks) every rank trains, and rank 0 alone keeps the state and runs the evaluations.

Exit codes: 0 done (or stopped), 1 failed (reason recorded), 2 bad trial spec, 73 the trial is
already being run by another process, 75 preempted (checkpoint written, requeue me).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from launchers import state
from launchers.sweep import Sweep, Trial
from launchers.trial_records import evaluations_missing, job_id
from lintrans import config as cfg
from lintrans import records, trackers
from lintrans.atomic import disk_full, write_json
from lintrans.errors import NonFiniteLossError, UsageError
from lintrans.procenv import EXIT_BUSY, EXIT_FAILED, EXIT_PREEMPTED, EXIT_USAGE, keep_freed_memory, rank

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
# A finished trial's state as the number its trackers show beside its metrics (HParams metric ``state``).
STATE_METRIC = {"done": 0.0, "stopped": 1.0, "failed": 2.0}


class Preempted(BaseException):
    """A stop signal arrived outside the training loop (start-up, resuming, the evaluations).

    A ``BaseException``, as ``KeyboardInterrupt`` is: the handler raises it wherever the trial is, and a
    broad ``except Exception`` there must not take it for that code's own failure. ``Run.load`` did: a
    ``cancel`` landing while a resuming trial read its checkpoint was reported as a corrupt checkpoint,
    and the trial failed for good ("delete it to start over") with a sound file.
    """


class Stopped(Exception):
    """A trial scheduler (ASHA) ended the trial early; ``args[0]`` says why."""


def record_spec(sweep: Sweep, trial: Trial) -> dict[str, Any]:
    """What the trial's records are checked against: its evaluations (default names resolved to the sweep
    and the trial) and its ``n_iters``. :func:`spec_of` includes it; planning over thousands of done trials
    needs only this much."""
    evaluations = [
        dataclasses.asdict(dataclasses.replace(
            ev,
            experiment_name=sweep.name if ev.experiment_name == "default" else ev.experiment_name,
            param_name=trial.id if ev.param_name == "default" else ev.param_name,
        ))
        for ev in sweep.evaluations
    ]  # fmt: skip
    return {"evaluations": evaluations, "n_iters": trial.overrides.get("training.n_iters", sweep.base.training.n_iters)}


def spec_of(sweep: Sweep, trial: Trial) -> dict[str, Any]:
    """The trial's spec: all a backend needs to pass, and all the trial needs to run."""
    r = sweep.resources
    return {
        "id": trial.id,
        "index": trial.index,
        "sweep": sweep.name,
        "sweep_file": str(sweep.path.resolve()),
        "cwd": str(Path.cwd().resolve()),
        "config": str(sweep.config.resolve()),
        "python_path": [str(p) for p in sweep.python_path],  # as `run` imported the config, on every backend
        "overrides": sweep.run_overrides(trial.overrides),
        "resolved_config": trial.resolved,  # what its id hashes: a later version of the trial is told apart by it
        "forward_source": trial.forward_source,
        "axes": list(trial.axes),
        **record_spec(sweep, trial),
        "resources": r.model_dump(),
        "world_size": r.world_size,
        "max_requeues": sweep.slurm.max_requeues,
        "runs_dir": str(sweep.runs_dir.resolve()),
    }


def write_spec(sweep: Sweep, trial: Trial) -> None:
    """Create (or refresh) a trial's run directory with its spec."""
    spec = spec_of(sweep, trial)
    path = trial.run_dir / state.SPEC
    if state.read(path) != json.loads(json.dumps(spec, default=str)):
        write_json(path, spec)


@contextmanager
def signals_preempt() -> Iterator[None]:
    """Outside the training loop, a stop signal ends the trial as preempted instead of killing it mid-write.

    Only the main thread can install handlers; a trial that runs in a thread (a Ray Tune function
    trainable) is stopped by its scheduler instead, so there it is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    stopping: list[int] = []

    def handler(signum, frame):
        if stopping:  # a second stop signal (the launcher and `cancel` both send one) while recording the first
            return
        stopping.append(signum)
        raise Preempted(f"signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|KEY|AUTH|COOKIE", re.IGNORECASE)
ENV_RECORDED = ("VIRTUAL_ENV", "CONDA_DEFAULT_ENV", "LOADEDMODULES", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_NODELIST",
                "SLURM_RESTART_COUNT")  # fmt: skip


def job_environment() -> dict[str, str]:
    """What the job's environment set up (``slurm.setup`` lines, modules, venv): recorded in status.json.

    An allow-list: ``ENV_RECORDED`` and ``LINTRANS_*`` (so a setup line can leave a mark the status
    shows), never a name that looks like a secret (``*_TOKEN``, ``*_KEY``, ``*SECRET*``, ...): tracker
    and cloud credentials live in the environment, and run folders are shared.
    """
    keep = {k: v for k, v in os.environ.items()
            if (k in ENV_RECORDED or k.startswith("LINTRANS_")) and not SECRET_NAME.search(k)}  # fmt: skip
    return {"python": sys.executable, **dict(sorted(keep.items()))}


def failure(exc: BaseException) -> tuple[str, bool]:
    """The reason a trial failed, and whether running it again could help."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if disk_full(exc):  # free space, then `run` resumes from the last checkpoint that was written
        where = getattr(exc, "filename", None)
        return f"no space left on device ({where or 'a write of the trial'})", True
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return f"out of memory: {text}".rstrip(": "), True
    if isinstance(exc, NonFiniteLossError):
        return text, False
    if isinstance(exc, UsageError):
        return text, False
    return f"{type(exc).__name__}: {text}".rstrip(": "), True


def run_trial(trial_dir: str | Path, backend: str = "local", report: Callable | None = None) -> int:
    """Run one trial to completion (or preemption); see the module docstring for exit codes.

    The process keeps the memory of freed tensors for the next ones (:func:`keep_freed_memory`), as
    ``train.py`` does; a backend that runs trials in its own process (foreground) holds their peak.
    """
    keep_freed_memory()
    trial_dir = Path(trial_dir).resolve()
    spec = state.spec(trial_dir)
    if not spec:
        if trial_dir.is_dir():
            state.write_status(trial_dir, "failed", reason=f"{state.SPEC} is missing or unreadable", resumable=False)
        raise UsageError(f"no trial spec: {trial_dir / state.SPEC} is missing or unreadable")
    os.chdir(spec["cwd"])  # relative paths inside a config (data folders) mean what they meant where `run` ran
    os.environ[records.RUNS_ENV] = spec["runs_dir"]  # IHDM-style evaluation summaries beside the sweep
    if rank() != 0:  # other ranks only train; rank 0 owns state, records and evaluations
        return _train_only(spec, trial_dir)
    lock = state.trial_lock(trial_dir)
    if not lock.acquire():
        print(f"trial {spec['id']} is already running (lock held): {trial_dir}", flush=True)
        return EXIT_BUSY
    try:
        with signals_preempt():  # outside the training loop a stop signal ends the trial cleanly, as preempted
            return _run_locked(spec, trial_dir, backend, report)
    finally:
        lock.release()


def _train_only(spec: dict, trial_dir: Path) -> int:
    from lintrans.training_loop import train

    config = cfg.load(spec["config"], spec["overrides"], spec.get("python_path", ()))
    try:
        return train(config, trial_dir, config_file=spec["config"], overrides=spec["overrides"])
    except (NonFiniteLossError, UsageError):
        return EXIT_FAILED


def _run_locked(spec: dict, trial_dir: Path, backend: str, report: Callable | None) -> int:
    from lintrans import distributed  # torch: imported by the trial only, never by a launcher that reads state
    from lintrans.run import Run
    from lintrans.training_loop import train

    previous = state.status(trial_dir)
    if previous.get("state") == "stopped":
        print(f"trial {spec['id']} was stopped ({previous.get('reason')}); not resumed", flush=True)
        return 0
    attempt = previous.get("attempt", 0) + 1
    wall = previous.get("wall_s", 0.0)
    preemptions = previous.get("preemptions", 0)
    common = {"attempt": attempt, "backend": backend, "job_id": job_id(), "wall_s": wall, "preemptions": preemptions}
    started = time.time()
    phase = "starting"

    def finish(st: str, **fields: Any) -> None:
        state.write_status(trial_dir, st, **{**common, "wall_s": wall + time.time() - started, **fields})

    if previous.get("state") == "preempted" and preemptions > spec.get("max_requeues", 3):
        finish("failed", reason=f"requeue limit reached ({preemptions} preemptions, slurm.max_requeues="
                                f"{spec.get('max_requeues', 3)})", resumable=False)  # fmt: skip
        return EXIT_FAILED
    try:
        config = cfg.load(spec["config"], spec["overrides"], spec.get("python_path", ()))
        if previous.get("state") == "done" and not evaluations_missing(trial_dir, spec):
            print(f"trial {spec['id']} is done: {trial_dir}", flush=True)
            return 0
        common.update(resumed_from=Run(trial_dir).step(), n_iters=config.training.n_iters)
        state.write_status(trial_dir, "running", step=common["resumed_from"], environment=job_environment(), **common)
        origin = common["resumed_from"]

        def progress(step: int, metrics: dict) -> None:
            elapsed = time.time() - started
            rate = (step - origin) / elapsed if elapsed > 0 and step > origin else None
            eta = (config.training.n_iters - step) / rate if rate else None
            shown = {k: v for k, v in metrics.items() if k in ("eval_loss", "train_loss", "img_per_s")}
            finish("running", step=step, eta_s=eta, **shown)
            if report is not None:
                report(step, metrics)

        phase = "training"
        code = train(config, trial_dir, config_file=spec["config"], overrides=spec["overrides"], report=progress,
                     label=trackers.Label(spec["sweep"], spec["id"]))  # fmt: skip
        if code == EXIT_PREEMPTED:
            finish(
                "preempted", step=Run(trial_dir).step(), preemptions=preemptions + 1, reason="signal during training"
            )
            return EXIT_PREEMPTED
        from lintrans.evaluation import evaluate

        phase = "evaluating"
        for ev in evaluations_missing(trial_dir, spec):
            finish("running", step=config.training.n_iters, evaluating=f"{ev.mode} ({ev.param_name})")
            evaluate(trial_dir, ev)
        write_summary(trial_dir, spec, "done")
        finish("done", step=config.training.n_iters, evaluating=None, eta_s=None)
        print(f"trial {spec['id']} done: {trial_dir}", flush=True)
        return 0
    except Preempted as exc:
        finish("preempted", preemptions=preemptions + 1, reason=f"{exc} while {phase}", evaluating=None)
        return EXIT_PREEMPTED
    except Stopped as exc:
        finish("stopped", reason=str(exc), step=state.status(trial_dir).get("step"), resumable=False)
        summary_after(trial_dir, spec, "stopped")
        return 0
    except Exception as exc:  # noqa: BLE001 - a failed trial is recorded, never fatal to the sweep
        if not isinstance(exc, UsageError):
            traceback.print_exc()
        reason, resumable = failure(exc)
        print(f"trial {spec['id']} failed: {reason}", file=sys.stderr, flush=True)
        finish("failed", reason=reason, resumable=resumable, evaluating=None)
        summary_after(trial_dir, spec, "failed")
        return EXIT_FAILED
    finally:
        distributed.cleanup()


def record_crash(trial_dir: Path, returncode: int, asked_to_stop: bool = False) -> str | None:
    """After the trial process ended: if it never recorded an ending, record it failed with how it ended.

    Called by the parent that watched it (the local launcher, or the SLURM task's submitit
    process), which knows the exit status. Returns how it crashed (``"killed by SIGKILL"``), or None.
    ``asked_to_stop``: the parent sent it SIGTERM itself (Ctrl-C, ``cancel``); a trial killed by that
    signal before it could install its handler (during start-up) was interrupted, not failed.
    """
    st, ln = state.status(trial_dir), state.launch(trial_dir)
    answered = st.get("updated", "") >= ln.get("submitted", "")  # the trial wrote since it was started
    if (answered and st.get("state") != "running") or state.is_running(trial_dir):
        return None
    how = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit {returncode}"
    if asked_to_stop and returncode == -signal.SIGTERM:
        state.write_status(trial_dir, "preempted", reason="stopped by SIGTERM during start-up", resumable=True)
        return None
    hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if returncode == -signal.SIGKILL else ""
    state.write_status(trial_dir, "failed", reason=f"trial process {how}{hint} without recording a state",
                       resumable=True)  # fmt: skip
    return how


def write_summary(trial_dir: Path, spec: dict, ended: str) -> None:
    """The trial's overrides and final metrics (every evaluation metric, ``eval_loss``, ``state``) into its
    trackers: TensorBoard HParams in the trial's own run, so ``tensorboard --logdir runs/sweeps/<sweep>``
    shows the sweep as a table, failed and stopped trials beside the done ones."""
    st = state.status(trial_dir)
    metrics = {**records.metrics(trial_dir), "eval_loss": st.get("eval_loss"), "state": STATE_METRIC[ended]}
    trackers.summarise(trial_dir, spec["overrides"], metrics, st.get("step") or 0)


def summary_after(trial_dir: Path, spec: dict, ended: str) -> None:
    """:func:`write_summary` once the state is recorded: a tracker that fails now is a warning, not a new state."""
    try:
        write_summary(trial_dir, spec, ended)
    except Exception as exc:  # noqa: BLE001 - the trial has ended; its state and records stand
        print(f"warning: trial {spec['id']}: no tracker summary: {type(exc).__name__}: {exc}", file=sys.stderr)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m launchers.trial TRIAL_DIR", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run_trial(argv[1], backend=os.environ.get("LINTRANS_BACKEND", "local"))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main(sys.argv))
