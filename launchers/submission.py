"""``lintrans run``, ``rerun`` and ``cancel``: plan, submit, report, for all of a sweep or some of its trials.

``run`` submits what is not finished (:func:`launchers.status.plan`): done and stopped trials are
skipped (a done trial that the sweep file now asks for an evaluation it has no record of is
evaluated from its checkpoint, without training), preempted and crashed ones resume from their
checkpoints, trials still queued or running are left alone, failures that running again cannot fix
(bad input, non-finite loss) are reported and left (``--retry-failed`` re-runs them).
``rerun`` submits the trials a user names (by id, the failed ones, or those whose older version is
stale) through the same path, whatever ended them, from their checkpoints or (``--from-scratch``)
from nothing, their old folder kept as ``<id>.old-N``. A sweep holds a submission lock, so a second
``run`` or ``rerun`` of it waits, then sees the first one's trials. Adaptive searches go through
:mod:`launchers.search`; ``cancel`` asks each trial's backend to stop it.
"""

from __future__ import annotations

import argparse
import shlex
from collections import Counter

from launchers import backends, state, status, table
from launchers.backends import Backend
from launchers.sweep import Sweep, Trial
from launchers.trial import write_spec
from lintrans.errors import UsageError
from lintrans.procenv import EXIT_FAILED

ACTIVE = ("written", "queued", "running")  # a job holds the trial's folder: nothing moves it or submits it twice


def submission_lock(sweep: Sweep) -> state.Lock:
    """The sweep's submission lock, held (waiting for another ``run`` that holds it)."""
    lock = state.Lock(sweep.dir / ".submit.lock")
    if not lock.acquire():
        print(f"another `run` of sweep {sweep.name} holds its submission lock; waiting for it", flush=True)
        lock.acquire(block=True)
    return lock


def dry_run(sweep: Sweep, trials: list[Trial], backend: Backend) -> int:
    seen = status.views(trials)
    planned = status.plan(sweep, trials, seen)
    status.print_trials(sweep, trials, seen, planned, status.stale(sweep, trials))
    todo = [t for t in trials if planned[t.id] in status.SUBMITTED]
    print(backend.dry_run(sweep, todo))
    print(f"dry run: {len(todo)} of {status.plural(len(trials), 'trial')} would be submitted to {backend.name}")
    return 0


def run(sweep: Sweep, backend: Backend, args: argparse.Namespace) -> int:
    """Submit the trials that need it; 1 if a trial ended failed (0 with ``--allow-failures``)."""
    trials = sweep.trials()
    if args.dry_run:
        return dry_run(sweep, trials, backend)
    lock = submission_lock(sweep)
    try:
        seen = status.views(trials, status.observe(trials, strict=True))
        return _submit(sweep, trials, seen, backend, args, args.retry_failed, args.resume_stopped)
    finally:
        lock.release()


def select(sweep: Sweep, trials: list[Trial], ids: list[str]) -> list[Trial]:
    """The trials named by ``--trial``, in the sweep's order (every trial when it names none); an id
    the sweep has none of is bad input, said before anything is cancelled or submitted."""
    if not ids:
        return trials
    by_id = {t.id: t for t in trials}
    for tid in ids:
        if tid in by_id:
            continue
        older = next((o for o in status.stale(sweep, trials) if o.folder.name == tid), None)
        if older is not None:
            raise UsageError(f"{tid} is an older version of trial {older.of.id} of sweep {sweep.name} (stale); "
                             f"name {older.of.id}")  # fmt: skip
        raise UsageError(f"no trial {tid!r} in sweep {sweep.name}; `lintrans status {shlex.quote(str(sweep.path))}` "
                         "lists its trials")  # fmt: skip
    return [t for t in trials if t.id in ids]


