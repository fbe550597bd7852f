"""Ray Tune backend: the same trials as Tune trials of one ``Tuner``.

Each Tune trial calls the trial entry point in-process, with its output (file descriptors 1 and
2 of its actor) in the run directory's ``train.log``; Tune's own progress stays on the driver's
console. Training reports at every log step, evaluation and checkpoint, and every report carries
the objective (``search.objective.metric``, default the held-out ``eval_loss``) and ``step``, so a
scheduler measures in training steps: ASHA gets ``time_attr="step"`` and ``max_t =
training.n_iters``. The report of the last step is held back until the trial's evaluations are
done, so a scheduler never ends a trial that has finished training before its evaluations ran.

A trial ASHA stops is recorded as **stopped** (step and reason) by a Tune callback in the driver
the moment the scheduler decides, before the trial's actor is told; the trial then ends cleanly
and the next ``run`` leaves it alone (``--resume-stopped`` resumes it from its checkpoint).
Checkpoints stay in the run directory, the only copy: Tune gets no checkpoint at all (run
directories must be on a file system the workers share, as they are for SLURM), so a trial whose
worker dies is retried (``FailureConfig``) and resumes from its own ``checkpoints-meta``. A trial
whose failure a retry cannot fix (bad input, non-finite loss) is not retried.

A trial with several DDP workers (``resources.gpus > 1``, or ``nodes x tasks_per_node > 1``) gets
a placement group of one bundle per rank (:func:`bundles`): rank 0 is the Tune trial itself,
ranks 1..N-1 are :class:`_Rank` actors pinned to the other bundles, each running
``python -m launchers.trial DIR`` with torchrun's variables (:func:`torchrun_env`), which
:func:`lintrans.distributed.detect` reads. ``ray.address`` (or ``--ray-address``) connects to an
existing cluster; ``ray.runtime_env`` (``env_vars``, ``working_dir``) is passed to it.

A Ray that ``run`` starts itself (no address) listens on loopback only (:func:`loopback_only`):
anyone who can reach a Ray port can run code as its user, and a login node is shared.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from launchers import state, status
from launchers.backends import Backend
from launchers.schema import Resources
from launchers.state import Observation
from launchers.sweep import PACKAGE_ROOT, Sweep, Trial
from launchers.trial import Stopped, run_trial
from lintrans import records
from lintrans.errors import UsageError
from lintrans.procenv import EXIT_BUSY, EXIT_FAILED, EXIT_PREEMPTED, die_with_parent, free_port

# Ray's own switch for a single-machine Ray (its default on macOS and Windows): every server it starts
# binds 127.0.0.1, and the node's address is 127.0.0.1. Read once, when ``ray`` is first imported.
LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

# Metrics every training report carries: the only ones ASHA can compare trials on.
TRAINING_METRICS = ("eval_loss", "train_loss")


# --------------------------------------------------------------------------- what a Tune trial runs


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _reporter(trial_dir: Path, metric: str) -> Callable[[int, dict], None]:
    """``report(step, metrics)`` for :func:`run_trial`: forwards to Tune, and turns Tune's stop into :class:`Stopped`.

    Tune stops a function trainable by raising ``SystemExit`` inside ``tune.report``. The driver's
    callback has already recorded *stopped* when a scheduler decided it; any other stop (the
    driver shutting down) leaves the trial preempted, to be resumed by the next ``run``.
    """
    from ray import tune

    def report(step: int, metrics: dict) -> None:
        n_iters = metrics.get("n_iters")
        if n_iters is not None and step >= n_iters:
            return  # reported once the evaluations are done (see _trainable)
        values = {**_numbers(metrics), "step": step}
        values.setdefault(metric, float("nan"))
        try:
            tune.report(values)
        except SystemExit:
            st = state.status(trial_dir)
            if st.get("state") == "stopped":
                raise Stopped(st.get("reason") or "stopped early by the trial scheduler") from None
            why = "cancelled (lintrans cancel)" if _cancelled(trial_dir) else "Ray stopped the trial (driver shut down)"
            state.write_status(trial_dir, "preempted", step=step, reason=why, resumable=True)
            raise

    return report


def _final_report(trial_dir: Path, metric: str) -> None:
    """The last step's report, with the evaluations' metrics, once the trial is done (whatever Tune decides)."""
    from ray import tune

    st = state.status(trial_dir)
    values = {**_numbers({k: st.get(k) for k in TRAINING_METRICS}), **_numbers(records.metrics(trial_dir))}
    values.update(step=st.get("step") or 0, n_iters=st.get("n_iters") or 0)
    values.setdefault(metric, float("nan"))
    tune.report(values)


def _trainable(config: dict) -> None:
    trial_dir = Path(config["trial_dir"])
    metric = config["metric"]
    log = os.open(trial_dir / "train.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)  # this actor runs this trial only (reuse_actors=False): its output is the trial's log
    os.dup2(log, 2)
    os.close(log)
    os.environ["LINTRANS_BACKEND"] = "ray"
    here = _where()
    print(f"ray: trial {trial_dir.name} on node {here[0]} ({here[1]})", flush=True)
    workers = _Workers(trial_dir, config["world"], config["cpus"], config["gpus_per_rank"])
    code = None
    try:
        workers.start(here)
        code = run_trial(trial_dir, backend="ray", report=_reporter(trial_dir, metric))
    finally:  # the other ranks end with rank 0's training; wait for them only if it went to the end
        workers.stop(grace_s=60 if code == 0 and state.status(trial_dir).get("state") == "done" else 0)
    st = state.status(trial_dir)
    if code in (EXIT_PREEMPTED, EXIT_BUSY):
        raise RuntimeError(f"trial {trial_dir.name} did not finish (exit {code}); Tune will retry it")
    if code == EXIT_FAILED and st.get("resumable", True):
        raise RuntimeError(st.get("reason") or f"trial {trial_dir.name} failed")  # Tune retries it
    if st.get("state") == "done":
        _final_report(trial_dir, metric)
    # failed for good (bad input, non-finite loss) or stopped: recorded; a retry would change nothing


# --------------------------------------------------------------------------- multi-worker trials


def bundles(resources: Resources) -> list[dict[str, float]]:
    """One placement-group bundle per DDP rank: its CPUs and (with GPUs) one GPU."""
    bundle = {"CPU": float(resources.cpus)}
    if resources.gpus:
        bundle["GPU"] = 1.0  # with GPUs there is one rank per GPU (Resources checks tasks_per_node)
    return [dict(bundle) for _ in range(resources.world_size)]


def strategy(resources: Resources) -> str:
    """How a trial's bundles spread: one node, one rank per node, or as evenly as Ray can over several.

    Ray has no "k bundles per node" strategy; ``SPREAD`` is its best effort for ``tasks_per_node > 1``.
    """
    if resources.nodes == 1:
        return "STRICT_PACK"
    return "STRICT_SPREAD" if resources.tasks_per_node == 1 else "SPREAD"


def torchrun_env(places: list[tuple[str, str, list[str]]], port: int) -> list[dict[str, str]]:
    """torchrun's variables for each rank from where the ranks landed: ``(node id, node IP, GPU ids)`` per rank.

    Ranks on one node are numbered locally in rank order; they all see the node's GPUs of the
    trial (``CUDA_VISIBLE_DEVICES``, in local-rank order), so ``LOCAL_RANK`` picks each one's own.
    """
    world = len(places)
    on_node: dict[str, list[int]] = {}
    for rank, (node, _, _) in enumerate(places):
        on_node.setdefault(node, []).append(rank)
    out = []
    for rank, (node, _, _) in enumerate(places):
        local = on_node[node]
        env = {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(local.index(rank)),
            "LOCAL_WORLD_SIZE": str(len(local)),
            "MASTER_ADDR": places[0][1],
            "MASTER_PORT": str(port),
        }
        gpus = [g for r in local for g in places[r][2]]
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        out.append(env)
    return out


def loopback_only() -> None:
    """Make the Ray this process starts listen on 127.0.0.1 only (Ray's single-machine mode).

    Ray turns ``_node_ip_address="127.0.0.1"`` into the machine's reachable address and binds its GCS,
    raylet and workers to every interface; its single-machine switch is the one setting that keeps
    them all on loopback. It must be set before ``ray`` is imported: refused, loudly, if it was not.
    """
    os.environ[LOCAL_ONLY] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", False):
        raise RuntimeError(f"ray was imported before {LOCAL_ONLY}=0: the Ray it starts would listen on every interface")


def _where() -> tuple[str, str, list[str]]:
    import ray

    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), [str(g) for g in ray.get_gpu_ids()]


class _Rank:
    """A Ray actor on one bundle of the trial's placement group, running one DDP rank other than 0."""

    def where(self) -> tuple[str, str, list[str]]:
        return _where()

    def run(self, trial_dir: str, env: dict[str, str], threads: int) -> int:
        path = os.pathsep.join([str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        child_env = {
            **os.environ,
            **env,
            "PYTHONPATH": path,
            "PYTHONUNBUFFERED": "1",
            "LINTRANS_BACKEND": "ray",
            "OMP_NUM_THREADS": str(threads),
        }
        with open(Path(trial_dir) / "train.log", "a") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "launchers.trial", trial_dir],
                env=child_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=PACKAGE_ROOT,
                preexec_fn=partial(die_with_parent, signal.SIGKILL),  # a rank holds no state: it dies with its actor
            )
        return proc.wait()


class _Workers:
    """Ranks 1..N-1 of a multi-worker trial, and the torchrun variables of rank 0 (this process)."""

    def __init__(self, trial_dir: Path, world: int, cpus: int, gpus_per_rank: float) -> None:
        self.trial_dir, self.world, self.cpus, self.gpus = trial_dir, world, cpus, gpus_per_rank
        self.actors: list = []
        self.runs: list = []

    def start(self, here: tuple[str, str, list[str]]) -> None:
        """Start ranks 1..N-1 next to rank 0, which runs ``here`` (node id, IP, GPU ids)."""
        if self.world == 1:
            return
        import ray
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = get_current_placement_group()
        rank = ray.remote(_Rank)
        self.actors = [
            rank.options(
                num_cpus=self.cpus,
                num_gpus=self.gpus,
                max_restarts=0,
                scheduling_strategy=(PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)),
            ).remote()
            for i in range(1, self.world)
        ]
        places = [here, *ray.get([a.where.remote() for a in self.actors])]
        envs = torchrun_env(places, free_port(""))
        os.environ.update(envs[0])
        os.environ["OMP_NUM_THREADS"] = str(self.cpus)
        print(
            f"ray: {self.world} DDP ranks on nodes {[p[0] for p in places]}, master "
            f"{envs[0]['MASTER_ADDR']}:{envs[0]['MASTER_PORT']}",
            flush=True,
        )
        self.runs = [
            a.run.remote(str(self.trial_dir), env, self.cpus) for a, env in zip(self.actors, envs[1:], strict=True)
        ]

    def stop(self, grace_s: float) -> None:
        """Wait up to ``grace_s`` for the other ranks (they end with rank 0's training), then end them."""
        if not self.actors:
            return
        import ray

        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=grace_s)
        for i, ref in enumerate(self.runs, 1):
            code = ray.get(ref) if ref in done else None
            if code not in (0, None):
                print(f"ray: rank {i} exited with {code}", flush=True)
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.runs = [], []


