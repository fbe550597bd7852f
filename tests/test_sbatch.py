"""Golden files of the one SLURM script writer (launchers.backends.sbatch_script): both paths, every option."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from launchers import cli
from launchers.backends.sbatch import SbatchBackend
from launchers.backends.sbatch_script import PREEMPT_SIGNAL, resources, submitit_parameters
from launchers.backends.slurm import SlurmBackend, SlurmTrial
from launchers.sweep import load
from tests.conftest import ROOT, assert_one_line

GOLDEN = ROOT / "tests" / "golden"
SWEEP = "tests/sweeps/cluster_options.yaml"


def normalised(text: str, runs: Path) -> str:
    return text.replace(sys.executable, "<python>").replace(str(runs), "<runs>").replace(str(ROOT), "<repo>")


def check(name: str, text: str) -> None:
    """Compare with tests/golden/<name>; LINTRANS_UPDATE_GOLDEN=1 rewrites it (then review the diff)."""
    path = GOLDEN / name
    if os.environ.get("LINTRANS_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; review, then rerun with LINTRANS_UPDATE_GOLDEN=1"


@pytest.fixture
def sweep(tmp_path):
    return load(SWEEP, tmp_path)


def test_submitit_script(sweep, tmp_path):
    check("cluster_options.submitit.sbatch", normalised(SlurmBackend().dry_run(sweep, sweep.trials()), tmp_path))


def test_plain_sbatch_script(sweep, tmp_path):
    check("cluster_options.sbatch", normalised(SbatchBackend().dry_run(sweep, sweep.trials()), tmp_path))


def test_both_paths_share_the_options_and_the_preemption_contract(sweep, tmp_path):
    """One writer: the same #SBATCH lines and setup on both paths; submitit gets them as its public parameters."""
    submitit_text = SlurmBackend().dry_run(sweep, sweep.trials()).splitlines()
    sbatch_text = SbatchBackend().dry_run(sweep, sweep.trials()).splitlines()

    def header(lines: list[str]) -> list[str]:  # all but where the tasks log, up to the body
        end = lines.index("set +e") + 1
        return [line for line in lines[1:end] if not line.startswith("#SBATCH --output=")]

    assert header(submitit_text) == header(sbatch_text)
    assert f"#SBATCH --signal={PREEMPT_SIGNAL}@240" in sbatch_text
    params = submitit_parameters(sweep)
    assert params["signal_delay_s"] == 240 and params["additional_parameters"]["requeue"] is True
    assert {"job_name", "time", "nodes", "setup", "srun_args"} <= set(params)


def trial_running(code: str) -> SlurmTrial:
    """A :class:`SlurmTrial` as ``__call__`` leaves it, its trial a Python child running ``code``."""
    trial = SlurmTrial()
    trial.proc = subprocess.Popen([sys.executable, "-c", code])
    return trial


def test_the_requeue_handler_sees_a_trial_its_interrupted_wait_already_reaped(tmp_path):
    """The state submitit's handler meets when it runs late: the trial got the signal too, checkpointed and
    exited, and ``Popen.wait`` (holding its lock) reaped it but has not stored the exit code yet."""
    trial = trial_running("raise SystemExit(75)")
    os.waitpid(trial.proc.pid, 0)
    with trial.proc._waitpid_lock:  # held by the interrupted wait, as in the job
        again = trial.checkpoint(str(tmp_path))
    assert trial.proc.returncode is None
    assert isinstance(again.function, SlurmTrial) and again.args == (str(tmp_path),)


def test_a_time_limit_signal_on_another_thread_still_requeues(tmp_path):
    """``--signal`` reaches the trial and submitit's process; landing on another thread, it runs submitit's handler
    only once ``Popen.wait`` has reaped the trial. An error from the handler there made the wait return 0, so the job
    ended COMPLETED, never requeued, with its trial preempted (a CI run). The handler here does what submitit's does
    with :meth:`SlurmTrial.checkpoint`'s answer, short of calling ``scontrol requeue``."""
    trial, answers = trial_running("import time; time.sleep(2); raise SystemExit(75)"), []
    previous = signal.signal(signal.SIGUSR2, lambda *_: answers.append(trial.checkpoint(str(tmp_path))))
    try:
        helper = threading.Thread(
            target=lambda: (time.sleep(0.5), signal.pthread_kill(threading.get_ident(), signal.SIGUSR2))
        )
        helper.start()
        code = trial.proc.wait()
        helper.join()
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert code == 75 and len(answers) == 1 and isinstance(answers[0].function, SlurmTrial)


def test_memory_goes_out_in_whole_megabytes(sweep):
    assert resources(sweep)["mem"] == "7680M"


