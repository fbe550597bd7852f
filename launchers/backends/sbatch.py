"""sbatch backend (``--backend sbatch``, or ``--sbatch-only``): plain array scripts to submit yourself.

``submit`` writes one array script per ``MaxArraySize`` trials (from the one script writer,
:mod:`launchers.backends.sbatch_script`) and a manifest of their run directories, which each task
reads by ``SLURM_ARRAY_TASK_ID``; every submission gets its own folder under
``<sweep>/sbatch/<time stamp>``, never rewritten, and nothing is submitted. Nothing on the
cluster needs submitit.

The trials are *written* until someone submits a script; ``observe`` then finds each task in
``squeue`` by the job name and the script it runs (the manifest maps task index to trial), and
``cancel`` scancels those tasks and the jobs running trials recorded as theirs.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
from collections.abc import Callable
from pathlib import Path

from launchers import state
from launchers.backends import Alias, Backend
from launchers.backends.sbatch_script import array_body, options, render, setup_lines
from launchers.backends.slurm import (
    REACH_TIMEOUT_S,
    RUNNING,
    array_tasks,
    chunks,
    job_records,
    scancel,
    scontrol_config,
)
from launchers.state import Observation
from launchers.sweep import Sweep, Trial
from lintrans.atomic import write_text
from lintrans.errors import UsageError


class SbatchBackend(Backend):
    name = "sbatch"
    waits = False  # nothing runs until someone submits the scripts
    adaptive = False  # an adaptive search needs each wave's results before the next

    def __init__(self, say: Callable[[str], None] = print) -> None:
        self.say = say

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--sbatch-only", dest="backend_alias", action=Alias, backend=cls.name,
                            help="write plain sbatch array scripts, submit nothing (--backend sbatch)")  # fmt: skip

    def describe(self, sweep: Sweep, trials: list[Trial]) -> str:
        return f"sbatch: {len(trials)} trials as array scripts under {sweep.dir / 'sbatch'}, not submitted"

    def dry_run(self, sweep: Sweep, trials: list[Trial]) -> str:
        n = max(1, len(trials))
        logs = sweep.dir.resolve() / "slurm"
        manifest = sweep.dir.resolve() / "sbatch" / "YYYYmmddTHHMMSS-PID" / f"{sweep.name}.0.manifest"
        text = render(options(sweep, n, f"{logs}/%A_%a.log"), setup_lines(sweep), array_body(sweep, manifest))
        return f"# sbatch script for {len(trials)} trial(s):\n{text}"

    def scripts(self, sweep: Sweep, trials: list[Trial]) -> list[Path]:
        """Array scripts and their manifests, in a folder of their own; each trial's launch names its script."""
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
        folder = (sweep.dir / "sbatch" / stamp).resolve()
        size = _max_array_size()
        logs = (sweep.dir / "slurm").resolve()
        logs.mkdir(parents=True, exist_ok=True)
        paths = []
        for n, part in enumerate(chunks(trials, max(1, size))):
            manifest = folder / f"{sweep.name}.{n}.manifest"
            write_text(manifest, "".join(f"{t.run_dir.resolve()}\n" for t in part))
            path = folder / f"{sweep.name}.{n}.sbatch"
            opts = options(sweep, len(part), f"{logs}/%A_%a.log")
            write_text(path, render(opts, setup_lines(sweep), array_body(sweep, manifest)))
            for t in part:
                state.write_launch(t.run_dir, self.name, None, None, script=str(path))
            paths.append(path)
        return paths

    def submit(self, sweep: Sweep, trials: list[Trial]) -> int:
        for path in self.scripts(sweep, trials):
            self.say(f"wrote {path} (submit with: sbatch {path})")
        return 0

    def observe(self, trials: list[Trial]) -> dict[str, Observation]:
        """Queued and running tasks of our scripts, whoever submitted them: ``squeue`` by job name and script."""
        tasks = _tasks(trials)
        return {tid: Observation("running" if st in RUNNING else "queued", st) for tid, (_, st) in tasks.items()}

    def cancel(self, trials: list[Trial]) -> int:
        """``scancel`` our scripts' queued and running tasks, and the jobs running trials of ours recorded."""
        queued = {tid: job for tid, (job, _) in _tasks(trials).items()}
        jobs = {t.run_dir: job for t in trials if (job := _job_to_cancel(t, queued))}
        return scancel(jobs)


def _job_to_cancel(trial: Trial, queued: dict[str, str]) -> str | None:
    """The trial's task in the queue, else the job a running trial recorded, else None."""
    if trial.id in queued:
        return queued[trial.id]
    job = state.status(trial.run_dir).get("job_id")
    return str(job) if job and state.is_running(trial.run_dir) else None


def _tasks(trials: list[Trial]) -> dict[str, tuple[str, str]]:
    """Trial id -> (``<array>_<task>``, SLURM state) of each array task of our scripts in the queue.

    A script's manifest lists its trials in task order, and ``squeue`` names each task's script
    (``%o``): so a task a user submitted is found without a job id ever having been recorded.
    """
    by_script: dict[str, dict[int, str]] = {}
    for t in trials:
        script = state.launch(t.run_dir).get("script")
        if script and script not in by_script:
            manifest = Path(script).with_suffix(".manifest")
            by_script[script] = dict(enumerate(manifest.read_text().splitlines())) if manifest.is_file() else {}
    if not by_script:
        return {}
    ids = {str(t.run_dir.resolve()): t.id for t in trials}
    names = ",".join(sorted({f"lintrans-{t.run_dir.parent.name}" for t in trials}))
    try:
        records = job_records("squeue", "-h", "-r", "-n", names, "-o", "%i|%T|%o", timeout=REACH_TIMEOUT_S)
    except UsageError as exc:  # scripts written where SLURM is not: their trials' own files say the rest
        logging.warning("%s; sbatch trials' states are from their run directories only", exc)
        return {}
    out = {}
    for job, st, command in records:
        for task in array_tasks(job) if command in by_script else []:
            trial_dir = by_script[command].get(int(task.partition("_")[2] or -1))
            if trial_dir in ids:
                out[ids[trial_dir]] = (task, st)
    return out


def _max_array_size() -> int:
    """The cluster's ``MaxArraySize`` when this machine can ask it, else SLURM's default."""
    try:
        return int(scontrol_config(timeout=REACH_TIMEOUT_S).get("MaxArraySize", "1001"))
    except UsageError:
        return 1001
