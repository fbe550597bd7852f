"""The local backend: GPU pool and slots (no GPU needed), and real sweeps of real trial processes."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from launchers.backends.local import gpu_pool, slots
from launchers.progress import Progress
from launchers.sweep import load
from launchers.table import learning_curve
from lintrans.errors import UsageError
from tests.conftest import (
    CANARIES,
    ROOT,
    assert_no_canary,
    assert_usage_error,
    env,
    lintrans,
    lock_held_elsewhere,
    status_of,
    table_rows,
    trial_dirs,
    wait_until,
)

TINY = "tests/sweeps/tiny.yaml"
LONG = "tests/sweeps/long.yaml"


# ----------------------------------------------------------------------------------- GPU pool (fake)


def test_gpu_pool_comes_from_the_flag_then_the_environment_then_torch():
    assert gpu_pool("0,3", {"CUDA_VISIBLE_DEVICES": "1"}, lambda: 8) == ["0", "3"]
    assert gpu_pool(None, {"CUDA_VISIBLE_DEVICES": "2,3"}, lambda: 8) == ["2", "3"]
    uuid = "GPU-8f6c1d2e-0a1b-4c3d-9e8f-123456789abc"
    assert gpu_pool(None, {"CUDA_VISIBLE_DEVICES": uuid}, lambda: 8) == [uuid]
    assert gpu_pool(None, {"CUDA_VISIBLE_DEVICES": ""}, lambda: 8) == []
    assert gpu_pool(None, {}, lambda: 3) == ["0", "1", "2"]
    for bad in ("0,0", "0;rm", "a"):
        with pytest.raises(UsageError, match="--gpus"):
            gpu_pool(bad, {}, lambda: 8)


def sweep_with(tmp_path, resources: str, local: str = "{}"):
    path = tmp_path / "s.yaml"
    path.write_text(
        f"config: tests/configs/tiny.py\naxes:\n  model.K: [2, 3, 4]\nresources: {resources}\nlocal: {local}\n"
    )
    return load(path, tmp_path)


def test_slots_never_share_a_gpu_and_refuse_a_trial_bigger_than_the_pool(tmp_path):
    assert slots(sweep_with(tmp_path, "{gpus: 2}"), ["2", "3", "5", "7", "9"]) == 2
    assert slots(sweep_with(tmp_path, "{gpus: 1}", "{slots: 1}"), ["0", "1"]) == 1
    with pytest.raises(UsageError, match=r"asks for 2 GPU\(s\) but the local pool has 1 \(4;"):
        slots(sweep_with(tmp_path, "{gpus: 2}"), ["4"])
    with pytest.raises(UsageError, match=r"resources\.nodes=2: the local backend runs on one node"):
        slots(sweep_with(tmp_path, "{nodes: 2}"), [])


def one_trial_sweep(tmp_path, name: str, n_iters: int, extra: str) -> Path:
    """A sweep file of one tiny trial (K = 2) with ``extra`` top-level keys."""
    sweep = tmp_path / f"{name}.yaml"
    sweep.write_text(f"name: {name}\nconfig: tests/configs/tiny.py\naxes:\n  model.K: [2]\n"
                     f"overrides: {{training.n_iters: {n_iters}}}\n{extra}")  # fmt: skip
    return sweep


def test_a_trial_asking_for_a_gpu_fails_without_cuda(tmp_path):
    """Not a silent CPU run: the trial fails at once, with the reason, and `run` exits 1."""
    sweep = one_trial_sweep(tmp_path, "gpu", 2, "resources: {gpus: 1}\n")
    result = lintrans(tmp_path, "run", str(sweep), "--gpus", "0")
    assert result.returncode == 1, result.stdout + result.stderr
    (trial,) = trial_dirs(tmp_path, "gpu")
    st = status_of(trial)
    assert st["state"] == "failed" and st["reason"].startswith("CUDA unavailable"), st
    assert f"failed  {trial.name} K=2 seed=42: CUDA unavailable" in result.stderr
    again = lintrans(tmp_path, "run", str(sweep), "--gpus", "0")  # not resumable: left alone
    assert again.returncode == 1 and "skip (failed" not in again.stdout and "nothing to submit" in again.stdout
    assert lintrans(tmp_path, "run", str(sweep), "--gpus", "0", "--allow-failures").returncode == 0


# ----------------------------------------------------------------------------------- real sweeps


def test_local_sweep_survives_killed_launcher(tmp_path):
    cmd = [sys.executable, "-m", "launchers", "--runs-dir", str(tmp_path), "run", TINY, "--backend", "local"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(**CANARIES), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            umask=0o027)  # fmt: skip
    wait_until(
        "a done trial", lambda: any(status_of(t).get("state") == "done" for t in trial_dirs(tmp_path, "tiny")), 600
    )
    proc.kill()  # SIGKILL: no clean-up in the launcher; its children get SIGTERM and checkpoint
    proc.wait()
    finished = {t: status_of(t) for t in trial_dirs(tmp_path, "tiny") if status_of(t).get("state") == "done"}
    assert 0 < len(finished) < 6
    again = lintrans(tmp_path, "run", TINY, "--backend", "local")
    assert again.returncode == 0, again.stderr
    rows = table_rows(tmp_path, TINY)
    assert len(rows) == 6 and all(r["status"] == "done" and isinstance(r["nll_bpd"], float) for r in rows), rows
    for trial, before in finished.items():
        assert status_of(trial) == before  # finished trials were not run again
        assert before["environment"]["CUDA_VISIBLE_DEVICES"] == ""  # a CPU trial sees no GPU
    assert_no_canary(tmp_path)  # the first run had secrets in its environment; no file holds one
    # The first run's umask (027) holds for everything it wrote into the trials it finished: nothing
    # for others to read, let alone write (lock files and atomic writes included).
    written = [p for trial in finished for p in [trial, *trial.rglob("*")]]
    assert written and not [str(p) for p in written if p.stat().st_mode & 0o007], "files open to others"
    once_more = lintrans(tmp_path, "run", TINY, "--backend", "local")  # idempotence
    assert "nothing to submit: 6 done" in once_more.stdout
    assert (tmp_path / "results.csv").read_text().count("\n") == 7
    # the figures of a finished sweep: held-out loss curves read back from TensorBoard (evaluated at
    # steps 0, 10, 20, 30 across the kill), NLL against K; no sample grids (sampling_freq 0)
    assert all([s for s, _ in learning_curve(t)] == [0, 10, 20, 30] for t in trial_dirs(tmp_path, "tiny"))
    plots = lintrans(tmp_path, "table", TINY, "--plot", "curves", "--plot", "k", "--plot", "samples")
    folder = tmp_path / "sweeps" / "tiny" / "plots"
    assert plots.returncode == 0 and "plot samples: nothing to plot yet" in plots.stderr, plots.stderr
    for name, panels in (("curves", 3), ("k", 1)):
        assert f"plot: {folder / name}.png" in plots.stderr, plots.stderr
        with Image.open(folder / f"{name}.png") as png:
            assert png.width >= 400 * panels, (name, png.size)  # one panel per forward process


def test_cancel_stops_the_queued_trials_too_and_run_resumes_everything(tmp_path):
    """`cancel` stops the sweep, not only the trials running now: the launcher starts none of its queued
    trials after it (it used to start the next one at once), the running ones checkpoint, and `run`
    finishes all."""
    cmd = [sys.executable, "-m", "launchers", "--runs-dir", str(tmp_path), "run", TINY, "--backend", "local"]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    training = lambda st: st.get("state") == "running" and (st.get("step") or 0) < 20 and not st.get("evaluating")  # noqa: E731
    running = lambda: [t for t in trial_dirs(tmp_path, "tiny") if training(status_of(t))]  # noqa: E731
    wait_until("two trials training (step < 20 of 30)", lambda: len(running()) == 2, 600)
    cancelled = lintrans(tmp_path, "cancel", TINY)
    assert cancelled.returncode == 0 and "local: cancelled 6 trials" in cancelled.stdout, cancelled.stdout
    out, _ = launcher.communicate(timeout=120)  # it returns: it has nothing left that it may start
    assert launcher.returncode == 130, out[-2000:]
    states = [status_of(t).get("state") for t in trial_dirs(tmp_path, "tiny")]  # None: never started
    # The 2 it ran are interrupted; one may still finish under a loaded machine before `cancel` reaches it.
    assert states.count(None) == 4 and {s for s in states if s} <= {"preempted", "done"}, states
    assert "preempted" in states, states
    again = lintrans(tmp_path, "run", TINY, "--backend", "local")
    assert again.returncode == 0, again.stderr[-2000:]
    assert [r["status"] for r in table_rows(tmp_path, TINY)] == ["done"] * 6


def test_a_crashed_trial_is_restarted_and_an_interrupted_one_is_not_counted(tmp_path):
    """kill -9 of a trial process (as the OOM killer does) is a crash: restarted from its checkpoint.
    Ctrl-C of the launcher is an interruption: the trial checkpoints, and that is not a crash."""
    cmd = [sys.executable, "-m", "launchers", "--runs-dir", str(tmp_path), "run", LONG, "--backend", "local"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trial = wait_until("the trial directory", lambda: next(iter(trial_dirs(tmp_path, "long")), None), 300)
    wait_until("training progress", lambda: (status_of(trial).get("step") or 0) >= 20, 600)
    os.kill(status_of(trial)["pid"], signal.SIGKILL)
    wait_until("the restart", lambda: status_of(trial).get("attempt") == 2 and status_of(trial)["state"] == "running",
               300)  # fmt: skip
    wait_until(
        "more progress", lambda: (status_of(trial).get("step") or 0) >= status_of(trial)["resumed_from"] + 5, 300
    )
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    assert "restart  " in out and "killed by SIGKILL" in out
    st = status_of(trial)
    assert st["state"] == "preempted" and st["resumed_from"] >= 20, st
    again = lintrans(tmp_path, "run", LONG, "--backend", "local")
    assert again.returncode == 0, again.stdout + again.stderr
    st = status_of(trial)
    assert st["state"] == "done" and st["attempt"] == 3 and st["step"] == 200, st
    assert len(list((trial / "records").glob("*.json"))) == 1


def test_two_runs_of_one_sweep_run_each_trial_once(tmp_path):
    procs = [
        subprocess.Popen([sys.executable, "-m", "launchers", "--runs-dir", str(tmp_path), "run", TINY], cwd=ROOT,
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    started = sum(out.count("  started  ") for out in outs)
    assert started == 6, outs  # the second run waited for the first one's lock, then found them all done
    assert any("holds its submission lock; waiting" in out for out in outs)
    assert all(status_of(t)["attempt"] == 1 for t in trial_dirs(tmp_path, "tiny"))


def test_the_foreground_backend_runs_trials_through_the_one_entry_point(tmp_path):
    """The smallest backend (README, "Adding a backend"): in this process, one trial after another."""
    sweep = one_trial_sweep(tmp_path, "fg", 4, "evaluations: [{mode: elbo, num_test: 8}]\n")
    result = lintrans(tmp_path, "run", str(sweep), "--backend", "foreground")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "foreground: 1 trial, one at a time in this process" in result.stdout
    (trial,) = trial_dirs(tmp_path, "fg")
    st = status_of(trial)
    assert st["state"] == "done" and st["backend"] == "foreground" and st["step"] == 4, st
    (row,) = table_rows(tmp_path, str(sweep))
    assert row["status"] == "done" and row["backend"] == "foreground" and isinstance(row["nll_bpd"], float), row
    again = lintrans(tmp_path, "run", str(sweep), "--backend", "foreground")
    assert again.returncode == 0 and "nothing to submit: 1 done" in again.stdout


def test_an_evaluation_added_later_runs_on_the_done_trial_and_a_snapshot_has_its_own_columns(tmp_path):
    """Two training budgets from one run (docs/results.md, the 800-step study): the ELBO of the last step,
    then, added to the sweep file afterwards, of snapshot 2: `run` evaluates it from the checkpoint
    without training again, and the table has both side by side."""
    sweep = tmp_path / "budget.yaml"
    text = ("name: budget\nconfig: tests/configs/tiny.py\naxes:\n  model.K: [2]\n"
            "overrides: {training.n_iters: 4, training.snapshot_freq: 2}\nevaluations:\n"
            "  - {mode: elbo, num_test: 8}\n")  # fmt: skip
    sweep.write_text(text)
    assert lintrans(tmp_path, "run", str(sweep), "--backend", "foreground").returncode == 0
    (trial,) = trial_dirs(tmp_path, "budget")
    trained = (trial / "checkpoints" / "checkpoint_4.pth").stat().st_mtime_ns
    sweep.write_text(text + "  - {mode: elbo, num_test: 8, checkpoint: 2, param_name: early}\n")
    dry = lintrans(tmp_path, "run", str(sweep), "--dry-run")
    assert "evaluate" in dry.stdout and "dry run: 1 of 1 trial would be submitted" in dry.stdout, dry.stdout
    result = lintrans(tmp_path, "run", str(sweep), "--backend", "foreground")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (trial / "checkpoints" / "checkpoint_4.pth").stat().st_mtime_ns == trained  # not trained again
    (row,) = table_rows(tmp_path, str(sweep))
    assert row["status"] == "done" and row["steps"] == 4, row
    assert isinstance(row["nll_bpd"], float) and isinstance(row["nll_bpd_step2"], float), row
    assert row["nll_bpd"] != row["nll_bpd_step2"] and row["elbo.L_K"] == row["elbo_step2.L_K"], row
    again = lintrans(tmp_path, "run", str(sweep), "--backend", "foreground")
    assert again.returncode == 0 and "nothing to submit: 1 done" in again.stdout


def test_an_evaluation_of_a_snapshot_no_trial_saves_is_refused(tmp_path):
    sweep = one_trial_sweep(tmp_path, "odd", 4, "evaluations: [{mode: elbo, checkpoint: 3}]\n")
    result = lintrans(tmp_path, "run", str(sweep), "--backend", "foreground")
    assert_usage_error(result, "3 is not a snapshot every trial saves: choose a multiple of training.snapshot_freq")
    assert not (tmp_path / "sweeps").exists()


def test_status_and_table_read_a_runs_folder_they_cannot_write(tmp_path):
    base = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own tmp folders are private to root
    sweep, runs = one_trial_sweep(base, "ro", 2, ""), base / "runs"
    try:
        assert lintrans(runs, "run", str(sweep), "--backend", "foreground").returncode == 0
        (runs / "results.csv").unlink()
        subprocess.run(["chmod", "-R", "a-w,a+rX", str(base)], check=True)
        as_user = [] if os.geteuid() else ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        for args in (["status", str(sweep)], ["table", str(sweep), "--format", "json"]):
            cmd = [*as_user, sys.executable, "-m", "launchers", "--runs-dir", str(runs), *args]
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env())
            assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        assert "done" in result.stdout and not (runs / "results.csv").exists()  # nothing written
        out = tmp_path / "t.csv"
        assert lintrans(runs, "table", str(sweep), "--out", str(out)).returncode == 0
        assert out.read_text().startswith("sweep,trial,") and out.read_text().count("\n") == 2
        bad = lintrans(runs, "table", str(sweep), "--out", str(tmp_path / "t.xlsx"))
        assert bad.returncode == 2 and "--out" in bad.stderr and "valid: .csv, .json, .md" in bad.stderr
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(base)], check=True)
        shutil.rmtree(base)


def test_every_trial_says_what_produced_its_numbers_and_the_table_says_when_they_differ(tmp_path):
    sweep = one_trial_sweep(tmp_path, "prov", 2, "")
    fp32 = lintrans(tmp_path, "run", str(sweep), "--backend", "foreground", extra_env={"LINTRANS_CPU_BF16": "0"})
    assert fp32.returncode == 0, fp32.stderr
    sweep.write_text(sweep.read_text().replace("model.K: [2]", "model.K: [2, 3]"))  # one more trial, in bf16
    bf16 = lintrans(tmp_path, "run", str(sweep), "--backend", "foreground", extra_env={"LINTRANS_CPU_BF16": "1"})
    assert bf16.returncode == 0, bf16.stderr
    shown = lintrans(tmp_path, "table", str(sweep), "--columns", "trial,K,precision,device,torch,commit",
                     "--format", "json")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert [list(r) for r in rows] == [["trial", "K", "precision", "device", "torch", "commit"]] * 2
    assert [(r["K"], r["precision"]) for r in rows] == [(2, "fp32"), (3, "bf16")]
    assert rows[0]["device"].startswith("cpu: ") and rows[0]["torch"] == torch.__version__
    note = "note: these trials' numbers come from different set-ups (precision bf16, fp32)"
    assert note in shown.stderr
    assert note in lintrans(tmp_path, "status", str(sweep)).stdout  # status says it too
    assert "| K |" in bf16.stdout and "precision" not in bf16.stdout  # the table `run` prints stays as it was
    bad = lintrans(tmp_path, "table", str(sweep), "--columns", "trial,precison")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "unknown column 'precison'; valid: sweep, trial, K, seed, status" in bad.stderr


def test_clean_frees_old_checkpoints_and_never_what_a_resume_or_a_running_trial_needs(tmp_path):
    sweep = one_trial_sweep(tmp_path, "disk", 4, "")
    sweep.write_text(sweep.read_text().replace("training.n_iters: 4", "training.n_iters: 4, training.snapshot_freq: 1"))
    assert lintrans(tmp_path, "run", str(sweep), "--backend", "foreground").returncode == 0
    (trial,) = trial_dirs(tmp_path, "disk")
    snapshots = sorted(p.name for p in (trial / "checkpoints").glob("*.pth"))
    assert snapshots == [f"checkpoint_{n}.pth" for n in (1, 2, 3, 4)]
    shown = lintrans(tmp_path, "status", str(sweep))
    assert re.search(r"disk: [\d.]+ (KiB|MiB) under ", shown.stdout), shown.stdout
    dry = lintrans(tmp_path, "clean", str(sweep), "--dry-run")
    assert dry.returncode == 0 and ": 3 checkpoints" in dry.stdout and "would free" in dry.stdout
    assert len(list((trial / "checkpoints").glob("*.pth"))) == 4  # a dry run removes nothing
    with lock_held_elsewhere(trial / ".lock"):
        busy = lintrans(tmp_path, "clean", str(sweep))
        assert f"skip    {trial.name}" in busy.stdout and "running" in busy.stdout
    assert len(list((trial / "checkpoints").glob("*.pth"))) == 4  # a running trial is never touched
    cleaned = lintrans(tmp_path, "clean", str(sweep))
    assert cleaned.returncode == 0 and "freed" in cleaned.stdout
    assert [p.name for p in (trial / "checkpoints").glob("*.pth")] == ["checkpoint_4.pth"]
    assert (trial / "checkpoints-meta" / "checkpoint.pth").is_file()  # what a re-run resumes from
    again = lintrans(tmp_path, "run", str(sweep), "--backend", "foreground")
    assert again.returncode == 0 and "nothing to submit: 1 done" in again.stdout
    bad = lintrans(tmp_path, "clean", str(sweep), "--keep", "-1")
    assert bad.returncode == 2 and "--keep -1" in bad.stderr


def test_run_shows_progress_in_place_on_a_terminal_and_as_lines_elsewhere(tmp_path):
    sweep = one_trial_sweep(tmp_path, "prog", 30, "local: {slots: 1, progress_s: 1}\n")
    sweep.write_text(sweep.read_text().replace("model.K: [2]", "model.K: [2, 3]"))
    leader, follower = pty.openpty()
    cmd = [sys.executable, "-m", "launchers", "--runs-dir", str(tmp_path), "run", str(sweep)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=follower, stderr=subprocess.DEVNULL)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait() == 0
    text = seen.decode()
    assert "\r\x1b[Kprogress: 0/2 finished; " in text  # redrawn in place
    assert re.search(r"progress: [01]/2 finished; \w{10} \d+/30", text), text  # a running trial's step/total
    assert "progress: 2/2 finished" in text
    # not a terminal: plain lines, only when they change
    lines = io.StringIO()
    shown = Progress(2, every_s=0, stream=lines)
    trials = load(sweep, tmp_path).trials()
    for _ in range(2):
        shown.update(1, trials[1:])
    assert lines.getvalue() == f"progress: 1/2 finished; {trials[1].id} 30/30\n"
