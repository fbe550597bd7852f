"""Sweeps end to end on real backends: local processes, a real SLURM cluster, a real Ray cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, env, require

TINY = "tests/sweeps/tiny.yaml"
LONG = "tests/sweeps/long.yaml"


def launchers(runs: Path, *args: str, timeout: float = 900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launchers", "--runs-dir", str(runs), *args],
        cwd=ROOT, env=env(**kw.pop("extra_env", {})), capture_output=True, text=True, timeout=timeout, **kw,
    )  # fmt: skip


def trial_dirs(runs: Path, sweep: str) -> list[Path]:
    return sorted(p.parent for p in (runs / "sweeps" / sweep).glob("*/trial.json"))


def status(trial: Path) -> dict:
    try:
        return json.loads((trial / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def wait_until(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def table_rows(runs: Path, sweep_file: str) -> list[dict]:
    result = launchers(runs, "table", sweep_file, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_finished_with_metrics(runs: Path, sweep_file: str, n: int) -> list[dict]:
    rows = table_rows(runs, sweep_file)
    assert len(rows) == n
    assert all(r["status"] == "done" for r in rows), [(r["trial"], r["status"], r["reason"]) for r in rows]
    assert all(isinstance(r.get("nll_bpd"), float) for r in rows), rows[0]
    return rows


def records(trial: Path) -> list[Path]:
    return sorted((trial / "records").glob("*.json"))


# ----------------------------------------------------------------------------------------- bad input


HEAD = "name: b\nconfig: tests/configs/tiny.py\n"
BAD = {
    "unknown key": (HEAD + "axes:\n  model.K: [2]\nbogus: 1\n", ":5: bogus: unknown key"),
    "wrong type": (HEAD + "axes:\n  model.K: [2, ten]\n", ":4: axes.model.K: wrong type"),
    "empty axis": (HEAD + "axes:\n  model.K: []\n", ":4: axes.model.K: an axis is a non-empty"),
    "unknown backend": (HEAD + "backend: pbs\naxes:\n  model.K: [2]\n", ":3: backend: unknown backend 'pbs'"),
    "unknown forward": (HEAD + "axes:\n  model.forward: [heat, warp]\n", ":4: axes.model.forward: unknown forward"),
    "unknown config key": (HEAD + "axes:\n  model.nope: [1]\n", ":4: axes.model.nope: unknown config key"),
    "impossible K": (HEAD + "axes:\n  model.K: [3, 0]\n", ":4: axes.model.K: K must be"),
    "bad yaml": ("name: b\naxes: [unclosed\n", ":3: not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sweep_files(tmp_path, case):
    text, needle = BAD[case]
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(text)
    result = launchers(tmp_path / "runs", "run", str(sweep))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{sweep}{needle}" in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()  # nothing submitted, nothing written


def test_unknown_backend_flag(tmp_path):
    result = launchers(tmp_path, "run", TINY, "--backend", "pbs")
    assert result.returncode == 2 and "unknown backend 'pbs'; valid: local, ray, slurm" in result.stderr


def test_expansion_is_deterministic_and_dry_run_writes_nothing(tmp_path):
    a = launchers(tmp_path, "run", TINY, "--dry-run")
    b = launchers(tmp_path, "run", TINY, "--dry-run")
    assert a.returncode == 0 and a.stdout == b.stdout
    assert "6 of 6 trials would be submitted" in a.stdout
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------- local


def test_local_sweep_survives_killed_launcher(tmp_path):
    cmd = [sys.executable, "-m", "launchers", "--runs-dir", str(tmp_path), "run", TINY, "--backend", "local"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: any(status(t).get("state") == "done" for t in trial_dirs(tmp_path, "tiny")), 600, "a done trial")
    proc.kill()  # SIGKILL: no clean-up in the launcher; its children get SIGTERM and checkpoint
    proc.wait()
    finished = {t: status(t) for t in trial_dirs(tmp_path, "tiny") if status(t).get("state") == "done"}
    assert 0 < len(finished) < 6
    again = launchers(tmp_path, "run", TINY, "--backend", "local")
    assert again.returncode == 0, again.stderr
    assert_finished_with_metrics(tmp_path, TINY, 6)
    for trial, before in finished.items():
        assert status(trial) == before  # finished trials were not run again
    once_more = launchers(tmp_path, "run", TINY, "--backend", "local")  # idempotence
    assert "nothing to submit: 6 done" in once_more.stdout
    assert (tmp_path / "results.csv").read_text().count("\n") == 7


# ----------------------------------------------------------------------------------------- SLURM


@pytest.fixture(scope="module")
def slurm_cluster():
    require("slurmctld")
    folder = Path(tempfile.mkdtemp(prefix="lintrans-slurm-", dir="/tmp"))  # munge needs o+x on every parent
    folder.chmod(0o755)
    cluster = str(ROOT / "slurm" / "cluster.sh")
    started = subprocess.run(["bash", cluster, "start", str(folder)], capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    exports = subprocess.run(["bash", cluster, "env", str(folder)], capture_output=True, text=True, check=True).stdout
    conf = next(line.split("=", 1)[1].strip("'\"") for line in exports.split() if line.startswith("SLURM_CONF="))
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield {"dir": folder, "script": cluster, "conf": conf}
    subprocess.run(["bash", cluster, "stop", str(folder)], capture_output=True, timeout=180)
    shutil.rmtree(folder, ignore_errors=True)
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous


def slurm(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True, env=env()).stdout


def wait_done(runs: Path, sweep: str, n: int, timeout: float = 900) -> None:
    def all_done():
        dirs = trial_dirs(runs, sweep)
        return len(dirs) == n and all(status(t).get("state") in ("done", "failed") for t in dirs)

    wait_until(all_done, timeout, f"{n} finished trials of {sweep}", every=2)


def test_slurm_array_runs_the_sweep(tmp_path, slurm_cluster):
    result = launchers(tmp_path, "run", TINY, "--backend", "slurm")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("submitted array") == 1 and "with 6 tasks" in result.stdout
    wait_done(tmp_path, "tiny", 6)
    rows = assert_finished_with_metrics(tmp_path, TINY, 6)
    assert {r["backend"] for r in rows} == {"slurm"} and all("_" in r["job_id"] for r in rows)
    again = launchers(tmp_path, "run", TINY, "--backend", "slurm")
    assert "nothing to submit: 6 done" in again.stdout


@pytest.mark.parametrize("how", ["scontrol requeue", "preemption signal"])
def test_slurm_interrupted_task_resumes_once(tmp_path, slurm_cluster, how):
    result = launchers(tmp_path, "run", LONG, "--backend", "slurm")
    assert result.returncode == 0, result.stderr
    (trial,) = trial_dirs(tmp_path, "long")
    wait_until(lambda: (status(trial).get("step") or 0) >= 20, 600, "training progress", every=0.5)
    job = json.loads((trial / "launch.json").read_text())["job_id"]
    if how == "scontrol requeue":
        slurm("scontrol", "requeue", job)
    else:
        slurm("scancel", "--signal=USR2", job)  # submitit's preemption / time-limit signal
    wait_done(tmp_path, "long", 1)
    st = status(trial)
    assert st["state"] == "done" and st["attempt"] == 2 and st["step"] == 200, st
    assert st["resumed_from"] >= 20, st
    assert len(records(trial)) == 1  # finished once: one evaluation record


def test_slurm_cancel_leaves_sweep_resumable(tmp_path, slurm_cluster):
    assert launchers(tmp_path, "run", LONG, "--backend", "slurm").returncode == 0
    (trial,) = trial_dirs(tmp_path, "long")
    wait_until(lambda: (status(trial).get("step") or 0) >= 10, 600, "training progress")
    cancelled = launchers(tmp_path, "cancel", LONG)
    assert cancelled.returncode == 0 and "cancelled 1 task" in cancelled.stdout
    wait_until(lambda: status(trial).get("state") in ("preempted", "failed"), 120, "the trial to stop")
    assert status(trial)["state"] == "preempted"
    step = status(trial)["step"]
    assert launchers(tmp_path, "run", LONG, "--backend", "slurm").returncode == 0
    wait_done(tmp_path, "long", 1)
    assert status(trial)["state"] == "done" and status(trial)["step"] == 200 and step < 200


def test_slurm_splits_arrays_above_max_array_size(tmp_path, slurm_cluster):
    script, folder = slurm_cluster["script"], str(slurm_cluster["dir"])
    subprocess.run(["bash", script, "stop", folder], capture_output=True, check=True, timeout=180)
    lowered = subprocess.run(["bash", script, "start", folder], capture_output=True, text=True, timeout=180,
                             env=dict(os.environ, LINTRANS_SLURM_MAX_ARRAY_SIZE="4"))  # fmt: skip
    assert lowered.returncode == 0, lowered.stderr
    try:
        result = launchers(tmp_path, "run", TINY, "--backend", "slurm")
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("submitted array") == 2, result.stdout
        wait_done(tmp_path, "tiny", 6)
        assert_finished_with_metrics(tmp_path, TINY, 6)
    finally:
        subprocess.run(["bash", script, "stop", folder], capture_output=True, timeout=180)
        subprocess.run(["bash", script, "start", folder], capture_output=True, timeout=180)


def test_sbatch_only_scripts_keep_sweep_values_out_of_the_shell(tmp_path, slurm_cluster):
    sweep = "tests/sweeps/injection.yaml"
    result = launchers(tmp_path, "run", sweep, "--backend", "slurm", "--sbatch-only")
    assert result.returncode == 0, result.stderr
    scripts = sorted((ROOT / "slurm" / "generated").glob("injection.*.sbatch"))
    assert scripts
    for script in scripts:
        assert "touch" not in script.read_text()
        slurm("sbatch", str(script))
    wait_done(tmp_path, "injection", 3, timeout=600)
    assert all(status(t)["state"] == "done" for t in trial_dirs(tmp_path, "injection"))
    for name in ("pwned", "pwned2", "pwned3"):
        assert not list(ROOT.rglob(name)) and not list(tmp_path.rglob(name)) and not Path("/tmp", name).exists()


# ----------------------------------------------------------------------------------------- Ray


def test_ray_runs_the_same_trials(tmp_path):
    require_ray()
    result = launchers(tmp_path, "run", TINY, "--backend", "ray")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = assert_finished_with_metrics(tmp_path, TINY, 6)
    dry = launchers(tmp_path / "other", "run", TINY, "--dry-run")
    ids = {line.split()[0] for line in dry.stdout.splitlines()[1:7]}
    assert {r["trial"] for r in rows} == ids and {r["backend"] for r in rows} == {"ray"}


def test_ray_retries_a_killed_worker_from_its_checkpoint(tmp_path):
    require_ray()
    cmd = [sys.executable, "-m", "launchers", "--runs-dir", str(tmp_path), "run", LONG, "--backend", "ray"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trial = wait_until(lambda: next(iter(trial_dirs(tmp_path, "long")), None), 300, "the trial directory")
    wait_until(lambda: (status(trial).get("step") or 0) >= 20, 600, "training progress")
    worker = status(trial)["pid"]
    os.kill(worker, signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    st = status(trial)
    assert st["state"] == "done" and st["attempt"] == 2 and st["step"] == 200, st
    assert st["resumed_from"] >= 20, st  # the retry continued from the checkpoint, not from scratch


def require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("ray is not installed (CI=true)")
        pytest.skip("ray not installed")
