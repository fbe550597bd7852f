"""The one trial entry point every backend calls: train → evaluations → record.

    python -m launchers.trial runs/sweeps/<sweep>/<trial id>

A trial is a run directory holding ``trial.json`` (base config, overrides, evaluations). Running
it again resumes from ``checkpoints-meta`` and skips the evaluations already recorded; a finished
trial returns at once. Failures (exception, non-finite loss, out of memory, requeue limit) are
recorded with their reason in ``status.json`` instead of taking the sweep down. Under a
multi-process launcher (torchrun, srun with several tasks) every rank trains, and rank 0 alone
keeps the state and runs the evaluations.

Exit codes: 0 done, 1 failed (reason recorded), 2 bad trial spec, 73 the trial is already being
run by another process, 75 preempted (checkpoint written, requeue me).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launchers import state
from launchers.sweep import Sweep, Trial, apply_overrides, load_config
from lintrans import distributed
from lintrans.atomic import write_json
from lintrans.errors import EXIT_PREEMPTED, EXIT_USAGE, NonFiniteLossError, UsageError

EXIT_FAILED = 1
EXIT_BUSY = 73
SPEC = "trial.json"


def write_spec(sweep: Sweep, trial: Trial) -> None:
    """Create (or refresh) a trial's run directory; the spec is all a backend needs to pass."""
    spec = {
        "id": trial.id,
        "index": trial.index,
        "sweep": sweep.name,
        "sweep_file": str(sweep.path.resolve()),
        "cwd": str(Path.cwd().resolve()),
        "config": str(sweep.config.resolve()),
        "overrides": trial.overrides,
        "axes": list(sweep.axes),
        "evaluations": sweep.evaluations,
        "max_requeues": sweep.section("slurm").get("max_requeues", 3),
        "runs_dir": str(sweep.runs_dir.resolve()),
    }
    path = trial.run_dir / SPEC
    if state.read(path) != json.loads(json.dumps(spec, default=str)):
        write_json(path, spec)


def resolved_config(spec: dict[str, Any]):
    return apply_overrides(load_config(Path(spec["config"])), spec["overrides"])


def _rank() -> int:
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if key in os.environ and (key != "SLURM_PROCID" or int(os.environ.get("SLURM_NTASKS", "1")) > 1):
            return int(os.environ[key])
    return 0


def _job_id() -> str | None:
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


