"""The fault suite: bad files, kills, signals and damage. Every one ends in a recorded state or one clear line.

Scheduler-side faults (scancel, kill -9 under SLURM, failing setup lines, two concurrent submissions,
a missing partition or cluster) are in tests/test_slurm.py; bad sweep files and override values,
including the Hypothesis-generated ones, in tests/test_sweep.py and tests/test_cli.py.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lintrans.run import Run
from tests.conftest import (
    IN_CI,
    ROOT,
    TINY,
    assert_usage_error,
    env,
    lintrans,
    run,
    status_of,
    table_rows,
    train_args,
    trial_dirs,
    wait_until,
    weights,
)


def tiny_sweep(tmp_path: Path, name: str, body: str = "") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nconfig: {TINY}\naxes:\n  model.K: [3]\nseeds: [0]\n{body}")
    return str(path)


# --------------------------------------------------------------------------- checkpoints


def test_random_kill_9_during_checkpointing_resumes_bitwise(tmp_path):
    """Ten SIGKILLs at random moments of a run that writes a checkpoint every other step, then the end."""
    args = ["--config.training.n_iters=40", "--config.training.snapshot_freq_for_preemption=2",
            "--config.training.log_freq=2"]  # fmt: skip
    full = run(train_args(tmp_path / "full", *args))
    assert full.returncode == 0, full.stderr
    killed = tmp_path / "killed"
    meta = killed / "checkpoints-meta" / "checkpoint.pth"
    rng = random.Random(0)
    kills = 0
    while kills < 10:
        proc = subprocess.Popen([sys.executable, *train_args(killed, *args)], cwd=ROOT, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        wait_until("a checkpoint", lambda p=proc: meta.is_file() or p.poll() is not None, 300, every=0.05)
        time.sleep(rng.uniform(0.0, 2.0))
        if proc.poll() is not None:
            break  # finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    final = run(train_args(killed, *args))
    assert final.returncode == 0, final.stderr
    assert torch.load(killed / "checkpoints-meta" / "checkpoint.pth", weights_only=True)["step"] == 40
    for key in ("model", "ema"):
        a, b = weights(tmp_path / "full", key), weights(killed, key)
        assert all(torch.equal(a[k], b[k]) for k in a), key
    assert kills >= 3, kills
    assert not list(killed.rglob(".*.tmp"))  # killed writes leave no temp file behind after the next start


def test_corrupt_checkpoint_is_one_line_naming_an_older_one(tmp_path):
    ok = run(train_args(tmp_path, "--config.training.snapshot_freq=5"))
    assert ok.returncode == 0, ok.stderr
    meta = tmp_path / "checkpoints-meta" / "checkpoint.pth"
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])  # truncated
    (tmp_path / "checkpoints-meta" / ".checkpoint.pth.abc.tmp").write_bytes(b"half a write")
    again = run(train_args(tmp_path, "--config.training.n_iters=20"))
    assert_usage_error(again, f"checkpoint {meta} cannot be read")
    assert "the newest readable older checkpoint is" in again.stderr and "checkpoint_10.pth (step 10)" in again.stderr
    assert not list(tmp_path.rglob(".*.tmp"))  # the next start removed the leftover
    garbage = run(["sample.py", f"--workdir={tmp_path}"])
    assert_usage_error(garbage, "cannot be read")


def test_a_trial_with_a_corrupt_checkpoint_is_failed_with_the_reason(tmp_path):
    sweep = tiny_sweep(
        tmp_path, "corrupt", "overrides: {training.n_iters: 10}\nevaluations: [{mode: elbo, num_test: 4}]\n"
    )
    assert lintrans(tmp_path, "run", sweep).returncode == 0
    (trial,) = trial_dirs(tmp_path, "corrupt")
    (trial / "checkpoints-meta" / "checkpoint.pth").write_bytes(b"not a checkpoint")
    status = json.loads((trial / "status.json").read_text())
    status["state"] = "preempted"  # as if stopped before its end, so that the re-run resumes it
    (trial / "status.json").write_text(json.dumps(status))
    again = lintrans(tmp_path, "run", sweep)
    assert again.returncode == 1, again.stdout + again.stderr
    st = status_of(trial)
    assert st["state"] == "failed" and "cannot be read" in st["reason"] and st["resumable"] is False, st
    assert f"failed  {trial.name} K=3 seed=0: checkpoint" in again.stderr


# --------------------------------------------------------------------------- signals


def test_a_signal_during_the_evaluations_preempts_and_the_rerun_redoes_only_what_is_missing(tmp_path):
    sweep = tiny_sweep(tmp_path, "evals", "overrides: {training.n_iters: 5}\nevaluations:\n"
                       "  - {mode: elbo, num_test: 8, num_train: 100, param_name: quick}\n"
                       "  - {mode: elbo, num_train: 4500, batch_size: 10, param_name: slow}\n")  # fmt: skip
    cmd = [sys.executable, "-m", "launchers", "--runs-dir", str(tmp_path), "run", sweep]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trial = wait_until("the trial directory", lambda: next(iter(trial_dirs(tmp_path, "evals")), None), 300)
    wait_until("the slow evaluation", lambda: "slow" in str(status_of(trial).get("evaluating")), 600, every=0.2)
    cancelled = lintrans(tmp_path, "cancel", sweep)
    assert "local: cancelled 1 trial" in cancelled.stdout, cancelled.stdout
    out, _ = proc.communicate(timeout=120)  # the trial stops now, not after its evaluation
    st = status_of(trial)
    assert st["state"] == "preempted" and "while evaluating" in st["reason"], (st, out)
    quick = trial / "records" / "elbo-evals-quick-ckpt0.json"
    before = quick.stat().st_mtime_ns
    again = lintrans(tmp_path, "run", sweep, "--allow-failures")
    assert again.returncode == 0 and status_of(trial)["state"] == "done", again.stdout + again.stderr
    assert quick.stat().st_mtime_ns == before  # the finished evaluation was not redone
    assert (trial / "records" / "elbo-evals-slow-ckpt0.json").is_file()


# --------------------------------------------------------------------------- files and tables


def test_table_survives_damaged_files_and_shows_the_current_sweep(tmp_path):
    sweep = tiny_sweep(tmp_path, "tab", "overrides: {training.n_iters: 3}\n")
    assert lintrans(tmp_path, "run", sweep).returncode == 0
    (trial,) = trial_dirs(tmp_path, "tab")
    Path(sweep).write_text(Path(sweep).read_text().replace("model.K: [3]", "model.K: [4]"))  # a new version
    assert [r["K"] for r in table_rows(tmp_path, sweep)] == [4]  # the current file's trials only
    result = lintrans(tmp_path, "table", sweep, "--all", "--format", "json")
    rows = json.loads(result.stdout)
    assert {r["K"] for r in rows} == {3, 4} and [r.get("stale") for r in rows if r["K"] == 3] == [True]
    (trial / "trial.json").write_text('{"id": "tru')  # truncated, in the stale trial
    other = tmp_path / "sweeps" / "other" / "x"
    other.mkdir(parents=True)
    (other / "trial.json").write_text("[not an object")  # malformed, in another sweep
    damaged = lintrans(tmp_path, "table", sweep, "--all", "--format", "json")
    assert damaged.returncode == 0 and "unreadable" in damaged.stderr and "Traceback" not in damaged.stderr
    assert len(json.loads(damaged.stdout)) == 1  # the damaged stale trial is warned about, not invented
    assert (tmp_path / "results.csv").is_file()


def test_evaluate_into_a_read_only_run_fails_before_the_work(tmp_path):
    """A read-only mount (root cannot write there either): one line, before the ELBO runs."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not available")
    ok = run(train_args(tmp_path))
    assert ok.returncode == 0, ok.stderr
    cmd = (f"mount --bind {tmp_path} {tmp_path} && mount -o remount,ro,bind {tmp_path} && "
           f"exec {sys.executable} evaluate.py --workdir={tmp_path} --mode=elbo")  # fmt: skip
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd], cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert_usage_error(result, f"cannot write into {tmp_path}/records: Read-only file system")
    assert "elbo:" not in result.stderr  # no progress bar: the work never started
    assert Run(tmp_path).step() == 10


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs: a real file system whose writes fail with ENOSPC once it is full (mounting needs root)."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the disk-full test mounts a tmpfs: CI runs as root")
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int, name: str = "filler", settle: float = 2.0) -> Path:
    """A file taking all of ``disk``'s free space but ``leave`` bytes.

    A trial may be writing a checkpoint meanwhile: once, in a full suite here, this write itself hit ENOSPC; and a
    checkpoint in flight frees its old file when it is renamed. So the file grows a MiB at a time
    while there is room, keeps taking what is freed for ``settle`` seconds, and gives back what it
    took of the ``leave`` bytes."""
    filler, deadline = disk / name, time.monotonic() + settle
    with open(filler, "wb", buffering=0) as f:
        while True:
            if (room := shutil.disk_usage(disk).free - leave) > 0:
                try:
                    f.write(b"\0" * min(room, 1 << 20))
                    continue
                except OSError as exc:  # ENOSPC: someone else took it first; look again after the pause
                    if exc.errno != errno.ENOSPC:
                        raise
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        short = leave - shutil.disk_usage(disk).free
        if short > 0:
            f.truncate(max(0, os.fstat(f.fileno()).st_size - short))
    return filler