def rerun(sweep: Sweep, backend: Backend, args: argparse.Namespace, trials: list[Trial]) -> int:
    """Submit ``trials`` (``--failed``, ``--stale``: those of them that failed, or whose older version
    is stale and which are not done) whatever ended them; ``--from-scratch`` sets their folders aside first.

    A done trial is re-run only from scratch: resuming it would find nothing left to do.
    """
    lock = submission_lock(sweep)
    try:
        seen = status.views(trials, status.observe(trials, strict=True))
        if args.failed:
            trials = [t for t in trials if seen[t.id].state == "failed"]
        elif args.stale:
            changed = {o.of.id for o in status.stale(sweep, trials)}
            trials = [t for t in trials if t.id in changed and seen[t.id].state != "done"]
        if not trials:
            print(f"nothing to rerun: no {'failed' if args.failed else 'stale'} trial in sweep {sweep.name}")
            return 0
        if args.from_scratch:
            trials, seen = _set_aside(sweep, trials, seen)
        for t in trials:
            if seen[t.id].state == "done":
                print(f"{t.id} is done; `rerun --from-scratch` trains it again")
        return _submit(sweep, trials, seen, backend, args, retry_failed=True, resume_stopped=True)
    finally:
        lock.release()


def _set_aside(
    sweep: Sweep, trials: list[Trial], seen: dict[str, status.TrialView]
) -> tuple[list[Trial], dict[str, status.TrialView]]:
    """Move the folder of each trial no job holds to ``<id>.old-N``; the trials as listed afterwards
    (a folder of the earlier id scheme set aside, its trial takes its current id) and their views."""
    for t in trials:
        if seen[t.id].state not in ACTIVE and t.run_dir.is_dir() and not state.is_running(t.run_dir):
            print(f"{t.id}: kept as {state.set_aside(t.run_dir).name}; starting from scratch")
    fresh = [sweep.trial({k: t.overrides[k] for k in t.axes}, t.overrides["seed"], t.index) for t in trials]
    return fresh, {**status.views(fresh), **{t.id: seen[t.id] for t in trials if seen[t.id].state in ACTIVE}}


def _submit(
    sweep: Sweep,
    trials: list[Trial],
    seen: dict[str, status.TrialView],
    backend: Backend,
    args: argparse.Namespace,
    retry_failed: bool,
    resume_stopped: bool,
) -> int:
    planned = status.plan(sweep, trials, seen, retry_failed, resume_stopped)
    todo = [t for t in trials if planned[t.id] in status.SUBMITTED]
    for t in todo:
        write_spec(sweep, t)
        if seen[t.id].state in ("stopped", "failed"):  # asked to go again: the next start is a resume
            state.write_status(t.run_dir, "preempted", reason=f"re-run after {seen[t.id].state}", resumable=True)
    code = 0
    if not todo:
        kinds = Counter(seen[t.id].state for t in trials)  # every trial is skipped for its state
        print("nothing to submit: " + ", ".join(f"{n} {kind}" for kind, n in kinds.items()))
    else:
        code = backend.submit(sweep, todo)
    if not backend.waits and todo:  # queued: their results come later
        runs = f" --runs-dir {shlex.quote(args.runs_dir)}" if args.runs_dir else ""
        print(f"follow with: lintrans{runs} status {shlex.quote(args.sweep)}")
        failed = status.report_failures([t for t in trials if planned[t.id].startswith("skip (failed")], seen)
        return EXIT_FAILED if failed and not args.allow_failures else 0
    observations = status.observe(trials)
    table.print_brief(sweep, trials, observations)
    failed = status.report_failures(trials, status.views(trials, observations))
    if code not in (0, EXIT_FAILED):
        return code
    return EXIT_FAILED if failed and not args.allow_failures else 0


def cancel(trials: list[Trial]) -> None:
    """Cancel the queued and running ones of ``trials`` (a sweep's, or those ``--trial`` names),
    asking each backend about the ones it launched."""
    by_backend: dict[str, list[Trial]] = {}
    for name, group in status.launched_by(trials).items():  # never launched: nothing runs, as local says
        by_backend.setdefault(name or "local", []).extend(group)
    for name, group in by_backend.items():
        n = backends.get(name if name in backends.NAMES else "local").cancel(group)
        print(f"{name}: cancelled {status.plural(n, 'trial')}; re-run `run` to resume them")
