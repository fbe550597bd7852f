"""Trials across two nodes: DDP under srun (submitit and plain sbatch scripts), a node failure survived,
torchrun with two agents, and Ray over two raylets (placement, a trial spanning both, a node lost).
Run alone with ``pytest -m multinode``.

The 2-node SLURM cluster comes from slurm/cluster.sh (nodes n1, n2 in their own UTS and mount
namespaces on this machine, private ports and folder). The 2-node Ray cluster is Ray's own
``ray.cluster_utils.Cluster``: a GCS and one raylet per node, real processes on this machine.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.clusters import Cluster, cluster_fixture, seen, wait_final
from tests.conftest import (
    DDP_ATOL,
    DDP_CONFIG,
    DDP_OVERRIDES,
    ROOT,
    assert_same_weights,
    env,
    lintrans,
    require_ray,
    start_run,
    status_of,
    train_args,
    trial_dirs,
    wait_until,
    weights,
)

pytestmark = pytest.mark.multinode


cluster2 = cluster_fixture(2, "lintrans-mn-")


def ddp_sweep(tmp_path: Path, name: str, extra: str = "") -> str:
    """A 2-node trial (one task per node) with the DDP-equivalence overrides of tests/test_training.py."""
    overrides = "".join(f"  {key}: {json.dumps(value)}\n" for key, value in DDP_CONFIG.items())  # JSON is YAML
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nconfig: tests/configs/tiny.py\naxes:\n  model.K: [5]\nseeds: [42]\n"
                    f"overrides:\n{overrides}resources: {{nodes: 2, tasks_per_node: 1, cpus: 1}}\n{extra}")  # fmt: skip
    return str(path)


def slurm_env(cluster: Cluster) -> dict:
    return {"SLURM_CONF": cluster.env["SLURM_CONF"]}


def test_two_node_trial_through_submitit_equals_one_process(tmp_path, cluster2, single_run):
    sweep = ddp_sweep(tmp_path, "ddp2")
    result = lintrans(tmp_path, "run", sweep, "--backend", "slurm", extra_env=slurm_env(cluster2))
    assert result.returncode == 0, result.stderr
    (row,) = wait_final(cluster2, tmp_path, sweep)
    (trial,) = trial_dirs(tmp_path, "ddp2")
    assert row["status"] == "done", (row, status_of(trial))
    assert status_of(trial)["environment"]["SLURM_JOB_NODELIST"] == "n[1-2]"
    assert_same_weights(weights(trial), single_run, atol=DDP_ATOL)


def test_two_node_trial_through_a_plain_sbatch_script_equals_one_process(tmp_path, cluster2, single_run):
    sweep = ddp_sweep(tmp_path, "ddp2sb")
    result = lintrans(tmp_path, "run", sweep, "--sbatch-only", extra_env=slurm_env(cluster2))
    assert result.returncode == 0, result.stderr
    (script,) = sorted((tmp_path / "sweeps" / "ddp2sb" / "sbatch").rglob("*.sbatch"))
    cluster2.run("sbatch", str(script))
    (row,) = wait_final(cluster2, tmp_path, sweep)
    (trial,) = trial_dirs(tmp_path, "ddp2sb")
    assert row["status"] == "done", (row, status_of(trial))
    assert_same_weights(weights(trial), single_run, atol=DDP_ATOL)


def test_a_node_failure_is_survived(tmp_path, cluster2):
    """node-kill n2 mid-trial: NODE_FAIL, requeue, the trial waits while n2 is down, then resumes and finishes."""
    sweep = tmp_path / "nodefail.yaml"
    sweep.write_text(
        "name: nodefail\nconfig: tests/configs/tiny.py\naxes:\n  model.K: [5]\nseeds: [0]\n"
        "overrides:\n  training.n_iters: 400\n  training.snapshot_freq_for_preemption: 5\n"
        "evaluations: [{mode: elbo, num_test: 20, num_train: 100}]\n"
        "resources: {nodes: 2, tasks_per_node: 1, time_min: 30}\nslurm: {max_requeues: 3}\n"
    )
    assert lintrans(tmp_path, "run", str(sweep), "--backend", "slurm", extra_env=slurm_env(cluster2)).returncode == 0
    trial = wait_until("the trial", lambda: next(iter(trial_dirs(tmp_path, "nodefail")), None), 120)
    wait_until("training on both nodes", lambda: (status_of(trial).get("step") or 0) >= 20, 600)
    job = json.loads((trial / "launch.json").read_text())["job_id"]

    killed = time.monotonic()
    assert cluster2.script("node-kill", "n2").returncode == 0
    wait_until("n2 down", lambda: "down" in cluster2.node_state("n2"), 120, every=0.25)
    detected = time.monotonic()
    wait_until("the requeue", lambda: "NODE_FAIL" in cluster2.sacct_states(job), 120, every=0.5)
    requeued = time.monotonic()
    step_at_failure = status_of(trial)["step"]

    # The requeued job waits for n2 once slurmd on n1 has ended rank 0 there (SIGTERM, then SIGKILL
    # after KillWait=5 s). Until then the job is still completing or rank 0 holds the trial's lock, and
    # `status` rightly says running: here that is over within a second, on CI once it was not after 5 s.
    def waiting() -> bool:
        out = lintrans(tmp_path, "status", str(sweep), extra_env=slurm_env(cluster2)).stdout
        return " queued " in out and "PENDING" in out

    wait_until("status to say queued (PENDING) while n2 is down", waiting, 120, every=2,
               describe=lambda: seen(cluster2, tmp_path, "nodefail"))  # fmt: skip
    assert "down" in cluster2.node_state("n2")

    assert cluster2.script("node-start", "n2").returncode == 0
    started = time.monotonic()
    wait_until("the second attempt", lambda: status_of(trial).get("attempt") == 2, 300, every=0.25)
    resumed = time.monotonic()
    (row,) = wait_final(cluster2, tmp_path, str(sweep))
    st = status_of(trial)
    assert row["status"] == "done" and st["attempt"] == 2 and st["step"] == 400, st
    assert 0 < st["resumed_from"] <= step_at_failure, st
    assert len(list((trial / "records").glob("*.json"))) == 1
    logs = "".join(p.read_text() for p in (trial.parent / "slurm").rglob("*_log.out"))
    assert f"resuming from {trial}/checkpoints-meta/checkpoint.pth at step {st['resumed_from']}" in logs
    print(f"node failure: detected {detected - killed:.1f} s after the kill, requeued after {requeued - killed:.1f} s; "
          f"attempt 2 running {resumed - started:.1f} s after node-start")  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_with_two_agents_equals_one_process(tmp_path, single_run):
    """Two ``torchrun --nnodes=2 --node-rank=i --rdzv-backend=c10d`` agents, as on two machines."""
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={i}", "--nproc-per-node=1",
             "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=lintrans-test",
             *train_args(tmp_path, *DDP_OVERRIDES)],
            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]  # fmt: skip
    outs = [a.communicate(timeout=600)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert_same_weights(weights(tmp_path), single_run, atol=DDP_ATOL)


# ----------------------------------------------------------------------------------------- Ray, two nodes


@pytest.fixture
def ray_nodes(request):
    """A real Ray cluster of a head and one worker node (``request.param``: the head's CPUs, default 1)."""
    require_ray()
    from ray.cluster_utils import Cluster as RayCluster

    cluster = RayCluster(initialize_head=True, head_node_args={"num_cpus": getattr(request, "param", 1),
                                                                "include_dashboard": False})  # fmt: skip
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster, worker
    cluster.shutdown()


def ray_nodes_of(trial: Path) -> list[str]:
    """The Ray node ids a trial's log says it ran on, in order (one line per attempt, one id per rank)."""
    text = (trial / "train.log").read_text()
    ranks = re.findall(r"ray: \d+ DDP ranks on nodes \[(.*?)\]", text)
    ranks_ids = [n.strip(" '") for line in ranks for n in line.split(",")]
    return ranks_ids or re.findall(r"ray: trial \S+ on node (\w+)", text)


def on_ray(tmp_path: Path, cluster, sweep: str) -> subprocess.CompletedProcess:
    result = lintrans(tmp_path, "run", sweep, "--backend", "ray", "--ray-address", cluster.address)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_ray_places_trials_on_both_nodes_and_a_two_worker_trial_spans_them(tmp_path, ray_nodes, single_run):
    cluster, worker = ray_nodes
    nodes = {cluster.head_node.node_id, worker.node_id}
    pair = tmp_path / "pair.yaml"
    pair.write_text("name: pair\nconfig: tests/configs/tiny.py\naxes:\n  model.K: [3, 5]\nseeds: [0]\n"
                    "overrides:\n  training.n_iters: 20\nresources: {cpus: 1}\nray: {max_concurrent: 2}\n")  # fmt: skip
    on_ray(tmp_path, cluster, str(pair))
    trials = trial_dirs(tmp_path, "pair")
    assert all(status_of(t)["state"] == "done" for t in trials)
    assert {ray_nodes_of(t)[0] for t in trials} == nodes  # 1 CPU per node: one trial on each

    on_ray(tmp_path, cluster, ddp_sweep(tmp_path, "ddp-ray2", "ray: {max_failures: 0}\n"))
    (trial,) = trial_dirs(tmp_path, "ddp-ray2")
    assert status_of(trial)["state"] == "done"
    assert set(ray_nodes_of(trial)) == nodes  # rank 0 on one node, rank 1 on the other
    assert_same_weights(weights(trial), single_run, atol=DDP_ATOL)


@pytest.mark.parametrize("ray_nodes", [0], indirect=True)  # the head runs nothing: the trial is on the worker
def test_a_lost_ray_node_is_survived(tmp_path, ray_nodes):
    """Kill the worker node's raylet mid-trial: Tune retries the trial on the node that replaces it,
    which resumes from the run directory's checkpoint and leaves one record."""
    cluster, worker = ray_nodes
    proc, trial = start_run(tmp_path, "tests/sweeps/long.yaml", "long", "--backend", "ray", "--ray-address",
                            cluster.address)  # fmt: skip
    killed = time.monotonic()
    cluster.remove_node(worker, allow_graceful=False)  # SIGKILL to the raylet, as a crashed machine
    replacement = cluster.add_node(num_cpus=1)
    wait_until("the retry", lambda: status_of(trial).get("attempt") == 2, 300, every=0.25)
    retried = time.monotonic()
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    st = status_of(trial)
    assert st["state"] == "done" and st["attempt"] == 2 and st["step"] == 200, st
    assert st["resumed_from"] >= 10, st
    assert len(list((trial / "records").glob("*.json"))) == 1
    assert ray_nodes_of(trial) == [worker.node_id, replacement.node_id]
    print(f"ray node lost: attempt 2 started {retried - killed:.1f} s after the raylet was killed")
