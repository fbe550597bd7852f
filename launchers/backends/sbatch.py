"""sbatch backend (``--backend sbatch``, or ``--sbatch-only``): plain array scripts to submit yourself.

``submit`` writes one array script per ``MaxArraySize`` trials (from the one script writer,
:mod:`launchers.backends.sbatch_script`) and a manifest of their run directories, which each task
reads by ``SLURM_ARRAY_TASK_ID``; every submission gets its own folder under
``<sweep>/sbatch/<time stamp>``, never rewritten, and nothing is submitted. The trials are then
*queued* ("sbatch script written, not submitted") until a job runs them. Nothing on the cluster
needs submitit.

``observe`` says nothing (the jobs are whoever submitted the scripts'); ``cancel`` scancels the
SLURM jobs that running trials recorded as theirs.
"""

from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Callable
from pathlib import Path

from launchers import state
from launchers.backends import Alias, Backend
from launchers.backends.sbatch_script import array_body, options, render, setup_lines
from launchers.backends.slurm import REACH_TIMEOUT_S, chunks, scancel, scontrol_config
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
        return {}  # the jobs are whoever submitted the scripts'; the trials' own files say how they went

    def cancel(self, trials: list[Trial]) -> int:
        """``scancel`` the jobs that running trials of ours recorded (``status.json``'s ``job_id``)."""
        return scancel({t.run_dir: str(st["job_id"]) for t in trials
                        if (st := state.status(t.run_dir)).get("job_id") and state.is_running(t.run_dir)})  # fmt: skip


def _max_array_size() -> int:
    """The cluster's ``MaxArraySize`` when this machine can ask it, else SLURM's default."""
    try:
        return int(scontrol_config(timeout=REACH_TIMEOUT_S).get("MaxArraySize", "1001"))
    except UsageError:
        return 1001
