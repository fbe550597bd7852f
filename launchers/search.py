"""Adaptive search on any backend: Optuna's ask/tell (TPE), in waves of ``search.batch`` trials.

The study lives in the sweep folder, ``<runs>/sweeps/<sweep>/optuna.journal`` (Optuna's
``JournalStorage``: an append-only file under a file lock, fine on the shared file systems run
directories live on anyway). One wave: ask the study for trials until ``batch`` are in flight,
turn each into one lintrans trial per seed (:meth:`Sweep.trial`: the same stable id as any other
trial with those values), run them on the backend (local and Ray block until the wave ends; for
SLURM the wave is queued and the trials' states are polled until none is queued or running),
then tell the study each result: the objective (``search.objective.metric``) from the trials'
records, or the final held-out ``eval_loss`` of ``status.json``, averaged over the seeds; a
failed trial is told FAIL, one a scheduler stopped PRUNED.

Everything the driver needs is on disk, so ``run`` again continues the same study: trials asked
but never told whose lintrans trials have since finished are told, unfinished ones go into the
next wave, and nothing is asked beyond ``n_trials``. The sampler is re-seeded before every wave
from ``search.seed`` and the number of trials asked so far, so an interrupted study asks the same
points as one that was not. :func:`drive` is the loop alone, with the evaluation injected.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launchers import state, status, table
from launchers.backends import Backend
from launchers.schema import Distribution
from launchers.sweep import Sweep, Trial
from lintrans import records
from lintrans.errors import UsageError
from lintrans.procenv import EXIT_FAILED

STORAGE = "optuna.journal"
POLL_FIRST_S, POLL_MAX_S = 15.0, 300.0  # looks at a queued (SLURM) wave: 15 s, doubling up to 5 min


@dataclass(frozen=True)
class Outcome:
    """What to tell the study about one of its trials."""

    state: str  # "complete", "fail" or "pruned"
    value: float | None = None


# --------------------------------------------------------------------------- the ask/tell loop


def drive(
    study,
    space: dict[str, Any],
    n_trials: int,
    batch: int,
    run_wave: Callable[[list], bool],
    outcome: Callable[[Any], Outcome | None],
    sampler_for: Callable[[int], Any],
    say: Callable[[str], None] = print,
) -> bool:
    """Ask, run, tell, wave by wave, until the study holds ``n_trials`` told trials; True when it does.

    ``run_wave(trials)`` runs Optuna's frozen trials (returns False to stop: interrupted);
    ``outcome(trial)`` is what to tell, or None while the trial has not finished;
    ``sampler_for(n)`` is the sampler to ask with when the study already holds ``n`` trials.
    Trials asked earlier and still unfinished are run again before anything new is asked.
    """
    from optuna.trial import TrialState

    wave_no = 0
    unfinished = _tell_finished(study, outcome)
    while True:
        room = n_trials - len(study.trials)
        fresh = max(0, min(batch - len(unfinished), room))
        if fresh:
            study.sampler = sampler_for(len(study.trials))
            asked = [study.ask(space).number for _ in range(fresh)]
        else:
            asked = []
        wave = unfinished + [t for t in study.get_trials(deepcopy=False) if t.number in asked]
        if not wave:
            told = sum(t.state != TrialState.RUNNING for t in study.trials)
            say(f"optuna: study complete, {told} of {n_trials} trials told")
            return True
        wave_no += 1
        again = f", {len(unfinished)} unfinished from before" if unfinished else ""
        say(f"optuna: wave {wave_no}: trials {', '.join(str(t.number) for t in wave)}{again}")
        carry_on = run_wave(wave)
        unfinished = _tell_finished(study, outcome)
        if not carry_on:
            return False
        if unfinished:
            numbers = ", ".join(str(t.number) for t in unfinished)
            say(f"optuna: trials {numbers} did not finish; run again to continue the study")
            return False


def _tell_finished(study, outcome: Callable[[Any], Outcome | None]) -> list:
    """Tell every asked-but-untold trial whose outcome is known; the ones still unfinished."""
    from optuna.trial import TrialState

    unfinished = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        result = outcome(trial)
        if result is None:
            unfinished.append(trial)
        elif result.state == "complete":
            study.tell(trial.number, result.value)
        else:
            study.tell(trial.number, state=TrialState.FAIL if result.state == "fail" else TrialState.PRUNED)
    return unfinished


def best_so_far(study, batch: int) -> list[float]:
    """The best told value after each wave of ``batch`` trials (by trial number), for reports and tests."""
    from optuna.trial import TrialState

    sign = 1.0 if study.direction.name == "MINIMIZE" else -1.0
    out, best = [], math.inf
    trials = sorted(study.trials, key=lambda t: t.number)
    for start in range(0, len(trials), batch):
        for t in trials[start : start + batch]:
            if t.state == TrialState.COMPLETE:
                best = min(best, sign * t.value)
        out.append(sign * best)
    return out


# --------------------------------------------------------------------------- sweep <-> study


def _primitive(values: list) -> bool:
    return all(v is None or isinstance(v, (bool, int, float, str)) for v in values)


def space(sweep: Sweep) -> dict[str, Any]:
    """Optuna's distribution for each axis: lists and ``choice`` are categorical (as JSON text unless plain)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, axis in sweep.axes.items():
        if isinstance(axis, Distribution) and axis.kind in ("loguniform", "uniform"):
            lo, hi = getattr(axis, axis.kind)
            out[key] = FloatDistribution(lo, hi, log=axis.log)
        elif isinstance(axis, Distribution) and axis.kind == "randint":
            lo, hi = axis.randint
            out[key] = IntDistribution(lo, hi - 1)  # randint's high is exclusive, Optuna's inclusive
        else:
            values = axis.choice if isinstance(axis, Distribution) else axis
            choices = values if _primitive(values) else [json.dumps(v, sort_keys=True) for v in values]
            out[key] = CategoricalDistribution(choices)
    return out


