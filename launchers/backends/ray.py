"""Ray Tune backend: the same trials as Tune trials of one ``Tuner``.

Each Tune trial calls the trial entry point in-process, with its output in the run directory's
``train.log``. Training reports at every log step, evaluation and checkpoint, and every report
carries the objective (``search.objective.metric``, default the held-out ``eval_loss``) and
``step``, so a scheduler measures in training steps: ASHA gets ``time_attr="step"`` and
``max_t = training.n_iters``. A trial ASHA stops is recorded as **stopped** (step and reason)
and left alone by the next ``run``. Checkpoints stay in the run directory, the only copy: Tune
gets no checkpoint at all (run directories must be on a file system the workers share, as they
are for SLURM), so a trial whose worker dies is retried (``FailureConfig``) and resumes from
its own ``checkpoints-meta``. ``ray.address`` (or ``--ray-address``) connects to an existing
cluster; ``ray.runtime_env`` (``env_vars``, ``working_dir``) is passed to it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from launchers import state
from launchers.state import Observation
from launchers.sweep import Sweep, Trial
from launchers.trial import EXIT_BUSY, EXIT_FAILED, run_trial
from lintrans.errors import EXIT_PREEMPTED, UsageError


def _trainable(config: dict) -> None:
    from ray import tune

    trial_dir = Path(config["trial_dir"])
    metric = config["metric"]
    log = os.open(trial_dir / "train.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)  # this actor runs this trial only (reuse_actors=False): its output is the trial's log
    os.dup2(log, 2)

    def report(step: int, metrics: dict) -> None:
        values = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        values["step"] = step
        values.setdefault(metric, float("nan"))
        tune.report(values)

    code = run_trial(trial_dir, backend="ray", report=report)
    if code in (EXIT_PREEMPTED, EXIT_BUSY):
        raise RuntimeError(f"trial {trial_dir.name} did not finish (exit {code}); Tune will retry it")
    if code == EXIT_FAILED:
        st = state.status(trial_dir)
        raise RuntimeError(st.get("reason") or f"trial {trial_dir.name} failed")


def experiment_name(sweep: Sweep, trials: list[Trial]) -> str:
    """Stable per set of trials, so ``Tuner.restore`` only ever resumes the same experiment."""
    return f"{sweep.name}-{hashlib.sha1(' '.join(t.id for t in trials).encode()).hexdigest()[:8]}"


def _recorder(metric: str):
    """A Tune callback that records trials the scheduler stopped: their own process cannot say so."""
    from ray.tune import Callback

    class RecordStopped(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            trial_dir = Path(trial.config["trial_dir"])
            st = state.status(trial_dir)
            if st.get("state") == "running":
                result = trial.last_result or {}
                value = result.get(metric)
                state.write_status(trial_dir, "stopped", step=result.get("step", st.get("step")), resumable=False,
                                   reason=f"stopped early by the trial scheduler at step {result.get('step')} "
                                          f"({metric}={value:.4g})" if isinstance(value, float) else
                                          "stopped early by the trial scheduler")  # fmt: skip

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            trial_dir = Path(trial.config["trial_dir"])
            if state.status(trial_dir).get("state") == "running":
                text = str(getattr(trial, "error_msg", "") or "").strip().splitlines()
                state.write_status(trial_dir, "failed", resumable=True,
                                   reason=f"ray: {text[-1] if text else 'the trial errored'}")  # fmt: skip

    return RecordStopped()


class RayBackend:
    name = "ray"

    def __init__(self, address: str | None = None, say: Callable[[str], None] = print) -> None:
        self.address, self.say = address, say

    def dry_run(self, sweep: Sweep, trials: list[Trial]) -> str:
        r = sweep.resources
        return (
            f"ray: {len(trials)} trials, {r.cpus} CPU / {r.gpus} GPU each, experiment {experiment_name(sweep, trials)}"
        )

    def observe(self, trials: list[Trial]) -> dict[str, Observation]:
        return {}  # Tune's own states are recorded into the trials by the callback while `run` waits

    def cancel(self, trials: list[Trial]) -> int:
        from launchers.backends.local import LocalBackend

        return LocalBackend().cancel(trials)  # same machine or shared FS: the trial's pid and lock

    def submit(self, sweep: Sweep, trials: list[Trial]) -> int:
        import ray
        from ray import tune

        r, sec = sweep.resources, sweep.ray
        if r.world_size > 1:
            raise UsageError(
                f"{sweep.path}: multi-process trials ({r.world_size} workers) are not supported on Ray yet"
            )
        metric, mode = sweep.search.objective.metric, sweep.search.objective.mode
        address = self.address or sec.address
        runtime_env = {k: v for k, v in sec.runtime_env.model_dump().items() if v}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env or None)
        try:
            storage = str((sweep.dir / "ray").resolve())
            name = experiment_name(sweep, trials)
            trainable = tune.with_resources(_trainable, {"cpu": r.cpus, "gpu": r.gpus})
            path = str(Path(storage) / name)
            callbacks = [_recorder(metric)]
            if tune.Tuner.can_restore(path):
                self.say(f"ray: restoring interrupted experiment {path}")
                tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space={
                        "trial_dir": tune.grid_search([str(t.run_dir.resolve()) for t in trials]),
                        "metric": metric,
                    },
                    tune_config=tune.TuneConfig(
                        scheduler=self._scheduler(sweep, metric, mode),
                        max_concurrent_trials=sec.max_concurrent,
                        reuse_actors=False,
                    ),
                    run_config=tune.RunConfig(
                        name=name,
                        storage_path=storage,
                        callbacks=callbacks,
                        verbose=1,
                        failure_config=tune.FailureConfig(max_failures=sec.max_failures),
                    ),
                )
            for t in trials:
                state.write_launch(t.run_dir, "ray", name, str(t.run_dir / "train.log"))
            self.say(f"ray: {len(trials)} trials, {r.cpus} CPU / {r.gpus} GPU each, experiment {path}")
            results = tuner.fit()
            errors = sum(1 for res in results if res.error is not None)
            self.say(f"ray: finished, {len(results) - errors} ok, {errors} errored")
            return EXIT_FAILED if errors else 0
        finally:
            ray.shutdown()

    @staticmethod
    def _scheduler(sweep: Sweep, metric: str, mode: str):
        asha = sweep.ray.asha
        if asha is None:
            return None
        from ray.tune.schedulers import ASHAScheduler

        n_iters = min(t.overrides.get("training.n_iters", sweep.base.training.n_iters) for t in sweep.trials())
        if asha.grace_period > n_iters:
            raise UsageError(
                f"{sweep.path}: ray.asha.grace_period ({asha.grace_period} steps) exceeds training.n_iters ({n_iters})"
            )
        return ASHAScheduler(time_attr="step", metric=metric, mode=mode, max_t=n_iters, grace_period=asha.grace_period,
                             reduction_factor=asha.reduction_factor, brackets=asha.brackets)  # fmt: skip
