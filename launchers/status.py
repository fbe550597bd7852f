"""What each trial of a sweep is, as a user sees it: the one place that reads trials for a command.

A command builds the views once (:func:`views`): each trial's files (:mod:`launchers.state`), its
lock, and what the scheduler that launched it says (:func:`observe`, one backend at a time), merged
into a :class:`TrialView` whose state is one of ``pending, written, queued, running, preempted,
stopped, failed, done`` (*written*: an sbatch script nobody submitted yet); a trial whose process
or job ended without saying so is *failed*, with the scheduler's account as its reason. A run
folder that no trial of the current file owns but that has a trial's axis values and seed ran an
older version of it (an edited config or forward process): it is *stale* (:func:`stale`), shown
with the keys that differ; its trial, under its new id, is a trial like any other. From the
views, :func:`plan` says what ``run`` does with each trial, :func:`print_trials` prints the table
of ``status`` (and of ``run --dry-run``), and :func:`report_failures` the failed ones. ``run``,
``status``, ``cancel``, ``table`` and the Optuna driver (:mod:`launchers.search`) all go through
here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launchers import backends, state
from launchers.state import Observation
from launchers.sweep import Sweep, Trial, short
from launchers.trial_records import evaluations_missing, records_complete
from lintrans import config as cfg
from lintrans.errors import UsageError

STATES = ("pending", "written", "queued", "running", "preempted", "stopped", "failed", "done")
FINAL = ("done", "failed", "stopped")
# How a job ends when something went wrong (a job that ends COMPLETED did what its trial said).
# Job ends after which nothing resumes the trial by itself; VANISHED: it left the queue and no accounting
# says how (launchers.backends.slurm.accounting).
ABNORMAL_ENDS = ("CANCELLED", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "BOOT_FAIL", "DEADLINE", "PREEMPTED",
                 "VANISHED")  # fmt: skip
SUBMITTED = ("submit", "resume", "evaluate")  # the plans that submit a trial


@dataclass(frozen=True)
class TrialView:
    """One trial as a user sees it."""

    state: str  # one of STATES
    reason: str | None  # why it failed or stopped, or why it waits
    step: int | None
    n_iters: int | None
    eta_s: float | None  # while running
    attempt: int
    resumable: bool  # False for failures a re-run cannot fix by itself, and for early-stopped trials
    backend: str | None
    job_id: str | None
    log: str | None
    updated: str | None
    wall_s: float | None


def view(trial_dir: Path, observation: Observation | None = None) -> TrialView:
    """The state a user sees, reconciling the trial's files, its lock and the scheduler's account."""
    st, ln = state.status(trial_dir), state.launch(trial_dir)
    now, reason = st.get("state", "pending"), st.get("reason")
    if isinstance(st, state.Unreadable) and not state.is_running(trial_dir):
        if records_complete(trial_dir, state.spec(trial_dir)):
            # status.json is damaged but every record is there: the records decide, and a damaged file
            # has no time to compare the launch or the scheduler's account with.
            return _view(st, ln, "done", None)
    unanswered = bool(ln) and ln.get("submitted", "") > st.get("updated", "")  # a launch the trial has not seen
    scheduler_holds = observation is not None and observation.phase in ("queued", "running")
    ended = observation.detail if observation is not None and observation.phase == "ended" else None
    job = f"{ln.get('backend', '')} job {ln.get('job_id')}"
    if state.is_running(trial_dir):
        now, reason = "running", None
    elif scheduler_holds and ln.get("cancelled") and now != "running":
        # A job we cancelled is on its way out (COMPLETING, say): the scheduler holds it, but it will
        # not run the trial again, so `run` may resume the trial at once.
        reason = "; ".join(x for x in (reason, f"cancelled; {job} still ending ({observation.detail})") if x)
    elif scheduler_holds and (unanswered or now not in FINAL or (now == "failed" and st.get("resumable", True))):
        # A job the scheduler holds again (requeued after NODE_FAIL, say) runs the trial again.
        now, reason = observation.phase, observation.detail if observation.phase == "queued" else None
    elif unanswered and ln.get("cancelled"):
        # Cancelled before it started (a pending array task: sacct lists it in a range record such as
        # 5_[1-2%1]): nothing ran and nothing failed; the next `run` starts it.
        return _view(st, ln, "stopped", f"cancelled before it started ({job})", resumable=True)
    elif unanswered and ln.get("script"):
        now, reason = "written", f"not submitted yet; submit with: sbatch {ln['script']}"
    elif unanswered and ended:
        said = job_said(ln.get("log"))  # the job script's own word: a setup line, a missing interpreter
        now, reason = "failed", f"{job} ended {ended} before the trial started" + (f": {said}" if said else "")
    elif unanswered and observation is None:
        now, reason = "queued", None  # submitted; nobody asked the scheduler
    elif now == "preempted" and ended and ended.split()[0] in ABNORMAL_ENDS and not ln.get("cancelled"):
        # It checkpointed on a signal, but nobody asked for it and its job is over: it will not resume by itself.
        now, reason = "failed", f"{job} ended {ended} after the trial stopped ({reason}); run again to resume"
    elif now == "running":
        # The trial said it was running, yet nothing holds its lock: its process died without a word.
        now = "failed"
        reason = (f"{job} ended {ended} without the trial recording a state" if ended
                  else f"process {st.get('pid')} on {st.get('host')} died without recording a state")  # fmt: skip
    return _view(st, ln, now, reason)


def job_said(log: str | None) -> str | None:
    """The last ``lintrans: ...`` line of a job's log (its tail): why the job script stopped before the trial."""
    try:
        with open(log or "", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    said = [line.removeprefix("lintrans: ") for line in tail.splitlines() if line.startswith("lintrans: ")]
    return said[-1].strip() if said else None


def _view(st: dict, ln: dict, now: str, reason: str | None, resumable: bool | None = None) -> TrialView:
    return TrialView(
        state=now,
        reason=reason,
        step=st.get("step"),
        n_iters=st.get("n_iters"),
        eta_s=st.get("eta_s") if now == "running" else None,
        attempt=st.get("attempt", 0),
        resumable=st.get("resumable", True) if resumable is None else resumable,
        backend=ln.get("backend") or st.get("backend"),
        job_id=st.get("job_id") or ln.get("job_id"),
        log=ln.get("log"),
        updated=st.get("updated"),
        wall_s=st.get("wall_s"),
    )


def launched_by(trials: list[Trial]) -> dict[str | None, list[Trial]]:
    """The trials grouped by the backend of their latest launch (None: never launched)."""
    out: dict[str | None, list[Trial]] = {}
    for t in trials:
        out.setdefault(state.launch(t.run_dir).get("backend"), []).append(t)
    return out


def observe(trials: list[Trial], strict: bool = False) -> dict[str, Observation]:
    """What each trial's scheduler says, asking each backend about the trials it launched.

    ``status`` and ``table`` still answer from the run directories when a scheduler cannot be
    asked (with a warning); ``run`` (``strict``) stops, since it would act on a guess.
    """
    out: dict[str, Observation] = {}
    for name, group in launched_by(trials).items():
        if name not in backends.NAMES:
            continue
        try:
            out.update(backends.get(name).observe(group))
        except UsageError as exc:
            if strict:
                raise
            logging.warning("%s; states below are from the run directories only", exc)
    return out


def views(trials: list[Trial], observations: dict[str, Observation] | None = None) -> dict[str, TrialView]:
    """Every trial's view, by id; ``observations`` from :func:`observe` (None: the run directories only)."""
    observations = observations or {}
    return {t.id: view(t.run_dir, observations.get(t.id)) for t in trials}


@dataclass(frozen=True)
class Other:
    """A run folder of the sweep that no trial of the current file owns: an older version of the sweep's trials."""

    folder: Path
    spec: dict[str, Any]
    of: Trial | None  # the current trial with the same axis values and seed: this folder is a stale version of it
    differs: dict[str, tuple[Any, Any]] | None  # key -> (its value, the current trial's); None: it recorded none


FORWARD_SOURCE = "forward process source"  # what ``differs`` names when a user's forward process was edited


def others(sweep: Sweep, trials: list[Trial]) -> list[Other]:
    """The sweep's run folders that no trial owns, each with the trial it is an older version of (the
    one with its axis values and seed) and what differs between what it ran and what that trial runs."""
    keys = (*sweep.axes, "seed")

    def values(overrides: dict[str, Any]) -> str:
        return json.dumps([overrides.get(k) for k in keys], default=str)

    current = {values(t.overrides): t for t in trials}
    out = []
    for folder, spec in state.trial_folders(sweep.dir, frozenset(t.run_dir.name for t in trials)):
        of = current.get(values(spec.get("overrides", {})))
        # What it ran: its spec's record, else (a folder of the earlier id scheme) its trainer's config.json.
        ran = spec.get("resolved_config") or state.read(folder / cfg.RUN_CONFIG)
        differs = None
        if of is not None and ran:
            differs = _changes(cfg.identity(ran), cfg.identity(of.resolved))
            if "resolved_config" in spec and spec.get("forward_source") != of.forward_source:
                differs[FORWARD_SOURCE] = (spec.get("forward_source"), of.forward_source)  # the two digests
        out.append(Other(folder, spec, of, differs))
    return out


def _changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """The dotted keys whose values differ between two nested configs, with both values (absent: None)."""
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            out[f"{prefix}{key}"] = (a, b)
    return out


def stale(sweep: Sweep, trials: list[Trial]) -> list[Other]:
    """The folders ``status`` shows as ``stale``: older versions of a trial of the current file."""
    return [o for o in others(sweep, trials) if o.of is not None]


def describe(other: Other) -> str:
    """What ``status`` says of a stale folder: whose older version it is, and what changed since."""
    if other.differs is None:
        return f"older version of {other.of.id} (it recorded no config)"
    if not other.differs:  # named by the earlier id scheme beside its trial's current folder, say
        return f"older version of {other.of.id}; no recorded key differs"
    shown = [k if k == FORWARD_SOURCE else f"{k} {short(a)}→{short(b)}" for k, (a, b) in other.differs.items()]
    more = f" and {len(shown) - 3} more" if len(shown) > 3 else ""
    return f"older version of {other.of.id}; differs: {', '.join(shown[:3])}{more}"


def plan(
    sweep: Sweep | None,
    trials: list[Trial],
    seen: dict[str, TrialView],
    retry_failed: bool = False,
    resume_stopped: bool = False,
) -> dict[str, str]:
    """What ``run`` does with each trial: ``submit``, ``resume``, ``evaluate``, or ``skip (why)``.

    A done trial is evaluated again when the sweep file now asks for an evaluation it has no record
    of (one added to ``evaluations:``): from its checkpoint, without training. Only done trials need
    ``sweep``.
    """
    from launchers.trial import record_spec

    out = {}
    for t in trials:
        st = seen[t.id]
        if st.state == "done":
            out[t.id] = "evaluate" if evaluations_missing(t.run_dir, record_spec(sweep, t)) else "skip (done)"
        elif st.state in ("written", "queued", "running"):
            out[t.id] = f"skip ({st.state})"
        elif st.state == "stopped" and not st.resumable and not resume_stopped:
            out[t.id] = "skip (stopped; --resume-stopped resumes it)"
        elif st.state == "failed" and not st.resumable and not retry_failed:
            out[t.id] = "skip (failed; --retry-failed re-runs it)"
        else:
            out[t.id] = "submit" if st.state == "pending" else "resume"
    return out


def print_trials(
    sweep: Sweep,
    trials: list[Trial],
    seen: dict[str, TrialView],
    planned: dict[str, str] | None = None,
    stale_folders: Sequence[Other] = (),
) -> None:
    """The table of ``status``: one line per trial, one per stale folder, then the count in each state."""
    width = max((len(t.label) for t in trials), default=10)
    print(f"{'trial':<10}  {'values':<{width}}  {'state':<9} {'step':>13} {'eta':>6} {'try':>3}  job / log / reason")
    counts: dict[str, int] = {}
    for t in trials:
        st = seen[t.id]
        counts[st.state] = counts.get(st.state, 0) + 1
        note = st.reason or " ".join(str(x) for x in (st.backend, st.job_id, st.log) if x)
        if planned:
            note = f"{planned[t.id]}  {note}".strip()
        step = "" if st.step is None else f"{st.step}/{st.n_iters}" if st.n_iters else st.step
        eta = duration(st.eta_s) if st.eta_s else ""
        print(f"{t.id:<10}  {t.label:<{width}}  {st.state:<9} {step!s:>13} {eta:>6} {st.attempt:>3}  {note}")
    for o in stale_folders:
        print(f"{o.folder.name:<10}  {o.of.label:<{width}}  {'stale':<9} {'':>13} {'':>6} {'':>3}  {describe(o)}")
    total = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    old = f"; {plural(len(stale_folders), 'stale folder')} (table --include-stale)" if stale_folders else ""
    print(f"sweep {sweep.name}: {plural(len(trials), 'trial')} ({total}){old}")


def as_json(trials: list[Trial], seen: dict[str, TrialView], stale_folders: Sequence[Other] = ()) -> str:
    """``status --format json``: every trial's view with its values in full (the table shortens them),
    then each stale folder with the trial it is an older version of and every differing key."""
    rows = [{"trial": t.id, "values": t.overrides, **dataclasses.asdict(seen[t.id])} for t in trials]
    rows += [{"trial": o.folder.name, "values": o.spec.get("overrides", {}), "state": "stale", "stale_of": o.of.id,
              "differs": o.differs} for o in stale_folders]  # fmt: skip
    return json.dumps(rows, indent=1, default=str)


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}" if s >= 3600 else f"{s // 60}m{s % 60:02d}" if s >= 60 else f"{s}s"


def report_failures(trials: list[Trial], seen: dict[str, TrialView]) -> list[Trial]:
    """Print each failed trial with its reason (stderr); the failed trials."""
    failed = [t for t in trials if seen[t.id].state == "failed"]
    for t in failed:
        print(f"failed  {t.id} {t.label}: {seen[t.id].reason}", file=sys.stderr)
    return failed
