"""Backends: one interface, filled in by local processes, SLURM and Ray Tune.

Every backend runs the same trial entry point (:mod:`launchers.trial`); they differ only in how
they start, watch and stop it, as submitit's executors do:

* ``submit(sweep, trials)``: start or queue the trials; returns an exit code (the local and Ray
  backends wait for their trials, SLURM returns once the arrays are queued);
* ``observe(trials)``: what the scheduler says about each trial's latest job
  (:class:`launchers.state.Observation`), keyed by trial id; trials it knows nothing of are absent;
* ``cancel(trials)``: stop queued and running trials; they stay resumable; returns how many;
* ``dry_run(sweep, trials)``: the text of what ``submit`` would do (e.g. the sbatch script).
"""

from __future__ import annotations

from typing import Protocol

from launchers.state import Observation
from launchers.sweep import BACKENDS, Sweep, Trial
from lintrans.errors import UsageError, choices


class Backend(Protocol):
    name: str

    def submit(self, sweep: Sweep, trials: list[Trial]) -> int: ...

    def observe(self, trials: list[Trial]) -> dict[str, Observation]: ...

    def cancel(self, trials: list[Trial]) -> int: ...

    def dry_run(self, sweep: Sweep, trials: list[Trial]) -> str: ...


def get(name: str, **options) -> Backend:
    """The backend called ``name``; ``options`` are its command-line settings (e.g. the local GPU list)."""
    if name == "local":
        from launchers.backends.local import LocalBackend

        return LocalBackend(**options)
    if name == "slurm":
        from launchers.backends.slurm import SlurmBackend

        return SlurmBackend(**options)
    if name == "ray":
        from launchers.backends.ray import RayBackend

        return RayBackend(**options)
    raise UsageError(f"unknown backend '{name}'; valid: {choices(BACKENDS)}")
