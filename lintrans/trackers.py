"""Experiment trackers behind one small interface: TensorBoard (the default), MLflow, Weights & Biases.

Labs log to different trackers; the trainer should not care which. Everything that logs (the
trainer through :mod:`lintrans.monitor`, ``evaluate.py`` and a sweep's trial when it ends) talks
to :class:`Trackers`, which fans each call out to the backends named in
``config.logging.backends``:

* ``scalars(values, step)``: metrics over steps (loss, lr, per-level loss, held-out loss);
* ``image(tag, grid, step)``: the sample grids;
* ``summary(params, metrics, step)``: the run's hyperparameters and final metrics (evaluation
  metrics, ``eval_loss``, a trial's state), which TensorBoard shows as HParams in the run's own
  event files, MLflow as params and metrics, W&B as config and summary;
* ``close()``.

Only rank 0 opens trackers (the other ranks hold :class:`lintrans.monitor.SilentMonitor`). A run
keeps its trackers' identity in ``<workdir>/trackers.json`` (backends, MLflow store and run id,
W&B run id, experiment and name), so a resumed run, its evaluations and its trial's summary log
into the tracker run its training opened instead of starting a new one each time; a run without
the file (trained before trackers existed, or failed before training) has TensorBoard only.

Nothing here touches a random number generator (MLflow and W&B draw their run ids from the
operating system), so logging cannot change what a run trains.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lintrans.atomic import write_json

BACKENDS = ("tensorboard", "mlflow", "wandb")
DEFAULT_BACKENDS = ("tensorboard",)
# The backends that need an extra: their pip extra (``lintrans[mlflow]``) is named like their module.
EXTRAS = ("mlflow", "wandb")
FILE = "trackers.json"
MLFLOW_STORE = "mlruns"  # the default MLflow store: a file store in the run directory
Scalar = int | float | str | bool


def not_installed(backends: tuple[str, ...]) -> str | None:
    """The first of ``backends`` whose library cannot be imported here, or None.

    A config is checked before any training: a run that would fail to log after an hour of
    training, or a sweep whose every trial fails, should be one line at the start instead.
    """
    return next((b for b in backends if b in EXTRAS and importlib.util.find_spec(b) is None), None)


@dataclass(frozen=True)
class Identity:
    """What ``trackers.json`` keeps: which backends a run logs to, and its run in each of them.

    ``experiment`` is the MLflow experiment and the W&B project (a sweep's name, else ``lintrans``);
    ``name`` the run's name there (a trial's id, else the run directory's name).
    """

    backends: tuple[str, ...] = DEFAULT_BACKENDS
    experiment: str = "lintrans"
    name: str = ""
    mlflow_uri: str | None = None  # None: the file store in the run directory, wherever it has moved
    mlflow_run_id: str | None = None
    wandb_run_id: str | None = None

    @classmethod
    def read(cls, workdir: Path) -> Identity | None:
        """The identity in ``workdir/trackers.json``; None where the run has none yet."""
        try:
            data = json.loads((workdir / FILE).read_text())
        except FileNotFoundError:
            return None
        return cls(**{**data, "backends": tuple(data["backends"])})


def _flat_params(params: Mapping[str, Any]) -> dict[str, Scalar]:
    """Values every tracker accepts as a hyperparameter: lists and None become their text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in params.items()}