def values_of(sweep: Sweep, params: dict[str, Any]) -> dict[str, Any]:
    """The config values of a study trial's parameters."""
    missing = [k for k in sweep.axes if k not in params]
    if missing:
        raise UsageError(
            f"{sweep.path}: the study in {sweep.dir / STORAGE} has a trial without axis "
            f"{', '.join(missing)}: the axes changed; give the sweep a new name to start a new study"
        )
    out = {}
    for key, axis in sweep.axes.items():
        values = axis.choice if isinstance(axis, Distribution) and axis.kind == "choice" else axis
        plain = not isinstance(values, list) or _primitive(values)
        out[key] = params[key] if plain else json.loads(params[key])
    return out


def trials_of(sweep: Sweep, study_trial) -> list[Trial]:
    """The lintrans trials of one study trial: one per seed, numbered after it."""
    values = values_of(sweep, study_trial.params)
    n = len(sweep.seeds)
    return [sweep.trial(values, seed, study_trial.number * n + j) for j, seed in enumerate(sweep.seeds)]


def objective_value(trial_dir: Path, metric: str) -> float | None:
    """``metric`` from the trial's evaluation records, else (``eval_loss``, ``train_loss``) its status's last value."""
    value = records.metrics(trial_dir).get(metric)
    if value is None and metric in ("eval_loss", "train_loss"):
        value = state.status(trial_dir).get(metric)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def judge(sweep: Sweep, trials: list[Trial], seen: dict[str, status.TrialView]) -> Outcome | None:
    """The outcome of one study trial from its lintrans trials' states; None while any is unfinished."""
    if any(seen[t.id].state not in status.FINAL for t in trials):
        return None
    if any(seen[t.id].state == "failed" for t in trials):
        return Outcome("fail")
    if any(seen[t.id].state == "stopped" for t in trials):
        return Outcome("pruned")
    values = [objective_value(t.run_dir, sweep.search.objective.metric) for t in trials]
    if any(v is None for v in values):
        return Outcome("fail")  # done, yet without the objective: nothing to tell the sampler
    return Outcome("complete", sum(values) / len(values))


def storage_path(sweep: Sweep) -> Path:
    return sweep.dir / STORAGE