# --------------------------------------------------------------------------- the driver side


def _cancelled(trial_dir: Path) -> bool:
    """``lintrans cancel`` marked the trial's current launch (:func:`launchers.state.mark_launch`)."""
    return bool(state.launch(trial_dir).get("cancelled"))


def _cancel_stopper():
    """A Tune stopper that stops, through Tune, the trials ``lintrans cancel`` marked (at their next report)."""
    from ray.tune import Stopper

    class CancelStopper(Stopper):
        def __init__(self) -> None:
            self.dirs: dict[str, Path] = {}  # Tune's trial id -> run directory, filled by the recorder

        def __call__(self, trial_id: str, result: dict) -> bool:
            return trial_id in self.dirs and _cancelled(self.dirs[trial_id])

        def stop_all(self) -> bool:
            return False

    return CancelStopper()


def _recorder(metric: str, stopper):
    """A Tune callback that records what only the driver knows: a scheduler's stop, a trial Ray gave up on."""
    from ray.tune import Callback

    class Recorder(Callback):
        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            stopper.dirs[trial.trial_id] = Path(trial.config["trial_dir"])

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            # ``done`` on a result the trial did not mark done: the scheduler (ASHA) decided to stop it.
            # Recorded now, before the trial's actor is told, so the trial ends as stopped, never failed.
            trial_dir = Path(trial.config["trial_dir"])
            if not result.get("done") or state.status(trial_dir).get("state") != "running":
                return
            if _cancelled(trial_dir):  # our stopper's doing: the trial records itself preempted
                return
            step, value = result.get("step"), result.get(metric)
            shown = f" ({metric}={value:.4g})" if isinstance(value, float) and math.isfinite(value) else ""
            state.write_status(
                trial_dir,
                "stopped",
                step=step,
                resumable=False,
                reason=f"stopped early by the trial scheduler at step {step}{shown}",
            )

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            # Ray gave up on the trial (its worker died, retries spent) without the trial saying why.
            trial_dir = Path(trial.config["trial_dir"])
            if state.status(trial_dir).get("state") in ("running", "preempted", None):
                text = [line.strip() for line in _error_text(trial).splitlines() if line.strip()]
                last = text[-1] if text else "the trial errored"
                last = last if len(last) <= 300 else last[:297] + "..."  # Ray's own last lines run long
                state.write_status(
                    trial_dir,
                    "failed",
                    resumable=True,
                    reason=f"ray: {last}",
                )

    return Recorder()


