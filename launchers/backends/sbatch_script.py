"""The one writer of SLURM job scripts: the ``#SBATCH`` options of a sweep's array, its setup, its body.

Both SLURM paths take their job from here: the ``slurm`` backend hands :func:`options`,
:func:`setup_lines` and the sweep's ``srun_args`` to submitit through its public parameters
(:func:`submitit_parameters`), and the ``sbatch`` backend writes :func:`render` of the same options
with :func:`array_body`. ``--dry-run`` of either prints :func:`render`, pinned by golden files.

The preemption contract, the same on both paths: SLURM sends **USR2** ``slurm.signal_delay_s``
seconds before the time limit (``--signal``); each trainer finishes its step, checkpoints and exits
75 (``EXIT_PREEMPTED``), and the task is requeued (by submitit, or by the script's
``scontrol requeue``), to resume from the checkpoint. ``--requeue`` makes SLURM requeue a task
whose node failed. No value from a sweep's axes reaches shell text: the scripts carry only
validated tokens, numbers, ``shlex``-quoted paths and the author's own setup lines.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

from launchers.sweep import Sweep
from lintrans.errors import UsageError
from lintrans.procenv import EXIT_PREEMPTED

PREEMPT_SIGNAL = "USR2"
SAFE_PATH = re.compile(r"[A-Za-z0-9_.,:=/+@%-]+")
# Options submitit writes itself, from its own parameters (job_name, time, nodes, folder, array_parallelism,
# signal_delay_s); everything else goes to it as additional_parameters.
SUBMITIT_NAMED = {"job-name": "job_name", "time": "time", "nodes": "nodes"}
SUBMITIT_DERIVED = ("array", "output", "signal", "open-mode")


def resources(sweep: Sweep) -> dict:
    """What a task asks of SLURM. Memory goes out in whole megabytes (``--mem=7680M``), never ``7.5GB``."""
    r, s = sweep.resources, sweep.slurm
    if not SAFE_PATH.fullmatch(str(sweep.dir.resolve())):
        raise UsageError(f"run directory {sweep.dir.resolve()} has characters SLURM paths cannot carry")
    return {
        "nodes": r.nodes,
        "ntasks-per-node": r.tasks,
        "cpus-per-task": r.cpus,
        "gpus-per-node": r.gpus or None,
        "mem": f"{round(r.mem_gb * 1024)}M" if r.mem_gb else None,
        "time": r.time_min,
        "partition": s.partition,
        "account": s.account,
        "qos": s.qos,
        "constraint": s.constraint,
    }


def options(sweep: Sweep, n: int, output: str) -> dict[str, Any]:
    """The ``#SBATCH`` options of an array of ``n`` trials logging to ``output``, in script order."""
    r = resources(sweep)
    return {
        "job-name": f"lintrans-{sweep.name}",
        "array": f"0-{n - 1}%{min(n, sweep.slurm.array_parallelism)}",
        "output": output,
        **r,
        "signal": f"{PREEMPT_SIGNAL}@{sweep.slurm.signal_delay_s}",
        "requeue": True,  # a task whose node failed (NODE_FAIL) is requeued
        "open-mode": "append",
        **{k: v for k, v in sweep.slurm.additional.items() if v is not None and v is not False},
    }


def interpreter(sweep: Sweep) -> list[str]:
    """The command that starts the trial's Python on a node: ``slurm.python`` (default: the Python that
    runs ``lintrans``, or ``python3`` inside a container), wrapped by an apptainer/singularity image."""
    s = sweep.slurm
    python = list(s.python or ([sys.executable] if s.container is None else ["python3"]))
    if s.container is not None and s.container.kind in ("apptainer", "singularity"):
        return [s.container.kind, "exec", *s.container.args, s.container.image, *python]
    return python


def srun_args(sweep: Sweep) -> list[str]:
    """The sweep's srun arguments, and pyxis's container options (pyxis is an srun plugin)."""
    c = sweep.slurm.container
    return [*sweep.slurm.srun_args, *([f"--container-image={c.image}", *c.args] if c and c.kind == "pyxis" else [])]


def _present(test: str, what: str) -> str:
    """A line that ends the job at once, saying why in its log (``status`` shows that line), unless ``test``."""
    return f'{test} || {{ echo "lintrans: {what}" >&2; exit 127; }}'


