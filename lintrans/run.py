"""The run directory: its config, its checkpoints, and a model rebuilt from them alone.

Layout (IHDM's)::

    <workdir>/config.json                     the resolved config the run was trained with
    <workdir>/source.json                     the config file and overrides it came from
    <workdir>/checkpoints-meta/checkpoint.pth latest state, rewritten for preemption ("checkpoint 0")
    <workdir>/checkpoints/checkpoint_N.pth    numbered snapshots
    <workdir>/records/                        evaluation records (lintrans.records)
    <workdir>/gaussian_prior.pt               sampling.prior=gaussian: N(mu, Sigma) of T(K) u_0
    <workdir>/forward_state.pt                a forward process fitted to the data (pca_heat): its state
    <workdir>/samples/ tensorboard/

A checkpoint holds model, EMA (and its update count), optimizer, step, the config (JSON) and
every rank's RNG state: all an exact resume needs. Writes are atomic; loads use
``weights_only=True`` and strict key matching. The run directory is the truth: ``sample.py`` and
``evaluate.py`` rebuild the network from ``config.json`` as nanoGPT's ``sample.py`` rebuilds it
from the checkpoint's own arguments, and take ``--config`` only to refuse a disagreeing one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections
import torch
from torch import nn

from lintrans import checkpoint_files
from lintrans import config as cfg
from lintrans.atomic import write_atomic, write_json, write_text
from lintrans.errors import UsageError
from lintrans.gaussian_prior import GaussianFit

CONFIG = cfg.RUN_CONFIG
SOURCE = "source.json"
PRIOR = "gaussian_prior.pt"
FORWARD_STATE = "forward_state.pt"


class CorruptCheckpointError(UsageError):
    """A checkpoint file exists but cannot be read (truncated, garbage, foreign format)."""


@dataclass(frozen=True)
class Run:
    """A run directory; every path and every read or write of one goes through here."""

    workdir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "workdir", Path(self.workdir))

    # ---------------------------------------------------------------- paths

    @property
    def meta(self) -> Path:
        return self.workdir / checkpoint_files.META

    def numbered_path(self, n: int) -> Path:
        return checkpoint_files.numbered_path(self.workdir, n)

    def numbered(self) -> list[int]:
        return checkpoint_files.numbered(self.workdir)

    def checkpoint_path(self, checkpoint: int) -> Path:
        """IHDM's numbering: 0 is the latest (``checkpoints-meta``), N is ``checkpoint_N.pth``."""
        path = self.meta if checkpoint == 0 else self.numbered_path(checkpoint)
        if not path.is_file():
            have = [*(["0 (latest)"] if self.meta.is_file() else []), *map(str, self.numbered())]
            valid = ", ".join(have) or "none (train first)"
            raise UsageError(f"checkpoint {checkpoint} not found: {path} does not exist; valid: {valid}")
        return path

    def check_writable(self, sub: str = "") -> None:
        """Bad input before the work, not after it: a workdir that is a file, or one we cannot write into."""
        folder = self.workdir / sub
        if self.workdir.exists() and not self.workdir.is_dir():
            raise UsageError(f"--workdir {self.workdir} is not a directory")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise UsageError(f"cannot write into {folder}: {exc.strerror or exc}") from None

    # ---------------------------------------------------------------- config

    def write_config(self, config: ml_collections.ConfigDict, config_file: str | Path, overrides: dict) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_text(self.workdir / CONFIG, cfg.to_json(config))
        write_json(self.workdir / SOURCE, {"config_file": str(Path(config_file).resolve()), "overrides": overrides})

    def source(self) -> dict[str, Any]:
        try:
            return json.loads((self.workdir / SOURCE).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def config(self) -> ml_collections.ConfigDict:
        """The run's own config; imports its config file first when that file registers the forward process."""
        from lintrans.forward import FORWARD_PROCESSES

        path = self.workdir / CONFIG
        try:
            config = cfg.from_json(path.read_text())
        except FileNotFoundError:
            raise UsageError(f"{self.workdir} is not a run directory: {CONFIG} is missing (train first)") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"cannot read the run's config {path}: {exc}") from None
        source = self.source().get("config_file")
        if config.model.forward not in FORWARD_PROCESSES and source and Path(source).is_file():
            cfg.load_file(source, [Path.cwd()])  # registers the process, as training did
        return config

    def check_matches(self, config: ml_collections.ConfigDict) -> None:
        """Refuse a config that disagrees with the run's own (no-op for a run without ``config.json``)."""
        if (self.workdir / CONFIG).is_file():
            cfg.check_matches_run(config, self.config(), f"{self.workdir} ({CONFIG})")

    # ---------------------------------------------------------------- checkpoints

    def save(self, state: dict, numbered_step: int | None = None) -> None:
        """Write ``checkpoints-meta`` (and the numbered snapshot) atomically."""
        write_atomic(self.meta, lambda f: torch.save(state, f))
        if numbered_step is not None:
            write_atomic(self.numbered_path(numbered_step), lambda f: torch.save(state, f))

    def load(self, path: Path, device: torch.device | str = "cpu", mmap: bool = False) -> dict:
        """A checkpoint's state; a damaged file is a one-line error naming an older one that loads.

        ``mmap`` maps the file instead of reading it: for a field or two of a large checkpoint.
        """
        try:
            return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
        except FileNotFoundError:
            raise UsageError(f"checkpoint not found: {path}") from None
        except Exception as exc:  # noqa: BLE001 - truncated zips, garbage and foreign pickles all land here
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CorruptCheckpointError(
                f"checkpoint {path} cannot be read ({detail}); {self._fallback(path)}"
            ) from None

    def _fallback(self, broken: Path) -> str:
        for n in reversed(self.numbered()):
            path = self.numbered_path(n)
            if path == broken:
                continue
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # noqa: BLE001 - only looking for one that loads
                continue
            return f"the newest readable older checkpoint is {path} (step {n}): copy it to {self.meta} to resume there"
        return "no older checkpoint loads: delete it to start over"

    def step(self) -> int:
        """The step of ``checkpoints-meta``, or 0 when there is none."""
        return int(self.load(self.meta, mmap=True)["step"]) if self.meta.is_file() else 0

    # ---------------------------------------------------------------- what is fitted to the data

    def save_forward_state(self, process: nn.Module) -> Path:
        return write_atomic(self.workdir / FORWARD_STATE, lambda f: torch.save(process.state_dict(), f))

    def load_forward_state(self) -> dict | None:
        """A fitted forward process's state dict, or ``None`` where the run has none yet."""
        return self._load_fitted(FORWARD_STATE, "forward process state")

    def _load_fitted(self, name: str, what: str) -> dict | None:
        path = self.workdir / name
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated zips, garbage and foreign pickles all land here
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            fix = "delete it and resume training to fit it again"
            raise UsageError(f"the {what} {path} cannot be read ({detail}); {fix}") from None

    def save_prior(self, fit: GaussianFit) -> Path:
        return write_atomic(self.workdir / PRIOR, lambda f: torch.save(fit.state(), f))

    def load_prior(self) -> GaussianFit | None:
        """The stored Gaussian prior, or ``None`` where the run has none (a ``data``-prior run)."""
        state = self._load_fitted(PRIOR, "Gaussian prior")
        return None if state is None else GaussianFit.from_state(state)

    def configured_prior(self, config: ml_collections.ConfigDict) -> GaussianFit | None:
        """The stored fit where ``config.sampling.prior`` is ``gaussian`` (it must exist), else ``None`` (``data``)."""
        if cfg.sampling_prior(config) != "gaussian":
            return None
        fit = self.load_prior()
        if fit is None:
            raise UsageError(
                f"{self.workdir} samples from a Gaussian prior (config.sampling.prior=gaussian) but "
                f"{self.workdir / PRIOR} is missing; resume training to fit it (train.py --workdir {self.workdir})"
            )
        return fit

    def remove_temp_files(self) -> list[Path]:
        """Temp files of atomic writes killed mid-way (``.<name>.*.tmp``); call when nothing else writes here."""
        stale = [p for p in self.workdir.rglob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale


@dataclass(frozen=True)
class Loaded:
    """A trained model rebuilt from a run directory alone."""

    config: ml_collections.ConfigDict
    model: nn.Module
    process: nn.Module
    path: Path
    step: int


def load_model(
    workdir: str | Path,
    checkpoint: int = 0,
    device: torch.device | str = "cpu",
    *,
    ema: bool = True,
    config: ml_collections.ConfigDict | None = None,
) -> Loaded:
    """The (EMA) network and forward process of ``checkpoint`` of the run in ``workdir``, in eval mode.

    ``config`` is optional: the run's ``config.json`` says what it is; a given config must agree.
    """
    from lintrans.forward import create_forward
    from lintrans.model import build_model, load_weights

    run = Run(Path(workdir))
    own = run.config()
    if config is not None:
        cfg.check_matches_run(config, own, f"{run.workdir} ({CONFIG})")
    path = run.checkpoint_path(checkpoint)
    state = run.load(path, device)
    model = build_model(cfg.model_args(own), own.seed, device)
    load_weights(model, state["ema"] if ema else state["model"], path)
    process = create_forward(**cfg.forward_args(own))
    if process.fitted_to_data:
        fitted = run.load_forward_state()
        if fitted is None:
            raise UsageError(f"forward process '{process.name}' of {run.workdir} was fitted to the data, but "
                             f"{run.workdir / FORWARD_STATE} is missing; resume training to fit it")  # fmt: skip
        process.load_state_dict(fitted)
    return Loaded(own, model.eval(), process.to(device), path, int(state["step"]))
