"""Sweeps on a real single-node SLURM cluster (slurm/cluster.sh, private ports): arrays, requeue,
cancel, setup lines, failures of every kind recorded with the scheduler's reason, honest exit codes."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.clusters import Cluster, cluster_fixture, wait_final
from tests.conftest import (
    CANARIES,
    ROOT,
    assert_no_canary,
    env,
    lintrans,
    status_of,
    train_args,
    trial_dirs,
    wait_until,
)

TINY = "tests/sweeps/tiny.yaml"
LONG = "tests/sweeps/long.yaml"


cluster = cluster_fixture(1, "lintrans-slurm-")


def run(cluster: Cluster, runs: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return lintrans(runs, *args, extra_env={"SLURM_CONF": cluster.env["SLURM_CONF"]}, **kw)


def sweep_file(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nconfig: tests/configs/tiny.py\n{body}")
    return str(path)


def test_array_runs_the_sweep_once_even_when_run_twice_at_once(tmp_path, cluster):
    cmd = [sys.executable, "-m", "launchers", "--runs-dir", str(tmp_path), "run", TINY, "--backend", "slurm"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLURM_CONF": cluster.env["SLURM_CONF"], **CANARIES}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum(out.count("submitted array") for out in outs) == 1 and "with 6 tasks" in "".join(outs), outs
    rows = wait_final(cluster, tmp_path, TINY, 6)
    assert all(r["status"] == "done" and isinstance(r["nll_bpd"], float) and r["steps"] == 30 for r in rows), rows
    assert {r["backend"] for r in rows} == {"slurm"} and all("_" in r["job_id"] for r in rows)
    assert all(status_of(t)["attempt"] == 1 for t in trial_dirs(tmp_path, "tiny"))
    assert_no_canary(tmp_path)  # run dirs, submitit's pickles and logs: no secret of the environment
    again = run(cluster, tmp_path, "run", TINY, "--backend", "slurm")
    assert again.returncode == 0 and "nothing to submit: 6 done" in again.stdout


def submitit_log(trial: Path) -> str:
    return "".join(p.read_text() for p in (trial.parent / "slurm").rglob("*_log.out"))


def log_time(text: str, needle: str) -> datetime.datetime:
    line = next(line for line in text.splitlines() if needle in line)
    stamp = re.search(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\)", line).group(1)
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")


def test_interrupted_tasks_resume_once(tmp_path, cluster):
    """One task requeued by ``scontrol requeue`` (SIGTERM), one sent submitit's preemption signal (USR2)."""
    body = (
        "axes:\n  model.K: [3, 4]\nseeds: [0]\noverrides:\n  training.n_iters: 200\n"
        "  training.snapshot_freq_for_preemption: 10\n  training.eval_freq: 100\n"
        "evaluations: [{mode: elbo}]\nslurm: {array_parallelism: 2, signal_delay_s: 30}\n"
    )
    sweep = sweep_file(tmp_path, "interrupted", body)
    assert run(cluster, tmp_path, "run", sweep, "--backend", "slurm").returncode == 0
    requeued, preempted = trial_dirs(tmp_path, "interrupted")
    wait_until("training progress", lambda: all((status_of(t).get("step") or 0) >= 20 for t in (requeued, preempted)),
               600)  # fmt: skip
    cluster.run("scontrol", "requeue", json.loads((requeued / "launch.json").read_text())["job_id"])
    cluster.run("scancel", "--signal=USR2", json.loads((preempted / "launch.json").read_text())["job_id"])
    wait_final(cluster, tmp_path, sweep, 2)
    for trial in (requeued, preempted):
        st = status_of(trial)
        assert st["state"] == "done" and st["attempt"] == 2 and st["step"] == 200, st
        assert st["resumed_from"] >= 20, st
        assert len(list((trial / "records").glob("*.json"))) == 1  # finished once: one evaluation record
    log = submitit_log(preempted)  # the requeue follows the checkpoint at once, not after a 300 s wait
    gap = log_time(log, "Exiting gracefully") - log_time(log, "Caught signal SIGUSR2")
    assert gap < datetime.timedelta(seconds=60), gap


