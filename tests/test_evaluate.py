"""evaluate.py and its records: contents, replacement, summaries under concurrency, bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import multiprocessing
import subprocess
import sys
import time

import pytest

from lintrans import records
from lintrans.eval_spec import EvalSpec
from lintrans.evaluation import evaluate
from tests.configs import tiny
from tests.conftest import IN_CI, ROOT, TINY, assert_usage_error, env, run, train_args

NUM_CONCURRENT = 16


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny model trained for 10 steps, shared by every test here."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    result = run(train_args(workdir), timeout=300)
    assert result.returncode == 0, result.stderr
    return workdir


def evaluate_args(workdir, *extra: str) -> list[str]:
    return ["evaluate.py", f"--config={TINY}", f"--workdir={workdir}", "--batch_size=250", "--num_gen=2", *extra]


def test_record_contents_and_replacement(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv(records.RUNS_ENV, str(tmp_path / "runs"))
    spec = EvalSpec(mode="fid", num_gen=4, batch_size=250, experiment_name="single", param_name="p")
    first = evaluate(tiny_run, spec, config=tiny.get_config())
    second = evaluate(tiny_run, spec)

    path = records.record_path(tiny_run, "fid", "single", "p", 0)
    assert json.loads(path.read_text()) == json.loads(json.dumps(second, default=str))  # replaced, not added
    assert len([r for r in records.read_records(tiny_run) if r["experiment"] == "single"]) == 1
    assert first["metrics"] == second["metrics"]  # same seed, same samples, same score
    memorisation = {"memorised_fraction", "nn_distance_pixel", "nn_distance_feature"}
    assert first["metrics"].keys() == {"fid_mnist_features", *memorisation}
    assert all(math.isfinite(value) for value in first["metrics"].values())
    assert 0 <= first["metrics"]["memorised_fraction"] <= 1 and first["breakdown"]["memorisation"]["samples"] == 4
    run_info = first["run"]
    assert (run_info["dataset"], run_info["forward"], run_info["K"], run_info["steps"]) == ("mnist5k", "heat", 5, 10)
    assert run_info["sigma"] == 0.01 and first["run"]["delta"] == pytest.approx(0.0125)
    assert run_info["overrides"] == {} and run_info["checkpoint"] == 0
    for key in ("wall_s", "device", "hostname", "timestamp", "versions", "breakdown", "evaluation"):
        assert key in first
    assert {"torch", "clean-fid", "lintrans"} <= first["versions"].keys()
    summary = tmp_path / "runs" / "mnist5k" / "evaluation_results" / "single"
    assert len(list(summary.glob("*.json"))) == 1  # the same evaluation replaces its file
    with open(summary / "summary.csv") as f:
        assert memorisation <= set(next(csv.reader(f)))  # table columns


def require_elbo() -> None:
    if importlib.util.find_spec("lintrans.elbo") is None:
        if IN_CI:
            pytest.fail("lintrans.elbo is missing (CI=true)")
        pytest.skip("lintrans.elbo not written yet")


def test_concurrent_evaluations_lose_nothing(tiny_run, tmp_path):
    """16 evaluate.py processes write into one experiment at once: 16 records, 16 rows.

    The ELBO on 2 test images is the cheapest evaluation (no clean-fid import); each process still
    costs a torch start-up and the mnist5k parse, so this takes minutes on 2 cores.
    """
    require_elbo()
    args = ["--mode=elbo", "--num_test=2", "--num_train=10", "--experiment_name=conc"]
    procs = [
        subprocess.Popen(
            [sys.executable, *evaluate_args(tiny_run, *args, f"--param_name=p{i}", f"--seed={i}")],
            cwd=ROOT,
            env=env(LINTRANS_RUNS_DIR=str(tmp_path / "runs"), OMP_NUM_THREADS="1"),  # 16 processes, 2 cores
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(NUM_CONCURRENT)
    ]
    deadline = time.monotonic() + 900  # one bound for all, not 900 s each
    try:
        errors = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * NUM_CONCURRENT, errors

    params = {f"p{i}" for i in range(NUM_CONCURRENT)}
    mine = [r for r in records.read_records(tiny_run) if r["experiment"] == "conc"]
    assert {r["param"] for r in mine} == params
    folder = tmp_path / "runs" / "mnist5k" / "evaluation_results" / "conc"
    with open(folder / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert {row["param"] for row in rows} == params and len(rows) == NUM_CONCURRENT
    assert all(math.isfinite(float(row["nll_bpd"])) for row in rows)
    md = (folder / "summary.md").read_text().splitlines()
    assert len(md) == 4 + NUM_CONCURRENT
    before = (folder / "summary.csv").read_text()
    records.rebuild_summary(folder)
    assert (folder / "summary.csv").read_text() == before  # rebuilding is idempotent


def _publish_after(barrier, record: dict) -> None:
    barrier.wait()
    records.publish(record, "lockdata")


def test_simultaneous_publishes_keep_every_row(tmp_path, monkeypatch):
    """The lock itself: 32 processes released by one barrier rebuild the same summary at the same instant.

    Adversarial timing: a rebuild that saw fewer records waits longer before writing its table,
    so without the lock the most incomplete table would be written last.
    """
    monkeypatch.setenv(records.RUNS_ENV, str(tmp_path))
    read = records.read_folder

    def read_then_wait(folder):
        found = read(folder)
        time.sleep(0.01 * (NUM_CONCURRENT - len(found)))
        return found

    monkeypatch.setattr(records, "read_folder", read_then_wait)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(NUM_CONCURRENT)
    procs = []
    for i in range(NUM_CONCURRENT):
        record = {"mode": "fid", "experiment": "race", "param": f"p{i}", "metrics": {"fid_inception": i}}
        record["run"] = {"workdir": f"/runs/{i}", "checkpoint": 0}
        procs.append(ctx.Process(target=_publish_after, args=(barrier, record)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * NUM_CONCURRENT
    with open(tmp_path / "lockdata" / "evaluation_results" / "race" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(row["fid_inception"]) for row in rows) == list(range(NUM_CONCURRENT))


BAD = {
    "unknown mode": (["--mode=kid"], "--mode='kid': Input should be 'elbo' or 'fid'"),
    "missing checkpoint": (["--checkpoint=7"], "checkpoint 7 not found"),
    "num_gen < 2": (["--num_gen=1"], "--num_gen=1: Input should be greater than or equal to 2"),
    "missing statistics": (
        ["--dataset_name_cleanfid=nonexistent", "--cleanfid_mode=legacy_tensorflow"],
        "reference statistics for --dataset_name_cleanfid=nonexistent",
    ),
    "missing custom statistics": (
        ["--dataset_name_cleanfid=nonexistent", "--dataset_split=custom"],
        "no custom statistics 'nonexistent' for mode clean",
    ),
    "unknown cleanfid mode": (["--cleanfid_mode=tf"], "--cleanfid_mode='tf': Input should be 'clean' or"),
    "path in a name": (["--param_name=../x"], "--param_name='../x': String should match pattern"),
    "metric for another data set": (["--metric=fid_inception"], "--dataset_name_cleanfid: fid_inception needs"),
    "config disagrees with the run": (
        ["--config.model.forward=constant_velocity"],
        "model.forward='constant_velocity' (run: 'heat'); pass --config.model.forward=heat",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(tiny_run, tmp_path, case):
    extra, needle = BAD[case]
    result = subprocess.run(
        [sys.executable, *evaluate_args(tiny_run, *extra)],
        cwd=ROOT,
        env=env(LINTRANS_RUNS_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_usage_error(result, needle)
    assert not list(tmp_path.iterdir())  # nothing recorded


def test_resume_under_another_forward_process_is_refused(tiny_run):
    """A checkpoint does not know its forward process: resuming it as another one must not start."""
    meta = tiny_run / "checkpoints-meta" / "checkpoint.pth"
    before = meta.read_bytes()
    result = run(train_args(tiny_run, "--config.model.forward=identity", "--config.training.n_iters=20"))
    assert_usage_error(result, "model.forward='identity' (run: 'heat')")
    assert meta.read_bytes() == before


def test_sampling_under_another_horizon_is_refused(tiny_run, tmp_path):
    args = ["sample.py", f"--config={TINY}", f"--workdir={tiny_run}", "--config.model.K=3", f"--outdir={tmp_path}"]
    result = run(args)
    assert_usage_error(result, "model.K=3 (run: 5); pass --config.model.K=5")
    assert not list(tmp_path.iterdir())


def test_elbo_record(tiny_run, tmp_path):
    require_elbo()
    result = subprocess.run(
        [sys.executable, *evaluate_args(tiny_run, "--mode=elbo", "--num_test=4", "--num_train=20")],
        cwd=ROOT,
        env=env(LINTRANS_RUNS_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(records.record_path(tiny_run, "elbo", "default", "default", 0).read_text())
    assert math.isfinite(record["metrics"]["nll_bpd"]) and record["evaluation"]["num_test"] == 4
    assert len(record["breakdown"]["L_levels"]) == 5 + 1


def test_read_records_skips_broken_files(tmp_path, caplog):
    folder = tmp_path / records.RECORDS
    folder.mkdir()
    good = {"mode": "fid", "param": "a", "metrics": {"fid_inception": 3.0}, "run": {}}
    (folder / "good.json").write_text(json.dumps(good))
    (folder / "torn.json").write_text('{"metrics": {"fid')
    (folder / "other.json").write_text("[1, 2]")
    (folder / ".good.json.x.tmp").write_text("{")
    with caplog.at_level(logging.WARNING):
        assert records.read_records(tmp_path) == [good]
    assert "torn.json" in caplog.text and "other.json" in caplog.text


def test_metrics_never_share_a_column(tmp_path):
    for name, metric in (("a", "fid_inception"), ("b", "fid_mnist_features")):
        record = {"mode": "fid", "param": name, "metrics": {metric: 1.5}, "run": {}}
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    records.rebuild_summary(tmp_path)
    with open(tmp_path / "summary.csv") as f:
        rows = {row["param"]: row for row in csv.DictReader(f)}
    assert (rows["a"]["fid_inception"], rows["a"]["fid_mnist_features"]) == ("1.5", "")
    assert (rows["b"]["fid_inception"], rows["b"]["fid_mnist_features"]) == ("", "1.5")