def test_a_full_disk_fails_the_trial_with_the_reason_and_a_rerun_resumes(tmp_path, small_disk):
    overrides = "overrides: {training.n_iters: 300, training.snapshot_freq_for_preemption: 10}\n"
    sweep = tiny_sweep(tmp_path, "full", overrides)
    runs = small_disk / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "launchers", "--runs-dir", str(runs), "run", sweep,
                             "--backend", "local"], cwd=ROOT, env=env(), stdout=subprocess.PIPE, text=True)  # fmt: skip
    wait_until("a first checkpoint", lambda: trial_dirs(runs, "full") and (status_of(trial_dirs(runs, "full")[0])
               .get("step") or 0) >= 10, 300)  # fmt: skip
    (trial,) = trial_dirs(runs, "full")
    filler = fill(small_disk, leave=64 * 1024)  # room for status lines, not for a 300 KB checkpoint
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out
    st = status_of(trial)
    assert st["state"] == "failed" and st["resumable"] is True, st
    assert st["reason"].startswith(f"no space left on device ({trial}/checkpoints-meta/checkpoint.pth"), st
    kept = Run(trial).load(Run(trial).meta)  # the previous checkpoint still loads (weights_only)
    assert 10 <= kept["step"] < 300
    assert not list(runs.rglob("*.tmp"))  # no partial file anywhere
    # table --out into a disk with no room at all: one line, no partial file
    last = fill(small_disk, leave=0, name="last")
    table = lintrans(runs, "table", sweep, "--out", str(small_disk / "table.csv"))
    assert table.returncode == 1 and table.stderr.strip().endswith(f"no space left on device ({small_disk}/table.csv)")
    assert not (small_disk / "table.csv").exists() and not list(small_disk.glob(".*.tmp"))
    filler.unlink()  # space freed: the same command resumes the trial from its checkpoint
    last.unlink()
    again = lintrans(runs, "run", sweep, "--backend", "local")
    assert again.returncode == 0, again.stdout + again.stderr
    assert status_of(trial)["state"] == "done" and status_of(trial)["resumed_from"] == kept["step"]