def test_cancel_leaves_the_sweep_resumable(tmp_path, cluster):
    assert run(cluster, tmp_path, "run", LONG, "--backend", "slurm").returncode == 0
    (trial,) = trial_dirs(tmp_path, "long")
    wait_until("training progress", lambda: (status_of(trial).get("step") or 0) >= 10, 600)
    cancelled = run(cluster, tmp_path, "cancel", LONG)
    assert cancelled.returncode == 0 and "slurm: cancelled 1 trial" in cancelled.stdout
    wait_until("the trial to stop", lambda: status_of(trial).get("state") in ("preempted", "failed"), 120)
    assert status_of(trial)["state"] == "preempted"
    step = status_of(trial)["step"]
    assert run(cluster, tmp_path, "run", LONG, "--backend", "slurm").returncode == 0
    wait_final(cluster, tmp_path, LONG, 1)
    assert status_of(trial)["state"] == "done" and status_of(trial)["step"] == 200 and step < 200


def test_cancel_while_pending_stops_the_trials_and_run_resumes_them(tmp_path, cluster):
    """sacct lists an array's never-started tasks as one range record (``5_[1-2%1] CANCELLED``)."""
    sweep = sweep_file(tmp_path, "pending", "axes:\n  model.K: [3, 4, 5]\noverrides: {training.n_iters: 3}\n"
                       "slurm: {array_parallelism: 1}\n")  # fmt: skip
    assert run(cluster, tmp_path, "run", sweep, "--backend", "slurm").returncode == 0
    assert run(cluster, tmp_path, "cancel", sweep).returncode == 0
    wait_until("the array to leave the queue", lambda: not cluster.queued("lintrans-pending"), 120)
    shown = run(cluster, tmp_path, "status", sweep, "--format", "json")
    views = json.loads(shown.stdout)
    assert not [v for v in views if v["state"] in ("queued", "running")], views
    never_started = [v for v in views if v["reason"] and v["reason"].startswith("cancelled before it started")]
    assert len(never_started) >= 2 and all(v["state"] == "stopped" for v in never_started), views
    again = run(cluster, tmp_path, "run", sweep, "--backend", "slurm")
    assert again.returncode == 0 and "submitted array" in again.stdout, again.stdout
    assert all(r["status"] == "done" for r in wait_final(cluster, tmp_path, sweep, 3))


def test_failures_are_recorded_with_the_schedulers_reason(tmp_path, cluster):
    """scancel --signal=KILL, kill -9 of the trial (OOM-like), a failing setup line, a GPU trial without CUDA:
    each is failed with a reason on the next `status`; a re-run re-submits only what can resume."""
    long_ = sweep_file(tmp_path, "victims", "axes:\n  model.K: [3, 4]\nseeds: [0]\noverrides:\n"
                       "  training.n_iters: 120\n  training.snapshot_freq_for_preemption: 10\n"
                       "resources: {time_min: 30}\nslurm: {array_parallelism: 2}\n")  # fmt: skip
    setup = sweep_file(tmp_path, "setup_fails", "axes:\n  model.K: [3]\noverrides: {training.n_iters: 3}\n"
                       "slurm: {setup: ['export LINTRANS_SETUP_MARK=seen', 'false']}\n")  # fmt: skip
    gpu = sweep_file(tmp_path, "gpu", "axes:\n  model.K: [3]\noverrides: {training.n_iters: 3}\nresources: {gpus: 1}\n")
    setup_ok = sweep_file(tmp_path, "setup_ok", "axes:\n  model.K: [3]\noverrides: {training.n_iters: 3}\n"
                          "slurm: {setup: ['export LINTRANS_SETUP_MARK=\"module loaded\"']}\n")  # fmt: skip
    assert run(cluster, tmp_path, "run", long_, "--backend", "slurm").returncode == 0
    a, b = trial_dirs(tmp_path, "victims")
    wait_until("both victims training", lambda: all((status_of(t).get("step") or 0) >= 10 for t in (a, b)), 600)
    cluster.run("scancel", "--signal=KILL", json.loads((a / "launch.json").read_text())["job_id"])
    os.kill(status_of(b)["pid"], signal.SIGKILL)  # the trial process, as the OOM killer would
    for path in (setup, gpu, setup_ok):
        assert run(cluster, tmp_path, "run", path, "--backend", "slurm").returncode == 0
    rows = {r["trial"]: r for r in wait_final(cluster, tmp_path, long_, 2)}
    assert rows[a.name]["status"] == "failed" and "ended CANCELLED" in rows[a.name]["reason"], rows[a.name]
    assert rows[b.name]["status"] == "failed" and "killed by SIGKILL" in rows[b.name]["reason"], rows[b.name]
    (setup_row,) = wait_final(cluster, tmp_path, setup, 1)
    assert setup_row["status"] == "failed" and "ended FAILED" in setup_row["reason"], setup_row
    assert "before the trial started" in setup_row["reason"]
    (gpu_row,) = wait_final(cluster, tmp_path, gpu, 1)  # the gres is scheduled here; CUDA is not there
    assert gpu_row["status"] == "failed" and gpu_row["reason"].startswith("CUDA unavailable"), gpu_row
    (ok_row,) = wait_final(cluster, tmp_path, setup_ok, 1)  # the setup lines ran in the job, before the trial
    assert ok_row["status"] == "done", ok_row
    assert status_of(trial_dirs(tmp_path, "setup_ok")[0])["environment"]["LINTRANS_SETUP_MARK"] == "module loaded"
    status = run(cluster, tmp_path, "status", long_)
    assert status.stdout.count("failed") >= 2, status.stdout
    for path in (long_, setup, gpu):
        print(run(cluster, tmp_path, "status", path).stdout)  # each failure class as a user sees it

    again = run(cluster, tmp_path, "run", long_, "--backend", "slurm")  # crashes resume from their checkpoints
    assert again.returncode == 0 and "with 2 tasks" in again.stdout, again.stdout + again.stderr
    rows = wait_final(cluster, tmp_path, long_, 2)
    assert all(r["status"] == "done" for r in rows), rows
    assert all(status_of(t)["resumed_from"] >= 10 for t in (a, b))
    gpu_again = run(cluster, tmp_path, "run", gpu, "--backend", "slurm")  # bad input: not re-submitted
    assert gpu_again.returncode == 1 and "failed  " in gpu_again.stderr and "CUDA unavailable" in gpu_again.stderr


