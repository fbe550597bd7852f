"""``lintrans clean SWEEP``: free the disk a sweep's old checkpoints take, keeping what anything needs.

Each trial keeps its newest ``--keep`` numbered snapshots, every snapshot its evaluations name
(``checkpoint: N``), and its latest state (``checkpoints-meta``), which a re-run resumes from and
``sample.py`` reads: after ``clean``, ``run`` still resumes every unfinished trial. A trial that is
running (its lock is held) is never touched. ``--dry-run`` says what would go.
"""

from __future__ import annotations

import os
from pathlib import Path

from launchers import state
from launchers.sweep import Trial
from lintrans import checkpoint_files
from lintrans.eval_spec import EvalSpec


def disk_use(folder: Path) -> int:
    """Bytes in the files under ``folder`` (what ``status`` reports for a sweep), links not followed.

    ``os.scandir`` hands over each entry's type with the listing: one ``stat`` per file, where
    ``rglob`` made three (a second of a 10,000-trial ``status``)."""
    total, pending = 0, [str(folder)]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue  # gone meanwhile, or unreadable: not counted
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
            elif entry.is_file(follow_symlinks=False):
                try:
                    total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    return total


def removable(trial: Trial, keep: int) -> list[Path]:
    """``trial``'s numbered snapshots that nothing needs: older than its newest ``keep``, named by no evaluation."""
    steps = checkpoint_files.numbered(trial.run_dir)
    named = {EvalSpec.parse(v).checkpoint for v in state.spec(trial.run_dir).get("evaluations", [])}
    kept = set(steps[-keep:] if keep else []) | named
    return [checkpoint_files.numbered_path(trial.run_dir, n) for n in steps if n not in kept]


def clean(trials: list[Trial], keep: int, dry_run: bool) -> int:
    """Remove (or, ``dry_run``, list) what :func:`removable` finds; prints each trial's share and the total."""
    freed = 0
    for t in trials:
        if state.is_running(t.run_dir):
            print(f"skip    {t.id} {t.label}: running")
            continue
        paths = removable(t, keep)
        size = sum(p.stat().st_size for p in paths)
        for p in paths if not dry_run else []:
            p.unlink()
        verb = "would free" if dry_run else "freed"
        if paths:
            print(f"{verb} {human(size):>9}  {t.id} {t.label}: {len(paths)} checkpoints")
        freed += size
    print(f"{'would free' if dry_run else 'freed'} {human(freed)} in all (kept the newest {keep} per trial, "
          "those evaluations name, and the latest state)")  # fmt: skip
    return 0


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