class TrialLock:
    """An exclusive ``flock`` on the run directory: two processes never train one trial."""

    def __init__(self, trial_dir: Path) -> None:
        self.fd = os.open(trial_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)

    def acquire(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        os.close(self.fd)


def is_running(trial_dir: Path) -> bool:
    """True while some process holds the trial's lock (works after the launcher is gone)."""
    if not (trial_dir / ".lock").exists():
        return False
    lock = TrialLock(trial_dir)
    try:
        return not lock.acquire()
    finally:
        lock.release()


def checkpoint_step(trial_dir: Path) -> int:
    """The step a (re)start resumes from: that of ``checkpoints-meta``, or 0."""
    import torch

    from lintrans.checkpoint import meta_path

    meta = meta_path(trial_dir)
    return int(torch.load(meta, map_location="cpu", weights_only=True, mmap=True)["step"]) if meta.is_file() else 0


def failure_reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return f"out of memory: {text}".rstrip(": ")
    if isinstance(exc, NonFiniteLossError):
        return text
    return f"{type(exc).__name__}: {text}".rstrip(": ")


def run_trial(trial_dir: str | Path, backend: str = "local", report: Callable | None = None) -> int:
    """Run one trial to completion (or preemption); see the module docstring for exit codes."""
    trial_dir = Path(trial_dir).resolve()
    spec = state.read(trial_dir / SPEC)
    if not spec:
        raise UsageError(f"no trial spec: {trial_dir / SPEC} is missing or unreadable")
    os.chdir(spec["cwd"])  # config files import configs.* relative to the launch directory
    os.environ["LINTRANS_RUNS_DIR"] = spec["runs_dir"]  # seed-style evaluation summaries beside the sweep
    if _rank() != 0:  # other ranks only train; rank 0 owns state, records and evaluations
        return _train_only(spec, trial_dir)
    lock = TrialLock(trial_dir)
    if not lock.acquire():
        print(f"trial {spec['id']} is already running (lock held): {trial_dir}", flush=True)
        return EXIT_BUSY
    try:
        return _run_locked(spec, trial_dir, backend, report)
    finally:
        lock.release()


def _train_only(spec: dict, trial_dir: Path) -> int:
    from lintrans.training_loop import train

    try:
        return train(resolved_config(spec), trial_dir)
    except NonFiniteLossError:
        return EXIT_FAILED


def _run_locked(spec: dict, trial_dir: Path, backend: str, report: Callable | None) -> int:
    from lintrans.training_loop import train

    previous = state.status(trial_dir)
    if previous.get("state") == "done":
        print(f"trial {spec['id']} is done: {trial_dir}", flush=True)
        return 0
    attempt = previous.get("attempt", 0) + 1
    wall = previous.get("wall_s", 0.0)
    common = {"attempt": attempt, "backend": backend, "job_id": _job_id(), "wall_s": wall}
    if attempt > 1 + spec.get("max_requeues", 3) and previous.get("state") == "preempted":
        state.write_status(trial_dir, "failed", reason=f"requeue limit reached ({attempt - 1} starts)", **common)
        return EXIT_FAILED
    common["resumed_from"] = checkpoint_step(trial_dir)
    state.write_status(trial_dir, "running", **common)
    started = time.time()

    def progress(step: int, metrics: dict) -> None:
        state.write_status(trial_dir, "running", step=step, **{**common, "wall_s": wall + time.time() - started})
        if report is not None:
            report(step, metrics)

    def finish(st: str, **fields: Any) -> None:
        state.write_status(trial_dir, st, **{**common, "wall_s": wall + time.time() - started, **fields})

    try:
        config = resolved_config(spec)
        code = train(config, trial_dir, report=progress)
        step = config.training.n_iters
        if code == EXIT_PREEMPTED:
            finish("preempted", step=state.status(trial_dir).get("step"))
            return EXIT_PREEMPTED
        done = list(previous.get("evaluations_done", []))
        for i, ev in enumerate(spec["evaluations"]):
            if i in done:
                continue
            from lintrans.evaluation import evaluate

            ev = {"experiment_name": spec["sweep"], "param_name": spec["id"], **ev}
            evaluate(config, trial_dir, mode=ev.pop("mode"), overrides=spec["overrides"], **ev)
            done.append(i)
            state.write_status(trial_dir, "running", evaluations_done=done, step=step, **common)
        write_hparams(trial_dir, spec, config)
        finish("done", step=step, evaluations_done=done)
        print(f"trial {spec['id']} done: {trial_dir}", flush=True)
        return 0
    except Exception as exc:  # noqa: BLE001 - a failed trial is recorded, never fatal to the sweep
        traceback.print_exc()
        finish("failed", reason=failure_reason(exc))
        return EXIT_FAILED
    finally:
        distributed.cleanup()


def write_hparams(trial_dir: Path, spec: dict, config) -> None:
    """TensorBoard HParams summary, so ``tensorboard --logdir runs/sweeps/<sweep>`` shows the sweep."""
    from torch.utils.tensorboard import SummaryWriter

    from launchers.table import trial_metrics

    hparams = {k: v for k, v in spec["overrides"].items() if isinstance(v, (int, float, str, bool))}
    metrics = {k: v for k, v in trial_metrics(trial_dir).items() if isinstance(v, (int, float))}
    with SummaryWriter(str(trial_dir / "tensorboard")) as writer:
        writer.add_hparams(hparams, metrics or {"done": 1.0}, run_name="hparams")


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