def _error_text(trial) -> str:
    """Tune's account of a trial's last error: the driver's local copy (the one in storage is synced later)."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        return Path(path).read_text(errors="replace")
    return str(trial.get_error() or "")


@contextmanager
def _json_logs_only() -> Iterator[None]:
    """Tune's per-trial logs without its CSV and TensorBoard copies: the run directory has the trial's own."""
    key, previous = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", os.environ.get("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")
    os.environ[key] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def experiment_name(sweep: Sweep, storage: Path) -> str:
    """A new Tune experiment per ``run`` (or wave): trials resume from their run directories, not Tune's state."""
    stem = f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, n = stem, 1
    while (storage / name).exists():
        n += 1
        name = f"{stem}-{n}"
    return name


def trial_steps(sweep: Sweep, trial: Trial) -> int:
    return trial.overrides.get("training.n_iters", sweep.base.training.n_iters)


# Tune's trial states, as an observation's phase.
TUNE_PHASES = {"PENDING": "queued", "PAUSED": "queued", "RUNNING": "running", "TERMINATED": "ended", "ERROR": "ended"}


def _driver_alive(driver: str | None) -> bool | None:
    """Whether the ``host:pid`` driver of a launch still runs; None when it is on another host (or unknown)."""
    host, _, pid = (driver or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tune_states(experiment: Path) -> dict[str, str]:
    """Tune's own state of each trial of an experiment (by run directory), from its saved experiment state."""
    if not experiment.is_dir():
        return {}
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(str(experiment))
    except Exception:  # noqa: BLE001 - Ray's saved state is read as far as it goes (nothing saved yet, partial)
        return {}
    return {str(t.config.get("trial_dir")): t.status for t in analysis.trials}


class RayBackend(Backend):
    name = "ray"

    def __init__(self, address: str | None = None, say: Callable[[str], None] = print) -> None:
        self.address, self.say = address, say

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--ray-address", default=None, help="ray: address of an existing cluster")

    @classmethod
    def from_args(cls, args) -> RayBackend:
        return cls(address=args.ray_address)

    def check(self, sweep: Sweep) -> None:
        """ASHA compares trials on what they report while training (its grace period: :func:`sweep.load`).

        Also decides, before anything imports ``ray`` (``status`` reads Tune's saved states with it),
        whether the Ray that ``run`` would start is its own: then it is pinned to loopback.
        """
        if (self.address or sweep.ray.address) is None:
            loopback_only()
        metric = sweep.search.objective.metric
        if sweep.ray.asha is not None and metric not in TRAINING_METRICS:
            raise UsageError(
                f"{sweep.path}: ray.asha compares trials during training, on "
                f"{' or '.join(TRAINING_METRICS)}; search.objective.metric is {metric!r}"
            )

    def describe(self, sweep: Sweep, trials: list[Trial]) -> str:
        r = sweep.resources
        workers = f", {r.world_size} DDP workers each" if r.world_size > 1 else ""
        return f"ray: {len(trials)} trials, {r.cpus} CPU / {r.gpus} GPU per rank{workers}, under {sweep.dir / 'ray'}"

    def observe(self, trials: list[Trial]) -> dict[str, Observation]:
        """Tune's own state of each trial (pending, running, terminated, errored), and whether its driver runs."""
        out, experiments = {}, {}
        for t in trials:
            ln = state.launch(t.run_dir)
            if ln.get("backend") != self.name or not ln.get("job_id"):
                continue
            path = t.run_dir.parent / "ray" / str(ln["job_id"])
            if path not in experiments:
                experiments[path] = tune_states(path)
            tune_state = experiments[path].get(str(t.run_dir.resolve()))
            alive = False if ln.get("driver_ended") else _driver_alive(ln.get("driver"))
            phase = TUNE_PHASES.get(tune_state or "")
            if phase in ("queued", "running") and alive is False:
                out[t.id] = Observation("ended", f"{tune_state} (driver {ln['driver']} ended)")
            elif phase is not None:
                out[t.id] = Observation(phase, tune_state)
            elif alive is False:
                out[t.id] = Observation("ended", f"(driver {ln['driver']} ended)")
        return out

    def cancel(self, trials: list[Trial]) -> int:
        """Mark the queued and running trials cancelled: the driver's stopper stops them through Tune."""
        seen = status.views(trials, self.observe(trials))
        ours = [t for t in trials if state.launch(t.run_dir).get("backend") == self.name]
        chosen = [t for t in ours if seen[t.id].state in ("queued", "running")]
        for t in chosen:
            state.mark_launch(t.run_dir, "cancelled")
        return len(chosen)

    def submit(self, sweep: Sweep, trials: list[Trial]) -> int:
        address = self.address or sweep.ray.address
        if address is None:
            loopback_only()
        import ray
        from ray import tune
        from ray.tune.logger import JsonLoggerCallback

        r, sec = sweep.resources, sweep.ray
        metric, mode = sweep.search.objective.metric, sweep.search.objective.mode
        scheduler = self._scheduler(sweep, trials, metric, mode)
        runtime_env = {k: v for k, v in sec.runtime_env.model_dump().items() if v}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env or None)
        try:
            storage = str((sweep.dir / "ray").resolve())
            driver = f"{socket.gethostname()}:{os.getpid()}"  # observe: Tune's states hold while it runs
            name = experiment_name(sweep, Path(storage))
            stopper = _cancel_stopper()
            trainable = tune.with_resources(_trainable, tune.PlacementGroupFactory(bundles(r), strategy=strategy(r)))
            tuner = tune.Tuner(
                trainable,
                param_space={
                    "trial_dir": tune.grid_search([str(t.run_dir.resolve()) for t in trials]),
                    "metric": metric,
                    "world": r.world_size,
                    "cpus": r.cpus,
                    "gpus_per_rank": bundles(r)[0].get("GPU", 0.0),
                },
                tune_config=tune.TuneConfig(
                    scheduler=scheduler, max_concurrent_trials=sec.max_concurrent, reuse_actors=False
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage,
                    callbacks=[_recorder(metric, stopper), JsonLoggerCallback()],
                    stop=stopper,
                    verbose=1,
                    failure_config=tune.FailureConfig(max_failures=sec.max_failures),
                ),
            )
            for t in trials:
                state.write_launch(t.run_dir, "ray", name, str(t.run_dir / "train.log"), driver=driver)
            workers = f", {r.world_size} DDP workers each" if r.world_size > 1 else ""
            self.say(
                f"ray: {len(trials)} trials, {r.cpus} CPU / {r.gpus} GPU per rank{workers}, "
                f"experiment {Path(storage) / name}"
            )
            with _json_logs_only():
                results = tuner.fit()
        finally:
            ray.shutdown()  # after it, no trial actor holds its lock: the states below are final
        counts: dict[str, int] = {}
        for t in trials:
            # Tune's saved state is final too, even where it was saved before a trial's error: this
            # driver, which `status` would otherwise find alive while it prints the table, is done.
            state.mark_launch(t.run_dir, "driver_ended")
            st = status.view(t.run_dir).state
            counts[st] = counts.get(st, 0) + 1
        errors = sum(1 for res in results if res.error is not None)
        self.say(
            f"ray: finished: {', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}"
            + (f" ({errors} errored in Tune)" if errors else "")
        )
        return EXIT_FAILED if counts.get("failed") else 0

    @staticmethod
    def _scheduler(sweep: Sweep, trials: list[Trial], metric: str, mode: str):
        """ASHA in steps: rungs at ``grace_period * reduction_factor**k`` steps, up to the longest trial's n_iters."""
        asha = sweep.ray.asha
        if asha is None:
            return None
        from ray.tune.schedulers import ASHAScheduler

        steps = [trial_steps(sweep, t) for t in trials] or [sweep.base.training.n_iters]  # grace: sweep.load
        return ASHAScheduler(
            time_attr="step",
            metric=metric,
            mode=mode,
            max_t=max(steps),
            grace_period=asha.grace_period,
            reduction_factor=asha.reduction_factor,
            brackets=asha.brackets,
        )
