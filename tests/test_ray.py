"""The Ray Tune backend on a local Ray cluster: ASHA in steps, one copy of each checkpoint, per-trial
logs, honest failures, multi-worker DDP trials. Every `run` starts and shuts down its own Ray."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from launchers.backends.ray import bundles, torchrun_env
from launchers.schema import Resources
from launchers.sweep import load
from tests.conftest import (
    CANARIES,
    DDP_ATOL,
    DDP_CONFIG,
    ROOT,
    assert_no_canary,
    assert_same_weights,
    lintrans,
    require_ray,
    start_run,
    status_of,
    table_rows,
    trial_dirs,
    wait_until,
    weights,
)

RANDOM = "tests/sweeps/random.yaml"
ASHA = "tests/sweeps/asha.yaml"
FAILING = "tests/sweeps/failing.yaml"
DDP = "tests/sweeps/ddp_ray.yaml"


@pytest.fixture(autouse=True)
def no_ray_left():
    """Each `run` shuts its Ray down: no raylet may outlive a test."""
    yield
    wait_until(
        "the test's raylet to exit",
        lambda: subprocess.run(["pgrep", "-x", "raylet"], stdout=subprocess.DEVNULL).returncode == 1,
        60,
    )


def assert_clean(result: subprocess.CompletedProcess) -> None:
    text = result.stdout + result.stderr
    assert "TuneError" not in text and "Traceback" not in text, text[-3000:]


# ----------------------------------------------------------------------------------------- pure parts


def test_one_bundle_per_rank():
    assert bundles(Resources(cpus=2)) == [{"CPU": 2.0}]
    assert bundles(Resources(cpus=1, tasks_per_node=2)) == [{"CPU": 1.0}] * 2
    assert bundles(Resources(cpus=4, gpus=2, nodes=2)) == [{"CPU": 4.0, "GPU": 1.0}] * 4


def test_torchrun_env_numbers_ranks_per_node():
    places = [("a", "10.0.0.1", ["3"]), ("b", "10.0.0.2", ["0"]), ("a", "10.0.0.1", ["5"]), ("b", "10.0.0.2", ["1"])]
    envs = torchrun_env(places, 29411)
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert {e["WORLD_SIZE"] for e in envs} == {"4"} and {e["LOCAL_WORLD_SIZE"] for e in envs} == {"2"}
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "0", "1", "1"]
    assert {e["MASTER_ADDR"] for e in envs} == {"10.0.0.1"} and {e["MASTER_PORT"] for e in envs} == {"29411"}
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3,5", "0,1", "3,5", "0,1"]  # LOCAL_RANK picks its own
    cpu = torchrun_env([("a", "10.0.0.1", []), ("a", "10.0.0.1", [])], 1234)
    assert "CUDA_VISIBLE_DEVICES" not in cpu[0] and [e["LOCAL_RANK"] for e in cpu] == ["0", "1"]
    from lintrans.distributed import detect

    info = detect(envs[2])
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (2, 4, 1, 2)
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 29411)


def test_asha_needs_a_metric_reported_during_training(tmp_path):
    sweep = tmp_path / "asha.yaml"
    text = (ROOT / ASHA).read_text().replace("metric: eval_loss", "metric: nll_bpd")
    sweep.write_text(text)
    result = lintrans(tmp_path / "runs", "run", str(sweep), "--backend", "ray")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {sweep}: ray.asha compares trials during training, on eval_loss or train_loss; "
        "search.objective.metric is 'nll_bpd'"
    ]


# ----------------------------------------------------------------------------------------- ASHA


def test_asha_stops_the_slow_learners_for_good(tmp_path):
    require_ray()
    result = lintrans(tmp_path, "run", ASHA, "--backend", "ray")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_clean(result)
    rows = table_rows(tmp_path, ASHA)
    for r in rows:
        print(f"asha: lr={r['optim.lr']:g} {r['status']} at step {r['steps']} of 40 (eval_loss {r['eval_loss']:.3f})")
    slow = [r for r in rows if r["optim.lr"] < 1e-4]
    fast = [r for r in rows if r["optim.lr"] > 1e-4]
    assert len(slow) == 2 and len(fast) == 2
    assert all(r["status"] == "done" and r["steps"] == 40 for r in fast), fast
    assert all(r["status"] == "stopped" and r["steps"] < 40 for r in slow), slow
    assert all(r["reason"].startswith("stopped early by the trial scheduler at step 20 (eval_loss=") for r in slow)
    shown = lintrans(tmp_path, "status", ASHA)
    assert shown.returncode == 0 and "sweep asha: 4 trials (done 2, stopped 2)" in shown.stdout, shown.stdout
    states = {line.split()[0]: line.split()[3] for line in shown.stdout.splitlines()[1:5]}  # id, lr=, seed=, state
    assert states == {r["trial"]: r["status"] for r in rows}
    stopped = {t: status_of(t) for t in trial_dirs(tmp_path, "asha") if status_of(t)["state"] == "stopped"}
    assert len(stopped) == 2 and all(s["resumable"] is False for s in stopped.values())

    again = lintrans(tmp_path, "run", ASHA, "--backend", "ray")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to submit" in again.stdout and "ray:" not in again.stdout
    assert {t: status_of(t) for t in stopped} == stopped  # left alone: not restarted, not rewritten

    resumed = lintrans(tmp_path, "run", ASHA, "--backend", "ray", "--resume-stopped")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert_clean(resumed)
    for trial in stopped:  # from its own checkpoint at step 20 (ASHA, fresh in this run, may stop it again)
        st = status_of(trial)
        assert st["attempt"] == 2 and st["resumed_from"] == 20 and st["step"] > 20, st
        assert st["state"] in ("done", "stopped"), st
        print(f"asha --resume-stopped: {trial.name} {st['state']} at step {st['step']}")


# ----------------------------------------------------------------------------------------- one sweep, three checks


@pytest.fixture(scope="module")
def random_on_ray(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    require_ray()
    runs = tmp_path_factory.mktemp("random-ray")
    result = lintrans(runs, "run", RANDOM, "--backend", "ray", extra_env=CANARIES)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_clean(result)
    assert_no_canary(runs)  # secrets in the environment of `run` and of the trials: none written
    return runs, result


def test_random_search_on_ray_runs_the_sweeps_own_trials(random_on_ray):
    runs, _ = random_on_ray
    rows = table_rows(runs, RANDOM)
    expected = load(RANDOM, runs).trials()
    assert [r["trial"] for r in rows] == [t.id for t in expected]  # the ids any backend runs
    assert [r["optim.lr"] for r in rows] == [t.overrides["optim.lr"] for t in expected]
    assert all(r["status"] == "done" and r["steps"] == 30 and r["backend"] == "ray" for r in rows), rows


def file_bytes(folder: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.is_file())


def test_ray_keeps_one_copy_of_each_checkpoint(random_on_ray):
    runs, _ = random_on_ray
    sweep_dir = runs / "sweeps" / "random"
    checkpoints = sum(file_bytes(d) for d in sweep_dir.glob("*/checkpoints*") if d.is_dir())
    tune = file_bytes(sweep_dir / "ray")
    print(f"bytes under ray/: {tune:,}; bytes in the trials' checkpoints*: {checkpoints:,} "
          f"({100 * tune / checkpoints:.2f} %)")  # fmt: skip
    assert checkpoints > 0 and tune > 0
    assert tune < 0.05 * checkpoints
    assert not [p for p in (sweep_dir / "ray").rglob("*") if "checkpoint" in p.name]


def test_each_ray_trial_writes_its_own_log(random_on_ray):
    runs, result = random_on_ray
    for trial in trial_dirs(runs, "random"):
        log = (trial / "train.log").read_text()
        assert "step 0: eval loss" in log and "step 30: eval loss" in log and f"trial {trial.name} done" in log
    assert "Trial status" in result.stdout  # Tune's own progress still reaches the driver's console
    assert "eval loss" not in result.stdout + result.stderr  # the trials' output does not


def test_a_driver_that_returned_makes_tunes_saved_states_final(tmp_path, monkeypatch):
    """Tune may save a trial as PENDING just before it errors; once ``fit`` has returned, that is no queue.

    The driver is this very process (alive) while it prints the final table: without its ``driver_ended``
    stamp the failed trial read ``queued`` and ``run`` exited 0 (seen once in CI).
    """
    from types import SimpleNamespace

    from launchers import state, status
    from launchers.backends import ray as ray_backend

    trial = SimpleNamespace(id="t", run_dir=tmp_path / "sweep" / "t")
    trial.run_dir.mkdir(parents=True)
    state.write_launch(trial.run_dir, "ray", "exp", None, driver=f"{socket.gethostname()}:{os.getpid()}")
    state.write_status(trial.run_dir, "failed", reason="ray: worker died", resumable=True)
    monkeypatch.setattr(ray_backend, "tune_states", lambda _: {str(trial.run_dir.resolve()): "PENDING"})
    backend = ray_backend.RayBackend()
    assert status.views([trial], backend.observe([trial]))["t"].state == "queued"  # the driver still runs
    state.mark_launch(trial.run_dir, "driver_ended")
    seen = status.views([trial], backend.observe([trial]))["t"]
    assert (seen.state, seen.reason) == ("failed", "ray: worker died")


# ----------------------------------------------------------------------------------------- failures


def test_a_trial_that_fails_is_failed_and_run_says_so(tmp_path):
    require_ray()
    result = lintrans(tmp_path, "run", FAILING, "--backend", "ray")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["optim.lr"]: r for r in table_rows(tmp_path, FAILING)}
    assert rows[0.05]["status"] == "done"
    bad = rows[1e6]
    assert bad["status"] == "failed" and bad["reason"].startswith("non-finite loss"), bad
    trial = next(t for t in trial_dirs(tmp_path, "failing") if t.name == bad["trial"])
    assert bad["reason"] in (trial / "train.log").read_text()  # the error's own line
    assert f"failed  {bad['trial']} lr=1e+06 seed=0: non-finite loss" in result.stderr
    assert status_of(trial)["attempt"] == 1  # a retry cannot fix a diverging run: not retried
    allowed = lintrans(tmp_path, "run", FAILING, "--backend", "ray", "--allow-failures")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "nothing to submit" in allowed.stdout


def kill_trial_actor_midway(runs: Path, sweep_file: str, sweep: str) -> tuple[subprocess.Popen, Path]:
    """Start ``run`` on Ray, wait for 10 steps, SIGKILL the trial's actor (the pid its status records)."""
    proc, trial = start_run(runs, sweep_file, sweep, "--backend", "ray")
    os.kill(status_of(trial)["pid"], signal.SIGKILL)
    return proc, trial


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it, from ``/proc/*/stat``'s parent pids."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        parent[int(stat.parent.name)] = int(fields[1])
    found, grew = {pid}, True
    while grew:
        below = {p for p, pp in parent.items() if pp in found} - found
        found |= below
        grew = bool(below)
    return found


def listening_addresses(pids: set[int]) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses of the TCP sockets the processes listen on (``/proc/net/tcp*``, state 0A);
    an IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) as its IPv4 address."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:
                raw = bytes.fromhex(cols[1].split(":")[0])
                words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]  # each 32-bit word little-endian
                ip = ipaddress.ip_address(b"".join(words))
                found.add(getattr(ip, "ipv4_mapped", None) or ip)
    return found


def test_ray_retries_a_killed_worker_from_its_checkpoint(tmp_path):
    require_ray()
    proc, trial = start_run(tmp_path, "tests/sweeps/long.yaml", "long", "--backend", "ray")  # ray.max_failures: 2
    # The Ray that `run` started (GCS, raylet, workers, the driver) listens on loopback only.
    listening = listening_addresses(descendants(proc.pid))
    assert listening and all(a.is_loopback for a in listening), listening
    os.kill(status_of(trial)["pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    st = status_of(trial)
    assert st["state"] == "done" and st["attempt"] == 2 and st["step"] == 200, st
    assert st["resumed_from"] >= 10, st  # the retry continued from the checkpoint, not from scratch


def test_a_trial_ray_gives_up_on_is_failed_with_rays_reason(tmp_path):
    require_ray()
    sweep = tmp_path / "killed.yaml"
    sweep.write_text((ROOT / "tests/sweeps/long.yaml").read_text().replace("name: long", "name: killed")
                     .replace("ray: {max_failures: 2}", "ray: {max_failures: 0}"))  # fmt: skip
    proc, trial = kill_trial_actor_midway(tmp_path, str(sweep), "killed")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-3000:] + err[-3000:]
    st = status_of(trial)
    assert st["state"] == "failed" and st["reason"].startswith("ray: "), st
    print(f"reason: {st['reason']}")
    assert f"failed  {trial.name}" in err and st["reason"] in err


# ----------------------------------------------------------------------------------------- multi-worker trials


def test_two_cpu_workers_on_ray_match_one_process(tmp_path, single_run):
    require_ray()
    result = lintrans(tmp_path, "run", DDP, "--backend", "ray")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_clean(result)
    (trial,) = trial_dirs(tmp_path, "ddp-ray")
    assert status_of(trial)["state"] == "done" and status_of(trial)["step"] == 5
    assert json.loads((trial / "trial.json").read_text())["world_size"] == 2
    import torch

    saved = torch.load(trial / "checkpoints-meta" / "checkpoint.pth", weights_only=True)
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2  # two ranks trained
    assert "ray: 2 DDP ranks on nodes" in (trial / "train.log").read_text()
    assert_same_weights(weights(trial), single_run, atol=DDP_ATOL)


def test_the_ray_ddp_sweep_trains_what_the_reference_trains():
    (trial,) = load(DDP).trials()
    assert {k: v for k, v in trial.overrides.items() if k != "seed"} == DDP_CONFIG
