"""Search spaces, the same on every backend: random draws, Optuna's ask/tell in waves, the search table."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import shutil
import statistics
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution

from launchers import cli, search, status
from launchers.sweep import load
from tests.conftest import ROOT, assert_one_line, lintrans

RANDOM = "tests/sweeps/random.yaml"
OPTUNA = "tests/sweeps/optuna.yaml"


# ----------------------------------------------------------------------------------------- the driver alone


def quadratic_driver(n_trials: int, batch: int, finish_only: set[int] | None = None, study=None):
    """Drive a study on ``(x - 3)^2`` (no training): each wave "runs" by computing it, except trials
    outside ``finish_only`` (when given), which stay unfinished as if their jobs had been killed."""
    study = study or optuna.create_study(direction="minimize")
    values: dict[int, float] = {}
    waves: list[list[int]] = []

    def run_wave(trials) -> bool:
        waves.append([t.number for t in trials])
        for t in trials:
            if finish_only is None or t.number in finish_only:
                values[t.number] = (t.params["x"] - 3.0) ** 2
        return True

    def outcome(trial):
        return search.Outcome("complete", values[trial.number]) if trial.number in values else None

    def sampler_for(asked: int):
        return optuna.samplers.TPESampler(seed=asked, n_startup_trials=10)

    complete = search.drive(study, {"x": FloatDistribution(-10, 10)}, n_trials, batch, run_wave, outcome,
                            sampler_for, say=lambda line: None)  # fmt: skip
    return study, waves, complete


def test_driver_moves_towards_the_optimum():
    study, waves, complete = quadratic_driver(n_trials=40, batch=5)
    assert complete and len(waves) == 8 and all(len(w) == 5 for w in waves)
    assert len(study.trials) == 40 and all(t.state.name == "COMPLETE" for t in study.trials)
    best = search.best_so_far(study, 5)
    print("best (x-3)^2 after each wave:", " ".join(f"{b:.3g}" for b in best))
    assert all(b <= a for a, b in itertools.pairwise(best))
    assert best[-1] < best[1] / 10 and best[-1] < 0.05  # TPE (after 10 random start-up trials) closes in
    distance = [abs(study.trials[n].params["x"] - 3.0) for w in waves for n in w]
    # The last two waves (TPE) ask nearer x = 3 than the two random start-up waves did.
    assert statistics.median(distance[-10:]) < statistics.median(distance[:10]) / 2


def test_driver_continues_an_interrupted_study():
    # First `run`: only trials 0 and 2 finish; the driver stops, saying the others did not.
    study, waves, complete = quadratic_driver(n_trials=7, batch=3, finish_only={0, 2})
    assert not complete and waves == [[0, 1, 2]]
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING", "COMPLETE"]
    # Second `run`: trial 1 goes again first, then new trials fill the waves up to n_trials, no more.
    study, waves, complete = quadratic_driver(n_trials=7, batch=3, study=study)
    assert complete and waves[0][0] == 1 and len(waves[0]) == 3
    assert sorted(n for w in waves for n in w) == [1, 3, 4, 5, 6]  # 0 and 2 were told in the first run
    assert len(study.trials) == 7 and all(t.state.name == "COMPLETE" for t in study.trials)
    # A third `run` asks nothing.
    study, waves, complete = quadratic_driver(n_trials=7, batch=3, study=study)
    assert complete and waves == [] and len(study.trials) == 7


def test_failed_and_stopped_trials_are_told_as_such(tmp_path):
    sweep = load(OPTUNA, tmp_path)
    trial = sweep.trial({"optim.lr": 1e-3}, 0, 0)

    def seen(now: str) -> dict[str, status.TrialView]:
        return {trial.id: dataclasses.replace(status.view(trial.run_dir), state=now, reason="x")}

    assert search.judge(sweep, [trial], seen("failed")) == search.Outcome("fail")
    assert search.judge(sweep, [trial], seen("stopped")) == search.Outcome("pruned")
    assert search.judge(sweep, [trial], seen("preempted")) is None
    assert search.judge(sweep, [trial], seen("done")) == search.Outcome("fail")  # no objective


# ----------------------------------------------------------------------------------------- random search


def test_random_search_gives_the_same_trials_every_time(tmp_path):
    first, second = load(RANDOM, tmp_path).trials(), load(RANDOM, tmp_path / "elsewhere").trials()
    assert [t.id for t in first] == [t.id for t in second] and len(first) == 3
    assert [t.overrides for t in first] == [t.overrides for t in second]
    text = (ROOT / RANDOM).read_text().replace("seed: 0}", "seed: 1}")
    assert text != (ROOT / RANDOM).read_text()
    other = tmp_path / "random.yaml"
    other.write_text(text)
    reseeded = load(other, tmp_path).trials()
    assert not {t.id for t in reseeded} & {t.id for t in first}
    for key in ("optim.lr", "model.sigma"):
        assert [t.overrides[key] for t in reseeded] != [t.overrides[key] for t in first]
    assert all(1e-4 <= t.overrides["optim.lr"] <= 1e-2 and 0.005 <= t.overrides["model.sigma"] <= 0.05
               for t in first + reseeded)  # fmt: skip


BAD_DISTRIBUTIONS = {
    "low above high": ("  optim.lr: {uniform: [0.1, 0.01]}\n", "uniform: low (0.1) must be below high (0.01)"),
    "low equals high": ("  model.K: {randint: [4, 4]}\n", "randint: low (4) must be below high (4)"),
    "loguniform at zero": ("  optim.lr: {loguniform: [0.0, 0.1]}\n", "loguniform: low must be > 0, got 0.0"),
    "loguniform negative": ("  optim.lr: {loguniform: [-1.0, 0.1]}\n", "loguniform: low must be > 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_DISTRIBUTIONS))
@pytest.mark.parametrize("method", ["random", "optuna"])
def test_bad_distribution_is_refused_at_its_line(tmp_path, capsys, case, method):
    axis, needle = BAD_DISTRIBUTIONS[case]
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(f"name: bad\nconfig: tests/configs/tiny.py\nsearch: {{method: {method}, n_trials: 2}}\n"
                     f"axes:\n  model.sigma: [0.01]\n{axis}")  # fmt: skip
    code = cli.main(["--runs-dir", str(tmp_path / "runs"), "run", str(sweep)])
    err = capsys.readouterr().err
    assert_one_line(code, err, f"{sweep}:6: axes.")
    assert needle in err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------- Optuna on a backend


def test_optuna_waves_on_the_local_backend(tmp_path):
    result = lintrans(tmp_path, "run", OPTUNA, "--backend", "local")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "optuna: wave 3: trials 4, 5" in out and "wave 4" not in out, out
    sweep = load(OPTUNA, tmp_path)
    journal = tmp_path / "sweeps" / "optuna" / search.STORAGE
    assert journal.is_file()
    study = search.open_study(sweep, create=False)
    assert len(study.trials) == 6 and all(t.state.name == "COMPLETE" for t in study.trials)
    trials = search.study_trials(sweep)
    assert len(trials) == 6
    for st, trial in zip(sorted(study.trials, key=lambda t: t.number), trials, strict=True):
        status = json.loads((trial.run_dir / "status.json").read_text())
        assert status["state"] == "done" and status["step"] == 20
        assert st.value == pytest.approx(status["eval_loss"]) and math.isfinite(st.value)
        assert trial.overrides["optim.lr"] == st.params["optim.lr"]
    assert "optuna: best eval_loss" in out

    before = journal.read_bytes()
    again = lintrans(tmp_path, "run", OPTUNA, "--backend", "local")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "started" not in again.stdout and "wave" not in again.stdout
    assert "study complete, 6 of 6 trials told" in again.stdout
    assert len(search.open_study(sweep, create=False).trials) == 6
    assert journal.read_bytes() == before  # the re-run told nothing, asked nothing

    status = lintrans(tmp_path, "status", OPTUNA)
    assert status.returncode == 0 and "sweep optuna: 6 trials (done 6)" in status.stdout
    dry = lintrans(tmp_path, "run", OPTUNA, "--dry-run")
    assert dry.returncode == 0 and "holds 6 of 6 trials (0 untold)" in dry.stdout


def test_optuna_dry_run_writes_nothing(tmp_path):
    result = lintrans(tmp_path, "run", OPTUNA, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "holds 0 of 6 trials" in result.stdout and "ask 2 new" in result.stdout
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------- the search table


@pytest.fixture(scope="module")
def random_sweep(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("random")
    result = lintrans(runs, "run", RANDOM, "--backend", "local")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return runs


def table_json(runs: Path, *args: str) -> list[dict]:
    result = lintrans(runs, "table", RANDOM, "--format", "json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_table_sorts_and_keeps_the_best(random_sweep):
    everything = table_json(random_sweep)
    assert len(everything) == 3 and all(r["status"] == "done" for r in everything)
    assert [r["trial"] for r in everything] == [t.id for t in load(RANDOM, random_sweep).trials()]
    losses = sorted(r["eval_loss"] for r in everything)
    ranked = table_json(random_sweep, "--sort", "eval_loss")
    assert [r["eval_loss"] for r in ranked] == losses
    best = table_json(random_sweep, "--sort", "eval_loss", "--best", "2")
    assert [r["eval_loss"] for r in best] == losses[:2]
    assert table_json(random_sweep, "--best", "1") == best[:1]  # the objective when --sort is not given
    worst_first = table_json(random_sweep, "--sort", "optim.lr")
    assert [r["optim.lr"] for r in worst_first] == sorted(r["optim.lr"] for r in everything)


def test_table_plots_the_metric_against_each_axis(random_sweep):
    plots = random_sweep / "sweeps" / "random" / "plots"
    shutil.rmtree(plots, ignore_errors=True)
    result = lintrans(random_sweep, "table", RANDOM, "--plot", "axes")
    assert result.returncode == 0, result.stderr
    png = plots / "axes.png"
    assert f"plot: {png}" in result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_waves_poll_the_scheduler_less_and_less_often():
    """15 s doubling to 5 min, each within ±10 %: a long wave costs one look every 5 minutes."""
    delays = list(itertools.islice(search.poll_delays(random.Random(0)), 8))
    for got, nominal in zip(delays, (15, 30, 60, 120, 240, 300, 300, 300), strict=True):
        assert 0.9 * nominal <= got <= 1.1 * nominal
    assert len({round(d, 6) for d in delays[-3:]}) == 3  # jittered: drivers started together drift apart