def test_a_second_stop_signal_while_the_first_is_recorded_is_not_a_crash():
    """`cancel` and the launcher both send SIGTERM: the second one, arriving while the trial records the
    first as preempted, used to raise again inside the handler and end the trial failed (exit 1)."""
    from launchers.trial import Preempted, signals_preempt

    recorded = []
    with signals_preempt():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at the next bytecode
        except Preempted as first:
            os.kill(os.getpid(), signal.SIGTERM)  # the second, while the first is handled
            time.sleep(0.2)
            recorded.append(str(first))
    assert recorded == ["signal SIGTERM"]


def test_a_stop_signal_while_a_checkpoint_loads_preempts_instead_of_blaming_the_file(tmp_path, monkeypatch):
    """A `cancel` landing while a resuming trial read its checkpoint raised inside ``torch.load``;
    ``Run.load`` took that for a damaged file, and the trial failed for good ("no older checkpoint
    loads: delete it to start over") with a sound checkpoint (found by bench/chaos.py on CI)."""
    from launchers.trial import Preempted, signals_preempt

    sound = tmp_path / "checkpoint.pth"
    torch.save({"step": 3}, sound)
    read = torch.load

    def read_while_signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode, inside the read
        return read(*args, **kwargs)

    monkeypatch.setattr(torch, "load", read_while_signalled)
    with signals_preempt(), pytest.raises(Preempted, match="signal SIGTERM"):
        Run(tmp_path).load(sound)
    monkeypatch.setattr(torch, "load", read)
    assert Run(tmp_path).load(sound) == {"step": 3}
