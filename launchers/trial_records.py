"""What a trial's run directory says it has finished: its evaluation records, and the job it ran in.

:mod:`launchers.trial` (which writes them) and :mod:`launchers.status` (which reads them to tell a
user a trial is done even when its ``status.json`` is damaged) both import from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from launchers import state
from lintrans import records
from lintrans.eval_spec import EvalSpec


def evaluations_missing(trial_dir: Path, spec: dict[str, Any]) -> list[EvalSpec]:
    """The spec's evaluations without a record of their step (identity by mode, names, checkpoint).

    An evaluation of the last checkpoint (0) needs a record of the final step; one of snapshot N, of step N.
    """
    n_iters = spec.get("n_iters")
    missing = []
    for values in spec.get("evaluations", []):
        ev = EvalSpec.parse(values)
        path = records.record_path(trial_dir, ev.mode, ev.experiment_name, ev.param_name, ev.checkpoint)
        record = state.read(path)
        steps = ev.checkpoint or n_iters
        if not record or (steps is not None and record.get("run", {}).get("steps") != steps):
            missing.append(ev)
    return missing


def records_complete(trial_dir: Path, spec: dict[str, Any]) -> bool:
    """Every evaluation of the spec has its record at the final step: the trial is done, whatever status.json says."""
    return bool(spec) and not evaluations_missing(trial_dir, spec)


def job_id() -> str | None:
    """The SLURM job (``<array>_<task>`` in an array) this process runs in; None outside SLURM."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")
