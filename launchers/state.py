"""Per-trial files: the spec, the trial's own status, the launcher's note, and locks.

Files in a trial's run directory, each written atomically by one owner:

* ``trial.json``: the spec (base config, overrides, evaluations, resources), written by ``run``;
* ``status.json``: the trial process's own account (running, preempted, stopped, failed with a
  reason, done; step, attempt, evaluations recorded), written by :mod:`launchers.trial`;
* ``launch.json``: the backend, job id and log of the latest submission, written by the backend;
* ``.lock``: held (``flock``) by the process running the trial.

:func:`launchers.status.view` merges them with what the scheduler says (:class:`Observation`)
into what a user sees.
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
from lintrans.errors import UsageError
from lintrans.procenv import process_start

SPEC, STATUS, LAUNCH, LOCK = "trial.json", "status.json", "launch.json", ".lock"
ARCHIVED = ".old-"  # ``<id>.old-N``: a trial's folder that ``rerun --from-scratch`` set aside

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
        return _unreadable(path, str(exc))
    if not isinstance(data, dict):
        return _unreadable(path, "not a JSON object")
    return data


_warned: set[Path] = set()  # a command reads a file several times; it says once that it is damaged


def _unreadable(path: Path, why: str) -> Unreadable:
    if path not in _warned:
        _warned.add(path)
        log.warning("unreadable %s: %s", path, why)
    return Unreadable()


def spec(trial_dir: Path) -> dict[str, Any]:
    return read(trial_dir / SPEC)


def trial_folders(sweep_dir: Path, skip: frozenset[str] = frozenset()) -> list[tuple[Path, dict[str, Any]]]:
    """Every trial folder under a sweep folder with its spec, by name, except the folders named in
    ``skip`` and those set aside by ``rerun --from-scratch``; a damaged spec is a warning (:func:`read`
    says it once), not a row."""
    out = []
    for spec_path in sorted(sweep_dir.glob(f"*/{SPEC}")):
        name = spec_path.parent.name
        if name not in skip and ARCHIVED not in name and (found := read(spec_path)):
            out.append((spec_path.parent, found))
    return out


def set_aside(trial_dir: Path) -> Path:
    """Rename a trial's folder to ``<id>.old-N``, N the first free number: ``rerun --from-scratch``
    keeps what it discards, and nothing reads it as the trial's again (:func:`trial_folders`)."""
    n = 1
    while (kept := trial_dir.with_name(f"{trial_dir.name}{ARCHIVED}{n}")).exists():
        n += 1
    trial_dir.rename(kept)
    return kept


def status(trial_dir: Path) -> dict[str, Any]:
    return read(trial_dir / STATUS)


def launch(trial_dir: Path) -> dict[str, Any]:
    return read(trial_dir / LAUNCH)


def write_status(trial_dir: Path, state: str, **fields: Any) -> dict[str, Any]:
    """The trial's own status; ``reason`` is kept only for failed/stopped states."""
    previous = status(trial_dir)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid())}
    record = {**previous, **fields, "state": state, "updated": now(), **me}
    if state not in ("failed", "stopped", "preempted") and "reason" not in fields:
        record.pop("reason", None)
    write_json(trial_dir / STATUS, record)
    return record


def write_launch(trial_dir: Path, backend: str, job_id: str | None, log_path: str | None, **extra: Any) -> None:
    write_json(trial_dir / LAUNCH, {"backend": backend, "job_id": job_id, "log": log_path, "submitted": now(), **extra})


def check_writable(folder: Path, what: str) -> None:
    """Refuse, in one line, a folder that ``run`` could not write into (a file, or no write permission).

    It may not exist yet: then its nearest existing parent must be a writable folder.
    """
    at = folder
    try:
        while not at.exists() and at != at.parent:
            at = at.parent
    except PermissionError:
        raise UsageError(f"{what} {folder} is not reachable by this user ({at}: permission denied)") from None
    if not at.is_dir():
        raise UsageError(f"{what} {folder} cannot be created: {at} is a file, not a folder")
    if not os.access(at, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {folder} is not writable by this user ({at}: permission denied)")


def mark_launch(trial_dir: Path, event: str) -> None:
    """Stamp the trial's current launch with the time of ``event`` (nothing when it has no launch).

    ``cancelled``: ``lintrans cancel`` asked this launch to stop, so its job ending CANCELLED is no failure.
    ``driver_ended``: the driver that watched the launch has returned, so the scheduler's last saved
    account of it (Tune's experiment state, written on its own clock) is final, whatever it says.
    """
    ln = launch(trial_dir)
    if ln:
        write_json(trial_dir / LAUNCH, {**ln, event: now()})


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
        """True while another process holds the lock (works after the launcher is gone).

        Asked through a read-only descriptor (``flock`` needs no write access), so ``status`` works
        on a runs folder it may not write: a colleague's, or an archived study.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing releases a lock taken here
        return False


def trial_lock(trial_dir: Path) -> Lock:
    return Lock(trial_dir / LOCK)


def is_running(trial_dir: Path) -> bool:
    return trial_lock(trial_dir).held_elsewhere()


# --------------------------------------------------------------------------- what a scheduler says


@dataclass(frozen=True)
class Observation:
    """What a scheduler says about a trial's latest job: queued, running, or ended (with its state)."""

    phase: str  # "queued", "running" or "ended"
    detail: str  # e.g. "PENDING (ReqNodeNotAvail)", "NODE_FAIL", "OUT_OF_MEMORY (exit 0:137)"