def open_study(sweep: Sweep, create: bool = True):
    """The sweep's study (created on first use when ``create``); None if there is none and ``create`` is False."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = storage_path(sweep)
    if not create and not path.is_file():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = JournalStorage(JournalFileBackend(str(path)))
        direction = "minimize" if sweep.search.objective.mode == "min" else "maximize"
        try:  # loading first: create_study(load_if_exists=True) would append a create record at every open
            study = optuna.load_study(study_name=sweep.name, storage=storage)
        except KeyError:
            if not create:
                return None
            study = optuna.create_study(storage=storage, study_name=sweep.name, direction=direction)
    if study.direction.name.lower() != direction:
        raise UsageError(
            f"{sweep.path}: search.objective.mode is {sweep.search.objective.mode!r} but the study in "
            f"{path} was made to {study.direction.name.lower()}; give the sweep a new name"
        )
    return study


def sampler_for(sweep: Sweep) -> Callable[[int], Any]:
    """TPE seeded by ``search.seed`` and the trials asked so far; half of a small study is random start-up."""
    import optuna

    n_startup = min(10, max(1, sweep.search.n_trials // 2))

    def make(asked: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=sweep.search.seed * 1_000_003 + asked, n_startup_trials=n_startup, constant_liar=True
            )

    return make


def study_trials(sweep: Sweep) -> list[Trial]:
    """Every lintrans trial the study holds, in order (for ``status``, ``table`` and ``cancel``)."""
    study = open_study(sweep, create=False)
    if study is None:
        return []
    seen: dict[str, Trial] = {}
    for st in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        for t in trials_of(sweep, st):
            seen.setdefault(t.id, t)
    return list(seen.values())


def listed_trials(sweep: Sweep) -> list[Trial]:
    """The trials of any sweep: the file's (grid, random), or the study's (optuna)."""
    return study_trials(sweep) if sweep.search.method == "optuna" else sweep.trials()


# --------------------------------------------------------------------------- the `run` command for optuna


def run_optuna(sweep: Sweep, backend: Backend, args) -> int:
    """``lintrans run`` for ``search.method: optuna``: waves until the study is complete; 1 if a trial failed."""
    from launchers.submission import submission_lock

    if not backend.adaptive:
        raise UsageError(
            f"{sweep.path}: the {backend.name} backend cannot run an adaptive search (each wave needs the last)"
        )
    if args.dry_run:
        return _dry_run(sweep, backend)
    lock = submission_lock(sweep)
    try:
        study = open_study(sweep)
        wave = _Waves(sweep, backend, args)
        complete = drive(
            study, space(sweep), sweep.search.n_trials, sweep.search.batch, wave.run, wave.outcome, sampler_for(sweep)
        )
        trials = study_trials(sweep)
        observations = status.observe(trials)
        table.print_brief(sweep, trials, observations)
        _say_best(sweep, study)
        failed = status.report_failures(trials, status.views(trials, observations))
    finally:
        lock.release()
    if wave.code not in (0, EXIT_FAILED):
        return wave.code  # interrupted
    if not complete:
        return EXIT_FAILED
    return EXIT_FAILED if failed and not args.allow_failures else 0


def poll_delays(rng: random.Random) -> Iterator[float]:
    """Seconds between looks at a wave: from 15 s, doubling to 5 min, each within ±10 % (jitter, so that
    many drivers started together do not ask the scheduler in step). A wave of long trials costs the
    scheduler one ``squeue`` and one ``sacct`` every 5 minutes."""
    delay = POLL_FIRST_S
    while True:
        yield delay * rng.uniform(0.9, 1.1)
        delay = min(2 * delay, POLL_MAX_S)


class _Waves:
    """The backend side of :func:`drive`: submit a wave's lintrans trials, wait for them, judge them."""

    def __init__(self, sweep: Sweep, backend: Backend, args) -> None:
        self.sweep, self.backend, self.args = sweep, backend, args
        self.code = 0

    def run(self, study_trials_: list) -> bool:
        from launchers.trial import write_spec

        trials = list({t.id: t for st in study_trials_ for t in trials_of(self.sweep, st)}.values())
        # acted on: no guessing when the scheduler cannot answer
        seen = status.views(trials, status.observe(trials, strict=True))
        planned = status.plan(self.sweep, trials, seen, self.args.retry_failed, self.args.resume_stopped)
        todo = [t for t in trials if planned[t.id] in status.SUBMITTED]
        for t in todo:
            write_spec(self.sweep, t)
        if todo:
            self.code = self.backend.submit(self.sweep, todo)
            if self.code not in (0, EXIT_FAILED):
                return False
        self._wait(trials)
        return True

    def _wait(self, trials: list[Trial]) -> None:
        """Until none of ``trials`` is queued or running (at once for backends that block, polled for SLURM)."""
        shown, delays = None, poll_delays(random.Random())
        while True:
            states = [v.state for v in status.views(trials, status.observe(trials)).values()]
            waiting = sum(s in ("queued", "running") for s in states)
            if not waiting:
                return
            line = ", ".join(f"{states.count(s)} {s}" for s in status.STATES if states.count(s))
            if line != shown:
                print(f"optuna: waiting for the wave: {line}", flush=True)
                shown = line
            time.sleep(next(delays))

    def outcome(self, study_trial) -> Outcome | None:
        trials = trials_of(self.sweep, study_trial)
        seen = status.views(trials, status.observe(trials))
        result = judge(self.sweep, trials, seen)
        if result == Outcome("fail") and all(v.state == "done" for v in seen.values()):
            print(
                f"optuna: trial {study_trial.number} is done but has no {self.sweep.search.objective.metric!r} "
                f"(no evaluation records it?); told FAIL",
                flush=True,
            )
        return result


def _say_best(sweep: Sweep, study) -> None:
    from optuna.trial import TrialState

    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not done:
        print("optuna: no trial has a value yet")
        return
    best = study.best_trial
    values = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    print(
        f"optuna: best {sweep.search.objective.metric} {best.value:.4g} (study trial {best.number}: {values}); "
        f"{len(done)} complete of {len(study.trials)} asked"
    )


def _dry_run(sweep: Sweep, backend: Backend) -> int:
    """What the study holds and what the next wave would be; asks nothing, writes nothing."""
    study = open_study(sweep, create=False)
    trials = study_trials(sweep) if study is not None else []
    if trials:
        status.print_trials(sweep, trials, status.views(trials))
    asked = len(study.trials) if study is not None else 0
    running = len([t for t in study.trials if t.state.name == "RUNNING"]) if study is not None else 0
    fresh = max(0, min(sweep.search.batch - running, sweep.search.n_trials - asked))
    print(
        f"dry run: optuna study {sweep.name} holds {asked} of {sweep.search.n_trials} trials ({running} untold); "
        f"the next wave would run {running} again and ask {fresh} new, x {len(sweep.seeds)} seed(s), "
        f"on {backend.name}"
    )
    return 0
