"""Per-trial state files, written atomically, readable after the launching shell is gone.

Two writers never share a file: the trial process owns ``status.json`` (running, preempted,
failed with a reason, done) and the launcher owns ``launch.json`` (backend, job id, log path,
submission time). :func:`summary` merges them into the state a user sees.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path
from typing import Any

from lintrans.atomic import write_json

STATES = ("pending", "submitted", "running", "preempted", "failed", "done")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def status(trial_dir: Path) -> dict[str, Any]:
    return read(trial_dir / "status.json")


def launch(trial_dir: Path) -> dict[str, Any]:
    return read(trial_dir / "launch.json")


def write_status(trial_dir: Path, state: str, **fields: Any) -> dict[str, Any]:
    previous = status(trial_dir)
    record = {**previous, **fields, "state": state, "updated": now(), "host": socket.gethostname(), "pid": os.getpid()}
    if state != "failed":
        record.pop("reason", None)
    write_json(trial_dir / "status.json", record)
    return record


def write_launch(trial_dir: Path, backend: str, job_id: str | None, log: str | None) -> None:
    write_json(trial_dir / "launch.json", {"backend": backend, "job_id": job_id, "log": log, "submitted": now()})


def summary(trial_dir: Path) -> dict[str, Any]:
    """What ``status`` shows: the trial's own state, or 'submitted' when a newer launch is queued."""
    st, ln = status(trial_dir), launch(trial_dir)
    state = st.get("state", "pending")
    if ln and state in ("pending", "preempted", "failed") and ln.get("submitted", "") > st.get("updated", ""):
        state = "submitted"
    return {
        "state": state,
        "reason": st.get("reason"),
        "step": st.get("step"),
        "attempt": st.get("attempt", 0),
        "backend": ln.get("backend") or st.get("backend"),
        "job_id": st.get("job_id") or ln.get("job_id"),
        "log": ln.get("log"),
        "updated": st.get("updated"),
        "wall_s": st.get("wall_s"),
    }
