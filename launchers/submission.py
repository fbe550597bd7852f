"""``lintrans run`` and ``lintrans cancel`` for a listed sweep (grid or random): plan, submit, report.

``run`` submits what is not finished (:func:`launchers.status.plan`): done and stopped trials are
skipped, preempted and crashed ones resume from their checkpoints, trials still queued or running
are left alone, failures that running again cannot fix (bad input, non-finite loss) are reported
and left (``--retry-failed`` re-runs them). A sweep holds a submission lock, so a second ``run`` of
it waits, then sees the first one's trials. Adaptive searches go through :mod:`launchers.search`.
"""

from __future__ import annotations

import argparse
import shlex
from collections import Counter

from launchers import backends, state, status, table
from launchers.backends import Backend
from launchers.sweep import Sweep, Trial
from launchers.trial import write_spec
from lintrans.procenv import EXIT_FAILED


def submission_lock(sweep: Sweep) -> state.Lock:
    """The sweep's submission lock, held (waiting for another ``run`` that holds it)."""
    lock = state.Lock(sweep.dir / ".submit.lock")
    if not lock.acquire():
        print(f"another `run` of sweep {sweep.name} holds its submission lock; waiting for it", flush=True)
        lock.acquire(block=True)
    return lock


def dry_run(sweep: Sweep, trials: list[Trial], backend: Backend) -> int:
    seen = status.views(trials)
    planned = status.plan(trials, seen)
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
        return _submit(sweep, trials, backend, args)
    finally:
        lock.release()


def _submit(sweep: Sweep, trials: list[Trial], backend: Backend, args: argparse.Namespace) -> int:
    seen = status.views(trials, status.observe(trials, strict=True))
    planned = status.plan(trials, seen, args.retry_failed, args.resume_stopped)
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
    """Cancel the queued and running trials, asking each backend about the ones it launched."""
    by_backend: dict[str, list[Trial]] = {}
    for name, group in status.launched_by(trials).items():  # never launched: nothing runs, as local says
        by_backend.setdefault(name or "local", []).extend(group)
    for name, group in by_backend.items():
        n = backends.get(name if name in backends.NAMES else "local").cancel(group)
        print(f"{name}: cancelled {status.plural(n, 'trial')}; re-run `run` to resume them")