def test_no_sweep_value_reaches_the_script(tmp_path):
    sweep = load("tests/sweeps/injection.yaml", tmp_path)
    text = SbatchBackend().dry_run(sweep, sweep.trials()) + SlurmBackend().dry_run(sweep, sweep.trials())
    assert "touch" not in text and "pwned" not in text


SURFACE = "tests/sweeps/cluster_surface.yaml"


def test_the_sbatch_surface_booleans_dropped_defaults_host_lists_memory_per_gpu(tmp_path):
    sweep = load(SURFACE, tmp_path)
    check("cluster_surface.sbatch", normalised(SbatchBackend().dry_run(sweep, sweep.trials()), tmp_path))
    check("cluster_surface.submitit.sbatch", normalised(SlurmBackend().dry_run(sweep, sweep.trials()), tmp_path))
    params = submitit_parameters(sweep)
    assert params["wckey"] is None and "wckey" not in params["additional_parameters"]  # dropped: no --wckey
    assert params["additional_parameters"]["exclusive"] is True


INTERPRETER = "tests/sweeps/cluster_interpreter.yaml"


def test_the_interpreter_and_container_of_a_trial(tmp_path):
    """apptainer wraps the interpreter (a conda prefix here) on both paths; pyxis goes through srun."""
    sweep = load(INTERPRETER, tmp_path)
    check("cluster_interpreter.sbatch", normalised(SbatchBackend().dry_run(sweep, sweep.trials()), tmp_path))
    check("cluster_interpreter.submitit.sbatch", normalised(SlurmBackend().dry_run(sweep, sweep.trials()), tmp_path))
    assert SlurmBackend().executor(sweep).python == (
        "apptainer exec --nv --bind=/scratch /scratch/images/lintrans.sif conda run -n lt python"
    )
    pyxis = tmp_path / "pyxis.yaml"
    pyxis.write_text(
        (ROOT / INTERPRETER)
        .read_text()
        .replace("name: cluster_interpreter", "name: pyxis")
        .replace(
            '{kind: apptainer, image: /scratch/images/lintrans.sif, args: [--nv, "--bind=/scratch"]}',
            '{kind: pyxis, image: "nvcr.io#nvidia/pytorch:24.01-py3", args: ["--container-mounts=/data:/data"]}',
        )
    )
    sweep = load(str(pyxis), tmp_path)
    check("cluster_pyxis.sbatch", normalised(SbatchBackend().dry_run(sweep, sweep.trials()), tmp_path))
    assert submitit_parameters(sweep)["srun_args"] == [
        "--container-image=nvcr.io#nvidia/pytorch:24.01-py3",
        "--container-mounts=/data:/data",
    ]


@pytest.mark.parametrize(
    ("slurm", "needle"),
    [
        ("{container: {kind: docker, image: x.sif}}", "kind: Input should be 'apptainer', 'singularity' or 'pyxis'"),
        ('{python: ""}', "an empty command"),
        ('{python: "python; rm -rf ~"}', "slurm.python.0: String should match pattern"),
    ],
)
def test_bad_interpreters_and_containers_are_refused(tmp_path, capsys, slurm, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: bad\nconfig: tests/configs/tiny.py\naxes:\n  model.K: [3]\nslurm: {slurm}\n")
    code = cli.main(["--runs-dir", str(tmp_path / "runs"), "run", str(path), "--dry-run", "--backend", "sbatch"])
    assert_one_line(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("resources", "additional", "needle"),
    [
        ("{gpus: 1}", '{gres: "gpu:1"}', "additional.gres: resources.gpus (1) asks for GPUs already"),
        ("{mem_gb: 8}", "{mem-per-cpu: 2G}", "additional.mem-per-cpu: resources.mem_gb (8.0, --mem) and mem-per-cpu"),
        ("{}", '{gres: "gpu:1", gpus: 2}', "gres and gpus both ask for GPUs: give one"),
        ("{}", '{exclude: "n[1-"}', "exclude: 'n[1-' is not a SLURM host list"),
        ("{}", "{mem-per-gpu: 8GB}", "mem-per-gpu: '8GB' is not a memory size"),
    ],
)
def test_sbatch_options_that_contradict_or_cannot_be_read_are_refused(tmp_path, capsys, resources, additional, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: bad\nconfig: tests/configs/tiny.py\naxes:\n  model.K: [3]\nresources: {resources}\n"
                    f"slurm:\n  additional: {additional}\n")  # fmt: skip
    code = cli.main(["--runs-dir", str(tmp_path / "runs"), "run", str(path), "--dry-run", "--backend", "sbatch"])
    assert_one_line(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "runs").exists()