class Tracker(Protocol):
    """One backend; :class:`Trackers` calls each method on every configured one."""

    def scalars(self, values: Mapping[str, float], step: int) -> None: ...

    def image(self, tag: str, grid: np.ndarray, step: int) -> None: ...

    def summary(self, params: Mapping[str, Scalar], metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    """Event files in ``<workdir>/tensorboard``; HParams go into this run, not a detached sub-run.

    ``purge_step``: where a resumed training restarts (TensorBoard hides what a killed run logged
    past it); None for a summary, which appends.
    """

    def __init__(self, workdir: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=purge_step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, grid, step, dataformats="HWC")

    def summary(self, params: Mapping[str, Scalar], metrics: Mapping[str, float], step: int) -> None:
        """The HParams plugin's session records, then each metric as a scalar (where the plugin reads values)."""
        from torch.utils.tensorboard.summary import hparams

        for record in hparams(dict(params), dict(metrics)):
            self.writer.file_writer.add_summary(record)
        self.scalars(metrics, step)

    def close(self) -> None:
        self.writer.close()


class MLflow:
    """A run in an MLflow tracking store: ``logging.mlflow_uri``, else a file store ``<workdir>/mlruns``.

    MLflow 3 keeps the file store in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``; it is
    what a run directory can hold without a server or a database, so it is allowed for ``file:``
    URIs (a user who set the variable to false keeps MLflow's refusal).
    """

    BATCH = 100  # log_batch takes at most 100 params per call

    def __init__(self, workdir: Path, identity: Identity, params: Mapping[str, Scalar]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = identity.mlflow_uri or (workdir.resolve() / MLFLOW_STORE).as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if identity.mlflow_run_id is not None:
            self.run_id = identity.mlflow_run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(identity.experiment)
        experiment = found.experiment_id if found else self.client.create_experiment(identity.experiment)
        self.run_id = self.client.create_run(experiment, run_name=identity.name).info.run_id
        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), self.BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + self.BATCH])

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        self.client.log_image(self.run_id, grid, key=tag, step=step)

    def summary(self, params: Mapping[str, Scalar], metrics: Mapping[str, float], step: int) -> None:
        """Params the run lacks (a run's params are immutable: the config's were logged at its start), then metrics."""
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in logged]
        for start in range(0, len(new), self.BATCH):
            self.client.log_batch(self.run_id, params=new[start : start + self.BATCH])
        self.scalars(metrics, step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB:
    """A W&B run in ``<workdir>/wandb``; ``WANDB_MODE=offline`` keeps it there (``wandb sync`` uploads it later).

    W&B's console capture is off: the run's output already goes to the trial's log, and wrapping
    stdout would interleave with the progress bar.
    """

    def __init__(self, workdir: Path, identity: Identity, params: Mapping[str, Scalar]) -> None:
        import wandb

        self.run = wandb.init(
            project=identity.experiment, name=identity.name, id=identity.wandb_run_id, resume="allow",
            dir=str(workdir), config=dict(params), settings=wandb.Settings(console="off", silent=True),
        )  # fmt: skip
        self.wandb = wandb

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        self.run.log({tag: self.wandb.Image(grid)}, step=step)

    def summary(self, params: Mapping[str, Scalar], metrics: Mapping[str, float], step: int) -> None:
        self.run.config.update(dict(params), allow_val_change=True)
        self.run.summary.update(dict(metrics))

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Every backend a run logs to, as one :class:`Tracker`."""

    def __init__(self, backends: list[Tracker]) -> None:
        self.backends = backends

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for backend in self.backends:
            backend.scalars(values, step)

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        for backend in self.backends:
            backend.image(tag, grid, step)

    def summary(self, params: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> None:
        flat = _flat_params(params)
        for backend in self.backends:
            backend.summary(flat, metrics, step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


@dataclass(frozen=True)
class Label:
    """How a new tracker run is called: the experiment (a sweep's name) and the run (a trial's id; None: the
    run directory's name)."""

    experiment: str = "lintrans"
    name: str | None = None


def open_training(
    workdir: Path,
    *,
    backends: tuple[str, ...],
    mlflow_uri: str | None,
    label: Label,
    params: Mapping[str, Any],
    purge_step: int,
) -> Trackers:
    """The trackers a training logs to: ``backends`` (the config's), in the runs that ``trackers.json`` names.

    A backend the run has no tracker run in yet (a new run, or one resumed with another backend
    or MLflow store) starts one, labelled ``label`` and given ``params`` (the resolved config,
    flattened); ``trackers.json`` then records them all.
    """
    workdir = Path(workdir)
    known = Identity.read(workdir)
    identity = Identity(
        backends=tuple(backends),
        experiment=known.experiment if known else label.experiment,
        name=known.name if known else label.name or workdir.name,
        mlflow_uri=mlflow_uri,
        mlflow_run_id=known.mlflow_run_id if known and known.mlflow_uri == mlflow_uri else None,
        wandb_run_id=known.wandb_run_id if known else None,
    )
    trackers, identity = _open(workdir, identity, _flat_params(params), purge_step)
    write_json(workdir / FILE, asdict(identity))
    return trackers


def _open(
    workdir: Path, identity: Identity, params: dict[str, Scalar], purge_step: int | None
) -> tuple[Trackers, Identity]:
    """Open ``identity``'s backends; returns them and the identity with the run ids of runs started here."""
    opened: list[Tracker] = []
    if "tensorboard" in identity.backends:
        opened.append(TensorBoard(workdir, purge_step))
    if "mlflow" in identity.backends:
        opened.append(mlflow := MLflow(workdir, identity, params))
        identity = replace(identity, mlflow_run_id=mlflow.run_id)
    if "wandb" in identity.backends:
        opened.append(wandb := WandB(workdir, identity, params))
        identity = replace(identity, wandb_run_id=wandb.run.id)
    return Trackers(opened), identity


def summarise(workdir: Path, params: Mapping[str, Any], metrics: Mapping[str, Any], step: int) -> None:
    """Write a finished run's hyperparameters and final metrics (those of ``metrics`` that are finite
    numbers) into each of its trackers' runs.

    A run without ``trackers.json`` (it failed before training) gets its TensorBoard summary only.
    """
    workdir = Path(workdir)
    numbers = {k: float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}  # fmt: skip
    trackers, _ = _open(workdir, Identity.read(workdir) or Identity(name=workdir.name), {}, None)
    try:
        trackers.summary(params, numbers, step)
    finally:
        trackers.close()