def test_trials_run_through_the_interpreter_prefix_and_a_missing_one_fails_at_once(tmp_path, cluster):
    """slurm.python as a command prefix (a shim that logs its argv, then runs the real interpreter, as
    `conda run` or `apptainer exec` would); a prefix that is not there fails the job before the trial,
    and the next `status` names it."""
    shim, log = tmp_path / "shim.sh", tmp_path / "shim.log"
    shim.write_text(f'#!/bin/bash\necho "task $SLURM_ARRAY_TASK_ID: $*" >> {log}\nexec "$@"\n')
    shim.chmod(0o755)
    tiny = "axes:\n  model.K: [3, 4]\noverrides: {training.n_iters: 3}\n"
    shimmed = sweep_file(tmp_path, "shimmed", f"{tiny}slurm: {{python: [{shim}, {sys.executable}]}}\n")
    missing = sweep_file(tmp_path, "noprefix", f"{tiny}slurm: {{python: /nonexistent/bin/python}}\n")
    for path in (shimmed, missing):
        assert run(cluster, tmp_path, "run", path, "--backend", "slurm").returncode == 0
    assert all(r["status"] == "done" for r in wait_final(cluster, tmp_path, shimmed, 2))
    lines = sorted(log.read_text().splitlines())
    assert [line.split(":")[0] for line in lines] == ["task 0", "task 1"], lines  # both tasks went through it
    assert all(f"{sys.executable} -u -m submitit.core._submit" in line for line in lines), lines
    rows = wait_final(cluster, tmp_path, missing, 2)
    assert all(r["status"] == "failed" for r in rows), rows
    assert all(r["reason"].endswith("before the trial started: interpreter not found: /nonexistent/bin/python")
               for r in rows), rows  # fmt: skip


def test_without_accounting_status_tells_the_truth_from_squeue_and_the_records(tmp_path, cluster):
    """slurmdbd down, as on a site without accounting: `status` still answers, says so in one line, and a
    job that vanished is never shown running (its trial is failed), while finished trials stay done."""
    done = sweep_file(tmp_path, "noacct", "axes:\n  model.K: [3]\noverrides: {training.n_iters: 3}\n")
    long_ = sweep_file(tmp_path, "vanish", "axes:\n  model.K: [3]\noverrides:\n  training.n_iters: 200\n"
                       "  training.snapshot_freq_for_preemption: 10\n")  # fmt: skip
    assert run(cluster, tmp_path, "run", done, "--backend", "slurm").returncode == 0
    assert [r["status"] for r in wait_final(cluster, tmp_path, done, 1)] == ["done"]
    assert run(cluster, tmp_path, "run", long_, "--backend", "slurm").returncode == 0
    (trial,) = trial_dirs(tmp_path, "vanish")
    wait_until("the trial training", lambda: (status_of(trial).get("step") or 0) >= 10, 600)
    dbd = int((cluster.dir / "run" / "slurmdbd.pid").read_text())
    os.kill(dbd, signal.SIGTERM)
    try:
        wait_until("slurmdbd to stop", lambda: not Path(f"/proc/{dbd}").exists(), 60)
        cluster.run("scancel", "--signal=KILL", json.loads((trial / "launch.json").read_text())["job_id"])
        wait_until("the job to leave the queue", lambda: not cluster.queued("lintrans-vanish"), 120)
        for path, state_ in ((done, "done"), (long_, "failed")):
            shown = run(cluster, tmp_path, "status", path, "--format", "json")
            assert shown.returncode == 0, shown.stderr
            assert shown.stderr.count("warning: no SLURM accounting") == 1, shown.stderr  # said once
            (row,) = json.loads(shown.stdout)
            assert row["state"] == state_, row
        assert "left the queue; no accounting record" in row["reason"], row
    finally:
        restarted = cluster.script("start")  # slurmdbd again, for the module's other tests
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr


