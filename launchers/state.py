"""Per-trial state: the spec, the trial's own status, the launcher's note, locks, and what a user sees.

Files in a trial's run directory, each written atomically by one owner:

* ``trial.json``: the spec (base config, overrides, evaluations, resources), written by ``run``;
* ``status.json``: the trial process's own account (running, preempted, stopped, failed with a
  reason, done; step, attempt, evaluations recorded), written by :mod:`launchers.trial`;
* ``launch.json``: the backend, job id and log of the latest submission, written by the backend;
* ``.lock``: held (``flock``) by the process running the trial.

:func:`view` merges them with what the scheduler says (:class:`Observation`) into one of
``pending, queued, running, preempted, stopped, failed, done``: a trial whose process or job
ended without saying so is *failed*, with the scheduler's account as its reason.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lintrans.atomic import write_json

SPEC, STATUS, LAUNCH, LOCK = "trial.json", "status.json", "launch.json", ".lock"
STATES = ("pending", "queued", "running", "preempted", "stopped", "failed", "done")
FINAL = ("done", "failed", "stopped")
# How a job ends when something went wrong (a job that ends COMPLETED did what its trial said).
ABNORMAL_ENDS = ("CANCELLED", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "BOOT_FAIL", "DEADLINE", "PREEMPTED")

log = logging.getLogger(__name__)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


class Unreadable(dict):
    """An empty dict standing for a file that exists but cannot be parsed (truncated, garbage)."""


def read(path: Path) -> dict[str, Any]:
    """A JSON object; ``{}`` when missing; :class:`Unreadable` (falsy, with a warning) when damaged."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("unreadable %s: %s", path, exc)
        return Unreadable()
    if not isinstance(data, dict):
        log.warning("unreadable %s: not a JSON object", path)
        return Unreadable()
    return data


def spec(trial_dir: Path) -> dict[str, Any]:
    return read(trial_dir / SPEC)


def status(trial_dir: Path) -> dict[str, Any]:
    return read(trial_dir / STATUS)


def launch(trial_dir: Path) -> dict[str, Any]:
    return read(trial_dir / LAUNCH)


def write_status(trial_dir: Path, state: str, **fields: Any) -> dict[str, Any]:
    """The trial's own status; ``reason`` is kept only for failed/stopped states."""
    previous = status(trial_dir)
    record = {**previous, **fields, "state": state, "updated": now(), "host": socket.gethostname(), "pid": os.getpid()}
    if state not in ("failed", "stopped", "preempted") and "reason" not in fields:
        record.pop("reason", None)
    write_json(trial_dir / STATUS, record)
    return record


def write_launch(trial_dir: Path, backend: str, job_id: str | None, log_path: str | None, **extra: Any) -> None:
    write_json(trial_dir / LAUNCH, {"backend": backend, "job_id": job_id, "log": log_path, "submitted": now(), **extra})


def mark_cancelled(trial_dir: Path) -> None:
    """``lintrans cancel`` asked this launch to stop: its job ending CANCELLED is no failure."""
    ln = launch(trial_dir)
    if ln:
        write_json(trial_dir / LAUNCH, {**ln, "cancelled": now()})


# --------------------------------------------------------------------------- locks


class Lock:
    """An exclusive ``flock`` on a file: two processes never hold it at once; it dies with its holder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, block: bool = False) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            return False
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def held_elsewhere(self) -> bool:
        """True while another process holds the lock (works after the launcher is gone)."""
        if not self.path.exists():
            return False
        if self.acquire():
            self.release()
            return False
        return True


def trial_lock(trial_dir: Path) -> Lock:
    return Lock(trial_dir / LOCK)


def is_running(trial_dir: Path) -> bool:
    return trial_lock(trial_dir).held_elsewhere()


# --------------------------------------------------------------------------- what a user sees


@dataclass(frozen=True)
class Observation:
    """What a scheduler says about a trial's latest job: queued, running, or ended (with its state)."""

    phase: str  # "queued", "running" or "ended"
    detail: str  # e.g. "PENDING (ReqNodeNotAvail)", "NODE_FAIL", "OUT_OF_MEMORY (exit 0:137)"


def records_complete(trial_dir: Path, spec_: dict[str, Any]) -> bool:
    """Every evaluation of the spec has its record at the final step: the trial is done, whatever status.json says."""
    from launchers.trial import evaluations_missing

    return bool(spec_) and not evaluations_missing(trial_dir, spec_)


def view(trial_dir: Path, observation: Observation | None = None) -> dict[str, Any]:
    """The state a user sees, reconciling the trial's files, its lock and the scheduler's account."""
    st, ln = status(trial_dir), launch(trial_dir)
    state, reason = st.get("state", "pending"), st.get("reason")
    if isinstance(st, Unreadable) and records_complete(trial_dir, spec(trial_dir)):
        state, reason = "done", None  # status.json damaged, but every record is there
    unanswered = bool(ln) and ln.get("submitted", "") > st.get("updated", "")  # a launch the trial has not seen
    scheduler_holds = observation is not None and observation.phase in ("queued", "running")
    ended = observation.detail if observation is not None and observation.phase == "ended" else None
    job = f"{ln.get('backend', '')} job {ln.get('job_id')}"
    if is_running(trial_dir):
        state, reason = "running", None
    elif scheduler_holds and ln.get("cancelled") and state != "running":
        # A job we cancelled is on its way out (COMPLETING, say): the scheduler holds it, but it will
        # not run the trial again, so `run` may resume the trial at once.
        reason = "; ".join(x for x in (reason, f"cancelled; {job} still ending ({observation.detail})") if x)
    elif scheduler_holds and (unanswered or state not in FINAL or (state == "failed" and st.get("resumable", True))):
        # A job the scheduler holds again (requeued after NODE_FAIL, say) runs the trial again.
        state, reason = observation.phase, observation.detail if observation.phase == "queued" else None
    elif unanswered and ln.get("script"):
        state, reason = "queued", f"sbatch script written, not submitted: {ln['script']}"
    elif unanswered and ended:
        state, reason = "failed", f"{job} ended {ended} before the trial started"
    elif unanswered and observation is None:
        state, reason = "queued", None  # submitted; nobody asked the scheduler
    elif state == "preempted" and ended and ended.split()[0] in ABNORMAL_ENDS and not ln.get("cancelled"):
        # It checkpointed on a signal, but nobody asked for it and its job is over: it will not resume by itself.
        state, reason = "failed", f"{job} ended {ended} after the trial stopped ({reason}); run again to resume"
    elif state == "running":
        # The trial said it was running, yet nothing holds its lock: its process died without a word.
        state = "failed"
        reason = (f"{job} ended {ended} without the trial recording a state" if ended
                  else f"process {st.get('pid')} on {st.get('host')} died without recording a state")  # fmt: skip
    return {
        "state": state,
        "reason": reason,
        "step": st.get("step"),
        "n_iters": st.get("n_iters"),
        "eta_s": st.get("eta_s") if state == "running" else None,
        "attempt": st.get("attempt", 0),
        "resumable": st.get("resumable", True),
        "backend": ln.get("backend") or st.get("backend"),
        "job_id": st.get("job_id") or ln.get("job_id"),
        "log": ln.get("log"),
        "updated": st.get("updated"),
        "wall_s": st.get("wall_s"),
    }