def _checks(sweep: Sweep) -> list[str]:
    """A missing interpreter or image fails the job before the trial, with its name, not an srun error later.

    Only what this node can check: the interpreter inside a pyxis image is not there before srun.
    """
    s, command = sweep.slurm, interpreter(sweep)[0]
    lines = []
    if s.python or (s.container and s.container.kind != "pyxis"):
        lines.append(_present(f"command -v {shlex.quote(command)} >/dev/null", f"interpreter not found: {command}"))
    if s.container and s.container.kind != "pyxis" and "://" not in s.container.image:
        image = s.container.image
        lines.append(_present(f"[ -e {shlex.quote(image)} ]", f"container image not found: {image}"))
    return lines


def setup_lines(sweep: Sweep) -> list[str]:
    """``module load`` lines and the author's setup lines, run with ``set -e`` so that one failing fails
    the job before the trial, then the interpreter checks. Each failure leaves one ``lintrans:`` line
    in the job's log, the last one, which ``status`` gives as the reason."""
    lines = [*(f"module load {m}" for m in sweep.slurm.modules), *sweep.slurm.setup]
    guarded = [
        "set -e  # a failing setup line fails the job (the trial has not started)",
        "trap 'echo \"lintrans: setup line failed (exit $?): $BASH_COMMAND\" >&2' ERR",
        *lines,
        "trap - ERR",
        "set +e",
    ]
    return [*(guarded if lines else []), *_checks(sweep)]


def render(opts: dict[str, Any], setup: list[str], body: list[str]) -> str:
    """A job script: ``#SBATCH`` lines (``True`` is a bare flag, ``None`` left out), setup, body."""
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH --{k}" if v is True else f"#SBATCH --{k}={v}" for k, v in opts.items() if v is not None]
    return "\n".join([*lines, *setup, *body]) + "\n"


def array_body(sweep: Sweep, manifest: Path) -> list[str]:
    """A plain array task: its trial directory from the manifest, the trial under srun, requeued on exit 75."""
    srun = shlex.join(["srun", *srun_args(sweep), *interpreter(sweep), "-m", "launchers.trial"])
    sig = PREEMPT_SIGNAL
    return [
        "set -uo pipefail",
        f"cd {shlex.quote(str(Path.cwd().resolve()))}",
        f"manifest={shlex.quote(str(manifest))}",
        'trial_dir=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$manifest")',
        "export LINTRANS_BACKEND=sbatch PYTHONUNBUFFERED=1",
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
        f"# {sig} (time limit / preemption, sent to every task by --signal) makes the trainers",
        f"# checkpoint and exit {EXIT_PREEMPTED}; the task then requeues itself. The shell passes it on too.",
        f'{srun} "$trial_dir" &',
        "child=$!",
        f"trap 'kill -{sig} \"$child\"' {sig}",
        'wait "$child"; code=$?',
        'while [ "$code" -gt 128 ] && kill -0 "$child" 2>/dev/null; do wait "$child"; code=$?; done',
        f'if [ "$code" -eq {EXIT_PREEMPTED} ]; then',
        '  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
        "  exit 0",
        "fi",
        'exit "$code"',
    ]


def submitit_parameters(sweep: Sweep) -> dict[str, Any]:
    """The same job as submitit's public executor parameters (submitit adds its array, log paths and srun line)."""
    opts = {k: v for k, v in options(sweep, 1, "").items() if v is not None and k not in SUBMITIT_DERIVED}
    named = {SUBMITIT_NAMED[k]: opts.pop(k) for k in list(opts) if k in SUBMITIT_NAMED}
    dropped = {k for k, v in sweep.slurm.additional.items() if v is None or v is False}
    return {
        **named,
        **({"wckey": None} if "wckey" in dropped else {}),  # submitit writes --wckey=submitit unless told None
        "array_parallelism": sweep.slurm.array_parallelism,
        "signal_delay_s": sweep.slurm.signal_delay_s,  # submitit's signal is USR2, as ours
        "stderr_to_stdout": True,
        "setup": setup_lines(sweep),
        "srun_args": srun_args(sweep),
        "additional_parameters": opts,
    }
