"""Ray Tune backend: the same trials as Tune trials of one ``Tuner``.

Each Tune trial calls the trial entry point in-process; training reports its eval loss (and a
Tune checkpoint of ``checkpoints-meta``) at every evaluation and snapshot, so ASHA can stop poor
trials and a trial whose worker dies is retried (``FailureConfig``) and resumes from its
checkpoint. An interrupted sweep is picked up with ``Tuner.restore`` when the same set of trials
is run again. Local Ray by default; ``--ray-address`` (or ``ray.address`` in the sweep file)
connects to an existing cluster, where run directories must be on a shared file system or are
restored from the Tune checkpoint.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from launchers import state
from launchers.sweep import Sweep, Trial
from launchers.trial import EXIT_BUSY, run_trial
from lintrans.errors import EXIT_PREEMPTED


def _trainable(config: dict) -> None:
    from ray import tune

    trial_dir = Path(config["trial_dir"])
    restored = tune.get_checkpoint()
    meta = trial_dir / "checkpoints-meta"
    if restored is not None and not (meta / "checkpoint.pth").exists():
        with restored.as_directory() as folder:
            shutil.copytree(folder, meta, dirs_exist_ok=True)

    def report(step: int, metrics: dict) -> None:
        folder = metrics.get("checkpoint_dir")
        values = {k: v for k, v in metrics.items() if k != "checkpoint_dir"}
        values["step"] = step
        tune.report(values, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)

    code = run_trial(trial_dir, backend="ray", report=report)
    if code in (EXIT_PREEMPTED, EXIT_BUSY):
        raise RuntimeError(f"trial {trial_dir.name} did not finish (exit {code}); Tune will retry it")
    st = state.status(trial_dir)
    tune.report({"step": st.get("step") or 0, "state": st.get("state", "?")})


def experiment_name(sweep: Sweep, trials: list[Trial]) -> str:
    """Stable per set of trials, so ``Tuner.restore`` only ever resumes the same experiment."""
    return f"{sweep.name}-{hashlib.sha1(' '.join(t.id for t in trials).encode()).hexdigest()[:8]}"


def run(sweep: Sweep, trials: list[Trial], address: str | None = None, say=print) -> int:
    import ray
    from ray import tune

    sec = sweep.section("ray")
    address = address or sec.get("address")
    cpus = sweep.resources.get("cpus", 1)
    gpus = sweep.resources.get("gpus", 0)
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        storage = str((sweep.dir / "ray").resolve())
        name = experiment_name(sweep, trials)
        trainable = tune.with_resources(_trainable, {"cpu": cpus, "gpu": gpus})
        path = str(Path(storage) / name)
        if tune.Tuner.can_restore(path):
            say(f"ray: restoring interrupted experiment {path}")
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            scheduler = None
            if "asha" in sec:
                from ray.tune.schedulers import ASHAScheduler

                scheduler = ASHAScheduler(metric="eval_loss", mode="min", **sec["asha"])
            tuner = tune.Tuner(
                trainable,
                param_space={"trial_dir": tune.grid_search([str(t.run_dir.resolve()) for t in trials])},
                tune_config=tune.TuneConfig(
                    scheduler=scheduler, max_concurrent_trials=sec.get("max_concurrent"), reuse_actors=False
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage,
                    failure_config=tune.FailureConfig(max_failures=sec.get("max_failures", 2)),
                    verbose=1,
                ),
            )
        for t in trials:
            state.write_launch(t.run_dir, "ray", name, str(Path(path)))
        say(f"ray: {len(trials)} trials, {cpus} CPU / {gpus} GPU each, experiment {path}")
        results = tuner.fit()
        errors = sum(1 for r in results if r.error is not None)
        say(f"ray: finished, {len(results) - errors} ok, {errors} errored")
        return 0
    finally:
        ray.shutdown()