def test_bad_cluster_input_is_one_line(tmp_path, cluster):
    part = sweep_file(tmp_path, "nopart", "axes:\n  model.K: [3]\nslurm: {partition: nosuch}\n")
    result = run(cluster, tmp_path, "run", part, "--backend", "slurm")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "slurm.partition 'nosuch' does not exist on this cluster; valid: debug" in result.stderr
    unreachable = lintrans(tmp_path, "run", TINY, "--backend", "slurm",
                           extra_env={"SLURM_CONF": str(tmp_path / "no-such-slurm.conf")})  # fmt: skip
    assert unreachable.returncode == 2 and unreachable.stderr.count("\n") == 1, unreachable.stderr
    # reported within REACH_TIMEOUT_S (scontrol itself gives up on a missing slurm.conf after about 60 s),
    # before anything is written
    assert unreachable.stderr.startswith("error: scontrol did not answer within 10 s"), unreachable.stderr
    assert not (tmp_path / "sweeps" / "tiny").exists()


def test_splits_arrays_above_max_array_size(tmp_path, cluster):
    cluster.script("stop")
    lowered = cluster.script("start", env_extra={"LINTRANS_SLURM_MAX_ARRAY_SIZE": "2"})
    assert lowered.returncode == 0, lowered.stderr
    arrays: list[tuple[str, str]] = []
    try:
        result = run(cluster, tmp_path, "run", TINY, "--backend", "slurm")
        assert result.returncode == 0, result.stderr
        arrays += re.findall(r"submitted array (\d+) with (\d+) tasks", result.stdout)
        assert [n for _, n in arrays] == ["2", "2", "2"], result.stdout
        jobs = {json.loads((t / "launch.json").read_text())["job_id"] for t in trial_dirs(tmp_path, "tiny")}
        assert {j.split("_")[0] for j in jobs} == {a for a, _ in arrays} and len(jobs) == 6
        # One `status` of the three arrays asks squeue once and sacct at most once, each about these jobs only.
        calls = count_scheduler_calls(tmp_path, cluster, "status", TINY)
        squeue = [c for c in calls if c[0] == "squeue"]
        sacct = [c for c in calls if c[0] == "sacct"]
        assert len(squeue) == 1 and len(sacct) <= 1, calls
        for call in squeue + sacct:
            asked = call[call.index("-j") + 1].split(",")
            assert sorted(asked) == sorted(a for a, _ in arrays), calls
    finally:
        if arrays:
            cluster.run("scancel", *[a for a, _ in arrays], check=False)
        cluster.script("stop")
        assert cluster.script("start").returncode == 0


def count_scheduler_calls(tmp_path: Path, cluster: Cluster, *args: str) -> list[list[str]]:
    """The squeue/sacct calls one lintrans command makes: wrappers first on PATH log their argv, then run SLURM's."""
    bin_dir, log = tmp_path / "logged-bin", tmp_path / "scheduler-calls.log"
    bin_dir.mkdir(exist_ok=True)
    log.write_text("")
    for tool in ("squeue", "sacct"):
        wrapper = bin_dir / tool
        wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "{tool} $*" >> {log}\nexec {shutil.which(tool)} "$@"\n')
        wrapper.chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    result = lintrans(tmp_path, *args, extra_env={"SLURM_CONF": cluster.env["SLURM_CONF"], "PATH": path})
    assert result.returncode == 0, result.stderr
    return [line.split() for line in log.read_text().splitlines()]


