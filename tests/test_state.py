"""Trial state without a scheduler: what `status` shows for each combination of files, lock and scheduler account."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from launchers import state, status
from launchers.backends.slurm import array_tasks, arrays
from launchers.state import Observation
from launchers.sweep import Trial
from launchers.trial import record_crash
from lintrans.procenv import process_start, same_process
from tests.conftest import lock_held_elsewhere


def write(trial, name: str, data) -> None:
    (trial / name).write_text(data if isinstance(data, str) else json.dumps(data))


def test_pending_queued_and_terminal_states(tmp_path):
    assert status.view(tmp_path).state == "pending"
    state.write_launch(tmp_path, "slurm", "7_1", "log")
    assert status.view(tmp_path).state == "queued"  # submitted, nobody asked the scheduler
    queued = status.view(tmp_path, Observation("queued", "PENDING (ReqNodeNotAvail, UnavailableNodes:n2)"))
    assert (queued.state, queued.reason) == ("queued", "PENDING (ReqNodeNotAvail, UnavailableNodes:n2)")
    time.sleep(0.01)
    state.write_status(tmp_path, "done", step=30)
    assert status.view(tmp_path, Observation("running", "COMPLETING")).state == "done"  # the trial's own word wins


def test_a_job_that_ended_without_the_trial_saying_so_is_failed(tmp_path):
    state.write_launch(tmp_path, "slurm", "9_0", "log")
    time.sleep(0.01)
    state.write_status(tmp_path, "running", step=12)
    seen = status.view(tmp_path, Observation("ended", "NODE_FAIL (exit 0:0)"))
    assert seen.state == "failed"
    assert seen.reason == "slurm job 9_0 ended NODE_FAIL (exit 0:0) without the trial recording a state"
    # a requeued job is back in the queue: the trial waits, it is not running
    assert status.view(tmp_path, Observation("queued", "PENDING (BeginTime)")).state == "queued"


def test_a_job_that_died_before_the_trial_started(tmp_path):
    state.write_status(tmp_path, "preempted", step=3)
    time.sleep(0.01)
    state.write_launch(tmp_path, "slurm", "4_2", "log")
    seen = status.view(tmp_path, Observation("ended", "FAILED (exit 1:0)"))
    assert seen.state == "failed" and "ended FAILED (exit 1:0) before the trial started" in seen.reason


def test_a_process_that_died_silently_is_failed_and_a_live_lock_is_running(tmp_path):
    state.write_status(tmp_path, "running", step=5)
    assert status.view(tmp_path).state == "failed"
    with lock_held_elsewhere(tmp_path / state.LOCK):
        assert status.view(tmp_path).state == "running"
    assert status.view(tmp_path).state == "failed"


def test_record_crash_names_the_signal(tmp_path):
    state.write_launch(tmp_path, "local", "123", "log")
    time.sleep(0.01)
    state.write_status(tmp_path, "running", step=5)
    assert record_crash(tmp_path, -signal.SIGKILL) == "killed by SIGKILL"
    st = state.status(tmp_path)
    assert st["state"] == "failed" and st["resumable"] is True
    assert st["reason"].startswith("trial process killed by SIGKILL (out of memory?")
    state.write_status(tmp_path, "preempted")
    assert record_crash(tmp_path, 75) is None  # the trial recorded its ending itself


def test_damaged_status_with_every_record_is_done(tmp_path):
    spec = {"id": "t", "n_iters": 10, "evaluations": [{"mode": "elbo", "experiment_name": "s", "param_name": "t"}]}
    write(tmp_path, state.SPEC, spec)
    (tmp_path / "records").mkdir()
    write(tmp_path / "records", "elbo-s-t-ckpt0.json", {"metrics": {"nll_bpd": 1.0}, "run": {"steps": 10}})
    write(tmp_path, state.STATUS, '{"state": "do')  # truncated
    assert status.view(tmp_path).state == "done"
    state.write_launch(tmp_path, "slurm", "8_0", "log")  # the job that ran it, over since
    assert status.view(tmp_path, Observation("ended", "COMPLETED (exit 0:0)")).state == "done"
    assert status.view(tmp_path).state == "done"
    write(tmp_path / "records", "elbo-s-t-ckpt0.json", {"metrics": {"nll_bpd": 1.0}, "run": {"steps": 5}})
    assert status.view(tmp_path).state == "queued"  # a record of another step does not count


def test_a_trial_cancelled_before_it_started_is_stopped_and_run_resumes_it(tmp_path):
    state.write_launch(tmp_path, "slurm", "5_2", "log")
    state.mark_launch(tmp_path, "cancelled")
    seen = status.view(tmp_path, Observation("ended", "CANCELLED (exit 0:0)"))
    assert (seen.state, seen.reason) == ("stopped", "cancelled before it started (slurm job 5_2)")
    assert status.view(tmp_path).state == "stopped"  # nobody asked the scheduler: it is still cancelled
    trial = Trial("t", 0, {}, tmp_path, ())
    assert status.plan(None, [trial], {"t": seen}) == {"t": "resume"}
    (tmp_path / "early").mkdir()  # stopped by ASHA: not resumed without --resume-stopped
    state.write_status(tmp_path / "early", "stopped", resumable=False, reason="stopped early")
    early = status.view(tmp_path / "early")
    assert status.plan(None, [trial], {"t": early}) == {"t": "skip (stopped; --resume-stopped resumes it)"}


def test_an_sbatch_script_nobody_submitted_is_written(tmp_path):
    script = "/runs/sweeps/s/sbatch/x/s.0.sbatch"
    state.write_launch(tmp_path, "sbatch", None, None, script=script)
    seen = status.view(tmp_path)
    assert (seen.state, seen.reason) == ("written", f"not submitted yet; submit with: sbatch {script}")
    assert status.plan(None, [Trial("t", 0, {}, tmp_path, ())], {"t": seen}) == {"t": "skip (written)"}
    assert status.view(tmp_path, Observation("queued", "PENDING")).state == "queued"  # someone submitted it


def test_sacct_range_records_stand_for_each_task():
    assert array_tasks("5_[1-2%1]") == ["5_1", "5_2"]
    assert array_tasks("5_[0,3-4]") == ["5_0", "5_3", "5_4"]
    assert array_tasks("5_7") == ["5_7"] and array_tasks("12") == ["12"]
    assert arrays(["12_0", "12_1", "9", "13_4"]) == ["12", "13", "9"]


def test_locks_die_with_their_holder(tmp_path):
    lock = state.Lock(tmp_path / "x.lock")
    assert lock.acquire() and not state.Lock(tmp_path / "x.lock").acquire()
    pid = os.fork()
    if pid == 0:  # the child sees the parent's lock as held elsewhere
        os._exit(0 if state.Lock(tmp_path / "x.lock").held_elsewhere() else 1)
    assert os.waitpid(pid, 0)[1] == 0
    lock.release()
    assert not state.Lock(tmp_path / "x.lock").held_elsewhere()


def test_a_preempted_trial_whose_job_was_killed_is_failed_unless_we_cancelled_it(tmp_path):
    state.write_launch(tmp_path, "slurm", "11_1", "log")
    time.sleep(0.01)
    state.write_status(tmp_path, "preempted", reason="signal during training", step=14)
    killed = status.view(tmp_path, Observation("ended", "CANCELLED (exit 0:9)"))
    assert killed.state == "failed" and killed.resumable is True
    assert killed.reason.startswith("slurm job 11_1 ended CANCELLED (exit 0:9) after the trial stopped")
    assert status.view(tmp_path, Observation("ended", "COMPLETED (exit 0:0)")).state == "preempted"
    state.mark_launch(tmp_path, "cancelled")  # `lintrans cancel` asked for it
    assert status.view(tmp_path, Observation("ended", "CANCELLED (exit 0:15)")).state == "preempted"


def test_a_crashed_trial_whose_job_was_requeued_is_queued(tmp_path):
    """A rank lost its peer when a node died (the trial recorded a crash); SLURM requeued the job: it will run."""
    state.write_launch(tmp_path, "slurm", "5_0", "log")
    time.sleep(0.01)
    state.write_status(tmp_path, "failed", reason="RuntimeError: connection closed by peer", resumable=True)
    assert status.view(tmp_path, Observation("queued", "PENDING (ReqNodeNotAvail)")).state == "queued"
    state.write_status(tmp_path, "failed", reason="config.model.K must be ...", resumable=False)
    assert status.view(tmp_path, Observation("running", "COMPLETING")).state == "failed"


def test_a_cancelled_job_that_is_still_ending_does_not_hold_its_trial(tmp_path):
    """`cancel` then `run` at once: the cancelled job still COMPLETING must not make `run` skip the trial."""
    state.write_launch(tmp_path, "slurm", "12_0", "log")
    time.sleep(0.01)
    state.write_status(tmp_path, "preempted", reason="signal SIGTERM during training", step=14)
    ending = Observation("running", "COMPLETING")
    assert status.view(tmp_path, ending).state == "running"  # a requeue nobody asked to stop runs it again
    state.mark_launch(tmp_path, "cancelled")
    seen = status.view(tmp_path, ending)
    assert seen.state == "preempted"
    assert seen.reason == "signal SIGTERM during training; cancelled; slurm job 12_0 still ending (COMPLETING)"


def test_a_pid_is_only_the_same_process_on_the_same_host_with_the_same_start(tmp_path):
    me, host = os.getpid(), socket.gethostname()
    start = process_start(me)
    assert same_process(host, me, start) and same_process(host, me, None)
    assert not same_process("elsewhere", me, start)  # another host's pid 1234 is not ours to signal
    assert not same_process(host, me, start + 1)  # the pid was reused by a later process
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert process_start(gone.pid) is None and not same_process(host, gone.pid, None)
    state.write_status(tmp_path, "running")
    assert state.status(tmp_path)["pid_start"] == start  # every status names its process by pid and start
