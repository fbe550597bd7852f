"""Experiment trackers: a tiny sweep logs to TensorBoard, MLflow (a file store) and W&B (offline), and each
library's own reader finds the trials' params, step metrics and final metrics; bad tracker input is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import train
from launchers import cli
from lintrans import cmdline
from tests.conftest import (
    CANARIES,
    IN_CI,
    ROOT,
    TINY,
    assert_no_canary,
    assert_one_line,
    env,
    lintrans,
    run,
    status_of,
    train_args,
    trial_dirs,
)

# Three trials of SGD: two learn (and are evaluated), one diverges at once (failed, with no evaluation).
SWEEP = """name: trackers
config: tests/configs/tiny.py
axes:
  optim.lr: [0.05, 0.1, 1.0e+6]
seeds: [0]
overrides:
  optim.optimizer: SGD
  optim.warmup: 0
  training.sampling_freq: 10
  logging.backends: [tensorboard, mlflow, wandb]
evaluations:
  - {mode: elbo, num_train: 50, num_test: 10, batch_size: 10}
"""
STEP_METRICS = ("train/loss", "eval/loss")
FINAL = ("nll_bpd", "nll_nats", "eval_loss", "state")


def require_trackers() -> None:
    """MLflow and W&B are the ``mlflow`` and ``wandb`` extras, pinned in requirements.txt (CI installs them)."""
    for module in ("mlflow", "wandb"):
        try:
            __import__(module)
        except ImportError:
            if IN_CI:
                pytest.fail(f"{module} is not installed (CI=true: requirements.txt must pin it)")
            pytest.skip(f"{module} not installed (pip install '.[{module}]')")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict[str, Any]:
    """The sweep, run on the foreground backend with secrets in its environment: ``{state: trial dir}``."""
    require_trackers()
    runs = tmp_path_factory.mktemp("runs")
    sweep_file = runs / "trackers.yaml"
    sweep_file.write_text(SWEEP)
    result = lintrans(runs, "run", str(sweep_file), "--backend", "foreground", "--allow-failures",
                      extra_env={**CANARIES, "WANDB_MODE": "offline"}, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    trials = {spec(t)["overrides"]["optim.lr"]: t for t in trial_dirs(runs, "trackers")}
    assert [status_of(trials[lr])["state"] for lr in (0.05, 0.1, 1e6)] == ["done", "done", "failed"]
    return {"runs": runs, "done": [trials[0.05], trials[0.1]], "failed": trials[1e6]}


def spec(trial: Path) -> dict:
    return json.loads((trial / "trial.json").read_text())


def record_metrics(trial: Path) -> dict[str, float]:
    (record,) = (trial / "records").glob("elbo-*.json")
    return json.loads(record.read_text())["metrics"]


def test_mlflow_file_store_holds_params_step_metrics_and_final_metrics(sweep):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when allowed
    for trial in [*sweep["done"], sweep["failed"]]:
        client = MlflowClient(tracking_uri=(trial / "mlruns").as_uri())
        experiment = client.get_experiment_by_name("trackers")
        (run,) = client.search_runs([experiment.experiment_id])  # training, evaluation and summary: one run
        assert run.info.run_name == trial.name
        params, resolved = run.data.params, json.loads((trial / "config.json").read_text())
        assert float(params["optim.lr"]) == spec(trial)["overrides"]["optim.lr"]  # the axis
        assert params["model.K"] == str(resolved["model"]["K"]) and params["optim.optimizer"] == "SGD"
        assert json.loads(params["logging.backends"]) == ["tensorboard", "mlflow", "wandb"]
        state = status_of(trial)["state"]
        assert run.data.metrics["state"] == {"done": 0.0, "failed": 2.0}[state]
        if state == "failed":
            assert "nll_bpd" not in run.data.metrics
            continue
        for tag in STEP_METRICS:
            history = client.get_metric_history(run.info.run_id, tag)
            assert sorted(m.step for m in history) == ([5, 10] if tag == "train/loss" else [0, 10]), tag
        for name, value in record_metrics(trial).items():
            assert run.data.metrics[name] == pytest.approx(value), name
        assert run.data.metrics["eval_loss"] == pytest.approx(status_of(trial)["eval_loss"])
        assert client.list_artifacts(run.info.run_id, "images"), "the sample grid"


def wandb_records(trial: Path) -> list[dict]:
    """Every record of the trial's offline W&B runs, read by W&B's own reader (``wandb leet inspect --json``)."""
    out = []
    for path in sorted((trial / "wandb").glob("offline-run-*/run-*.wandb")):
        read = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                              capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
        out += [json.loads(line) for line in read.stdout.splitlines() if line.strip()]
    return out


def test_wandb_offline_run_holds_params_step_metrics_and_final_metrics(sweep):
    trial = sweep["done"][0]
    got = wandb_records(trial)
    runs = [r["run"] for r in got if r["type"] == "run"]
    assert {r["run_id"] for r in runs} == {json.loads((trial / "trackers.json").read_text())["wandb_run_id"]}
    assert {r["project"] for r in runs} == {"trackers"} and runs[0]["display_name"] == trial.name
    config = runs[0]["config"]["update"]
    assert config["optim.lr"] == 0.05 and config["model.K"] == 5 and config["optim.optimizer"] == "SGD"
    history = [r["history"] for r in got if r["type"] == "history"]
    for tag in STEP_METRICS:
        assert sorted(h["step"]["num"] for h in history if tag in h["item"]) == ([5, 10] if tag == "train/loss"
                                                                                  else [0, 10]), tag  # fmt: skip
    summary = {k: v for r in got if r["type"] == "summary" for k, v in r["summary"]["update"].items()}
    assert {k: summary[k] for k in record_metrics(trial)} == pytest.approx(record_metrics(trial))
    assert summary["state"] == 0.0 and summary["eval_loss"] == pytest.approx(status_of(trial)["eval_loss"])


def test_hparams_are_in_each_trials_own_tensorboard_run_failed_ones_too(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    for trial in [*sweep["done"], sweep["failed"]]:
        assert not [p for p in (trial / "tensorboard").iterdir() if p.is_dir()], "no detached sub-run"
        acc = EventAccumulator(str(trial / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        data = [plugin_data_pb2.HParamsPluginData.FromString(c) for c in content.values()]
        metrics = {m.name.tag for d in data for m in d.experiment.metric_infos}
        hparams = {k for d in data for k in d.session_start_info.hparams}
        assert {"optim.lr", "seed", "optim.optimizer"} <= hparams
        done = status_of(trial)["state"] == "done"
        assert ({*FINAL} if done else {"state"}) <= metrics
        (state,) = acc.Scalars("state")
        assert state.value == (0.0 if done else 2.0)


def test_no_secret_reaches_the_tracker_stores(sweep):
    stores = [t / name for t in [*sweep["done"], sweep["failed"]] for name in ("mlruns", "wandb")]
    assert all(store.is_dir() for store in stores)
    assert_no_canary(*stores, sweep["runs"])


def test_a_resumed_run_and_evaluate_py_log_into_the_run_its_training_opened(tmp_path):
    """Training to step 5, resuming to 10, then ``evaluate.py``: one MLflow run with every step and the NLL."""
    require_trackers()
    from mlflow.tracking import MlflowClient

    backends = "--config.logging.backends=('tensorboard','mlflow')"
    for n_iters in (5, 10):
        result = run(train_args(tmp_path, backends, f"--config.training.n_iters={n_iters}"))
        assert result.returncode == 0, result.stderr[-3000:]
    evaluate = [sys.executable, "evaluate.py", f"--workdir={tmp_path}", "--mode=elbo", "--num_test=4", "--num_train=20"]
    result = subprocess.run(evaluate, cwd=ROOT, env=env(LINTRANS_RUNS_DIR=str(tmp_path / "runs")), capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (run_,) = client.search_runs([client.get_experiment_by_name("lintrans").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(run_.info.run_id, "train/loss")) == [5, 10]
    assert run_.data.metrics["nll_bpd"] == pytest.approx(record_metrics(tmp_path)["nll_bpd"])


# ------------------------------------------------------------------------------------------ bad input


def test_an_unknown_tracker_is_one_line_naming_the_valid_ones(tmp_path, capsys):
    code = cmdline.entry(train.main, ["train.py", f"--config={TINY}", f"--workdir={tmp_path}",
                                      "--config.logging.backends=('tensorboard','neptune')"])  # fmt: skip
    needle = "unknown tracker 'neptune' in config.logging.backends; valid: mlflow, tensorboard, wandb"
    assert_one_line(code, capsys.readouterr().err, needle)


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_tracker_that_is_not_installed_is_one_line_naming_its_extra(tmp_path, capsys, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import mlflow` fails as where it is not installed
    needle = f"config.logging.backends names {tracker}, which is not installed: pip install 'lintrans[{tracker}]'"
    code = cmdline.entry(train.main, ["train.py", f"--config={TINY}", f"--workdir={tmp_path / 'run'}",
                                      f"--config.logging.backends=('tensorboard','{tracker}')"])  # fmt: skip
    assert_one_line(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "run").exists()  # before any training
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"config: {TINY}\naxes:\n  model.K: [2]\noverrides:\n  logging.backends: [{tracker}]\n")
    code = cli.main(["--runs-dir", str(tmp_path / "runs"), "run", str(sweep), "--backend", "foreground"])
    assert_one_line(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "runs").exists()  # no trial started