def test_sbatch_only_scripts_keep_sweep_values_out_of_the_shell(tmp_path, cluster):
    sweep = "tests/sweeps/injection.yaml"
    result = run(cluster, tmp_path, "run", sweep, "--sbatch-only")
    assert result.returncode == 0, result.stderr
    sbatch = tmp_path / "sweeps" / "injection" / "sbatch"
    scripts = sorted(sbatch.rglob("*.sbatch"))
    assert len(scripts) == 1
    status = run(cluster, tmp_path, "status", sweep)
    assert status.stdout.count("not submitted yet; submit with: sbatch") == 3, status.stdout
    assert "(written 3)" in status.stdout, status.stdout
    assert run(cluster, tmp_path, "cancel", sweep).stdout.startswith("sbatch: cancelled 0 trials")  # none queued
    again = run(cluster, tmp_path, "run", sweep, "--sbatch-only")  # written already: nothing written twice
    assert "nothing to submit" in again.stdout and len(list(sbatch.rglob("*.sbatch"))) == 1, again.stdout
    grown = tmp_path / "injection.yaml"  # a new version of the sweep: a new script, the first one untouched
    grown.write_text(Path(sweep).read_text().replace('"`touch pwned3`"]', '"`touch pwned3`", "plain"]'))
    manifest = scripts[0].with_suffix(".manifest").read_text()
    assert run(cluster, tmp_path, "run", str(grown), "--sbatch-only").returncode == 0
    assert len(list(sbatch.rglob("*.sbatch"))) == 2 and scripts[0].with_suffix(".manifest").read_text() == manifest
    for script in scripts:
        assert "touch" not in script.read_text()
        cluster.run("sbatch", str(script))
    submitted = json.loads(run(cluster, tmp_path, "status", sweep, "--format", "json").stdout)
    assert not [v for v in submitted if v["state"] == "written"], submitted  # squeue finds them by script
    rows = wait_final(cluster, tmp_path, sweep, 3, timeout=600)
    assert all(r["status"] == "done" for r in rows), rows
    for name in ("pwned", "pwned2", "pwned3"):
        assert not list(ROOT.rglob(name)) and not list(tmp_path.rglob(name)) and not Path("/tmp", name).exists()


def steps_per_second(tmp_path: Path) -> float:
    """The tiny trial's training speed here and now, one thread as in a task (two runs: start-up cancels).

    The runs differ by 300 steps (about 20 s here), so that start-up noise of a few seconds cannot
    swamp the difference, as it did with 40 steps."""
    seconds = {}
    for n in (10, 310):
        start = time.perf_counter()
        args = train_args(tmp_path / f"calibrate{n}", f"--config.training.n_iters={n}")
        result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env(OMP_NUM_THREADS="1"), capture_output=True,
                                timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr
        seconds[n] = time.perf_counter() - start
    assert seconds[310] - seconds[10] > 2, seconds  # else the calibration measured noise
    return 300 / (seconds[310] - seconds[10])


def test_a_real_time_limit_requeues_and_the_trial_finishes(tmp_path, cluster):
    """time_min: 2, signal_delay_s: 30 and about 150 s of work: SLURM's own time limit, not a test signal.

    The work is 1.7x what fits before the signal (90 s; it came at 61 s here once, as slurmctld
    looks at time limits every 30 s), as the calibration can be off: a trial that finished before the
    signal would test nothing."""
    n_iters, requeues = max(400, int(150 * steps_per_second(tmp_path))), 8
    sweep = sweep_file(tmp_path, "limited", f"axes:\n  model.K: [3]\nseeds: [0]\noverrides:\n"
                       f"  training.n_iters: {n_iters}\n  training.snapshot_freq_for_preemption: 10\n"
                       "resources: {time_min: 2}\n"
                       f"slurm: {{signal_delay_s: 30, max_requeues: {requeues}}}\n")  # fmt: skip
    assert run(cluster, tmp_path, "run", sweep, "--backend", "slurm").returncode == 0
    # Final (done, or failed at the requeue limit) after at most requeues + 1 allocations of 2 min: the
    # wait allows them all (a machine slower than at calibration needs more of them than here).
    (row,) = wait_final(cluster, tmp_path, sweep, 1, timeout=(requeues + 1) * 150)
    (trial,) = trial_dirs(tmp_path, "limited")
    st = status_of(trial)
    assert row["status"] == "done" and st["attempt"] >= 2 and st["preemptions"] >= 1 and st["step"] == n_iters, st
    assert "Caught signal SIGUSR2" in submitit_log(trial)  # SLURM's --signal before the limit; no test sent it
