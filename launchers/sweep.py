"""Sweep files: YAML -> validated :class:`Sweep` -> :class:`Trial` list. Pure: nothing here writes.

A sweep file names a base config, axes (any config key; a list of values, or a distribution for
random and adaptive search), seeds, fixed overrides, the evaluations to run after training,
per-trial resources and optional backend and search sections::

    name: quickstart
    config: configs/mnist5k/default_mnist5k_configs.py
    axes:
      model.forward: [heat, constant_velocity, identity]
      model.K: [10, 20]
      optim.lr: {loguniform: [1e-4, 1e-2]}      # random or optuna search only
    seeds: [0]
    overrides: {training.n_iters: 200}
    evaluations: [{mode: elbo}, {mode: fid, num_gen: 500}]
    resources: {cpus: 1, gpus: 0, mem_gb: 4, time_min: 30}
    slurm: {partition: debug, array_parallelism: 4, max_requeues: 3}
    search: {method: random, n_trials: 8, seed: 0}

Everything is validated before anything is written (:func:`load`): the schema
(:mod:`launchers.schema`), every axis value and override against the config (type, range, a
forward process that fits in ``model.max_dense_bytes``), every evaluation against the data set,
duplicate keys and values, reserved names and the size of the grid. Errors are one line,
``file:line: key: message``.

Paths in a sweep file resolve against the sweep file's folder, so a sweep means the same from
any working directory: ``config:`` (a relative one not found there is looked up in lintrans's own
root, :data:`PACKAGE_ROOT`, where the repository's sweeps name ``configs/...`` from), the
``python_path:`` folders, and ``runs_dir:`` (see :func:`runs_root` for the order of the other
ways to name it). The config is imported with the sweep file's folder, the ``python_path:``
folders and lintrans's root in front of ``sys.path``; every trial imports it the same way.

A trial's id is a short stable hash of what it runs (:func:`trial_id`): its fully resolved config
(base config, overrides, axis values, seed and device, as ``config.json`` records it) and the source
of the forward process it uses where that was registered from outside lintrans. The same trial
keeps its run directory ``runs/sweeps/<sweep>/<id>/`` across re-runs, edits that add axis values,
backends, working directories and renamed config files; editing a value it runs with gives a new
trial. Run folders named by the earlier scheme (:func:`legacy_trial_id`) stay the trial's folder
while they hold what it runs (:meth:`Sweep.trial`).
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import os
import random
import re
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import ml_collections
import pydantic
import yaml

from launchers.schema import (
    MEMORY_OPTIONS,
    SWEEP_NAME,
    Distribution,
    LocalSection,
    RaySection,
    Resources,
    Search,
    SlurmSection,
    SweepFile,
)
from lintrans import config as cfg
from lintrans.errors import UsageError, printable
from lintrans.eval_spec import EvalSpec, SpecError
from lintrans.records import RUNS_ENV

MAX_TRIALS = 10_000
# The folder holding lintrans's packages: the repository in a checkout, site-packages once installed
# (lintrans's ``configs`` package lies there too). A relative ``config:`` that is not beside the sweep
# file is looked up here, as the repository's own sweeps name theirs (``configs/mnist5k/...``).
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Trial:
    """One point of the sweep: base config + overrides (seed included) -> one run directory."""

    id: str
    index: int
    overrides: dict[str, Any]
    run_dir: Path
    axes: tuple[str, ...] = ()
    resolved: dict[str, Any] = field(default_factory=dict)  # the config it runs, as its config.json records it
    forward_source: str | None = None  # digest of its forward process's module, where the user registered it

    @property
    def label(self) -> str:
        """The values that tell this trial apart, e.g. ``forward=heat K=20 seed=0``."""
        return " ".join(f"{k.split('.')[-1]}={short(self.overrides[k])}" for k in (*self.axes, "seed"))


SHOWN_CHARS = 40  # an axis value longer than this is cut, with an ellipsis, in a trial's label


def short(value: Any) -> str:
    """A value as one short line of a table: control characters escaped, long ones cut with an ellipsis."""
    text = printable(f"{value:.4g}" if isinstance(value, float) else str(value))
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


@dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    config: Path  # the config file found
    config_as_written: str  # what legacy trial ids hashed (legacy_trial_id)
    python_path: tuple[Path, ...]  # absolute folders in front of sys.path when the config is imported
    base: ml_collections.ConfigDict
    axes: dict[str, list | Distribution]
    seeds: list[int]
    overrides: dict[str, Any]
    evaluations: list[EvalSpec]
    resources: Resources
    backend: str | None
    runs_dir: Path
    slurm: SlurmSection
    ray: RaySection
    local: LocalSection
    search: Search
    forward_sources: dict[str, str] = field(default_factory=dict)  # user-registered process -> digest of its module

    @cached_property
    def dir(self) -> Path:
        return self.runs_dir / "sweeps" / self.name

    @property
    def size(self) -> int:
        """How many trials the file describes (grid: the product of the axes; else n_trials) times the seeds."""
        if self.search.method == "grid":
            return math.prod(len(v) for v in self.axes.values()) * len(self.seeds)
        return self.search.n_trials * len(self.seeds)

    @cached_property
    def resolver(self) -> cfg.Resolver:
        """Each trial's resolved config, from the base resolved once (10,000 trials in well under a second)."""
        return cfg.Resolver(self.base)

    def run_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """What a trial's config is loaded with: its overrides and the device its resources ask for
        (a trial that asked for GPUs must get CUDA, and one that asked for none must not take one)."""
        return {"device": "cuda" if self.resources.gpus else "cpu", **overrides}

    def trial(self, values: dict[str, Any], seed: int, index: int) -> Trial:
        """The trial of these axis values and seed. Its folder is named by :func:`trial_id`, unless only
        a folder of its :func:`legacy_trial_id` exists and ran the same config: that one stays its folder,
        so that run folders made before ids hashed the resolved config are neither orphaned nor renamed
        (their evaluation records and any job still queued name that folder)."""
        overrides = {**self.overrides, **values, "seed": seed}
        resolved = self.resolver(self.run_overrides(overrides))
        source = self.forward_sources.get(resolved["model"]["forward"])
        tid = trial_id(resolved, source)
        legacy = self.dir / legacy_trial_id(self.config_as_written, overrides)
        if not (self.dir / tid).exists() and _runs(legacy, resolved):
            tid = legacy.name
        return Trial(tid, index, overrides, self.dir / tid, tuple(self.axes), resolved, source)

    def trials(self) -> list[Trial]:
        """Grid: the Cartesian product of the axes (file order) times the seeds. Random: ``n_trials``
        draws from ``search.seed`` (the same ids on every backend and every run). Optuna trials come
        from the study instead (:mod:`launchers.search`)."""
        keys = list(self.axes)
        if self.search.method == "grid":
            points = [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.axes.values())]
        elif self.search.method == "random":
            rng = random.Random(self.search.seed)
            points = [{k: _draw(self.axes[k], rng) for k in keys} for _ in range(self.search.n_trials)]
        else:
            raise UsageError(f"{self.path}: optuna trials are asked of the study wave by wave, not listed")
        return [self.trial(p, seed, i * len(self.seeds) + j) for i, p in enumerate(points)
                for j, seed in enumerate(self.seeds)]  # fmt: skip


def _draw(axis: list | Distribution, rng: random.Random) -> Any:
    return axis.sample(rng) if isinstance(axis, Distribution) else axis[rng.randrange(len(axis))]


def trial_id(resolved: dict[str, Any], forward_source: str | None = None) -> str:
    """What a trial runs, hashed: its resolved config (:func:`lintrans.config.resolved`, as far as
    :func:`lintrans.config.identity` counts it: not how it is logged, nor a key added since at its
    neutral value) and, for a forward process registered from outside lintrans, the digest of its
    module's source. Never a path, so renaming or moving a config file keeps every id, and editing a
    value gives new ones."""
    what = {"config": cfg.identity(resolved), **({"forward_source": forward_source} if forward_source else {})}
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:10]


def legacy_trial_id(config: str, overrides: dict[str, Any]) -> str:
    """The id run folders were named by before :func:`trial_id`: the ``config:`` value as written and
    the overrides. Only looked up, never given to a new folder (see :meth:`Sweep.trial`)."""
    blob = json.dumps({"config": config, "overrides": overrides}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _runs(folder: Path, resolved: dict[str, Any]) -> bool:
    """``folder`` is a trial's run folder that ran ``resolved``, or has not trained yet (its next start
    runs the current config). Reads only ``config.json``, which its trainer wrote."""
    if not folder.is_dir():
        return False
    try:
        return cfg.identity(json.loads((folder / cfg.RUN_CONFIG).read_text())) == cfg.identity(resolved)
    except FileNotFoundError:
        return True
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # damaged: it cannot show that it ran this config, so it is not taken for this trial


def user_forward_sources() -> dict[str, str]:
    """Each forward process registered from outside lintrans, by name: a digest of its module's source.

    Registering one imports :mod:`lintrans.forward`; where nothing imported it, nothing was registered
    (and torch stays unimported, as ``status`` and ``table`` want)."""
    forward = sys.modules.get("lintrans.forward")
    if forward is None:
        return {}
    return {name: hashlib.sha1(_module_text(c).encode()).hexdigest() for name, c in forward.FORWARD_PROCESSES.items()
            if c.__module__.split(".")[0] != "lintrans"}  # fmt: skip


def _module_text(cls: type) -> str:
    """The source of the module defining ``cls``, read from its file now (not a cached copy)."""
    path = getattr(sys.modules.get(cls.__module__), "__file__", None)
    try:
        return Path(path).read_text() if path else inspect.getsource(cls)
    except (OSError, TypeError):  # defined where no source is kept (typed into an interpreter): its name stands in
        return f"{cls.__module__}.{cls.__qualname__}"


# --------------------------------------------------------------------------- YAML with line numbers


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, plus floats such as ``1e-5`` (YAML 1.2 reads them as numbers, 1.1 as strings)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _Lines:
    """Line numbers of every mapping key and sequence item, from the YAML node tree; refuses duplicate keys."""

    def __init__(self, text: str, path: Path) -> None:
        self.path = path
        self.lines: dict[tuple, int] = {}
        try:
            node = yaml.compose(text, Loader=_Loader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark else 1
            raise UsageError(f"{path}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if node is not None:
            self._walk(node, ())

    def _walk(self, node, at: tuple) -> None:
        self.lines.setdefault(at, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key, value in node.value:
                if key.value in seen:
                    here, first = key.start_mark.line + 1, self.lines[(*at, key.value)]
                    raise self.error((*at, key.value), f"duplicate key (first on line {first})", here)
                seen.add(key.value)
                self.lines[(*at, key.value)] = key.start_mark.line + 1
                self._walk(value, (*at, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, (*at, i))

    def error(self, at: tuple, message: str, line: int | None = None) -> UsageError:
        line = line or next((self.lines[at[:n]] for n in range(len(at), -1, -1) if at[:n] in self.lines), 1)
        key = ".".join(str(a) for a in at) or "(top)"
        return UsageError(f"{self.path}:{line}: {key}: {message}")


def _schema_error(lines: _Lines, exc: pydantic.ValidationError) -> UsageError:
    """The most telling error of a validation failure, at its line (union branches folded away)."""

    def clean(loc: tuple) -> tuple:
        return tuple(p for p in loc if isinstance(p, int) or not ("[" in p or p.startswith("function-")))

    errors = exc.errors()
    # Where an axis was a mapping (a distribution), the "not a list" branch is noise, and vice versa.
    preferred = [e for e in errors if e["type"] not in ("list_type", "model_type", "dict_type")] or errors
    err = preferred[0]
    at = clean(err["loc"])
    if err["type"] == "extra_forbidden":
        section = _section_model(at[:-1])
        valid = ", ".join(sorted(section.model_fields)) if section else ""
        return lines.error(at, f"unknown key; valid: {valid}")
    message = err["msg"].removeprefix("Value error, ")
    given = "" if err["type"] in ("missing",) or "Value error" in err["msg"] else f", got {err['input']!r}"
    return lines.error(at, message + given)


def _section_model(at: tuple):
    model = SweepFile
    for part in at:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if (
            field is None
            or not isinstance(field.annotation, type)
            or not issubclass(field.annotation, pydantic.BaseModel)
        ):
            return model if not at else None
        model = field.annotation
    return model


# --------------------------------------------------------------------------- load and validate


def load(
    path: str | Path,
    runs_dir: str | Path | None = None,
    max_trials: int = MAX_TRIALS,
    check_forwards: bool = True,
    backends: tuple[str, ...] = (),
) -> Sweep:
    """Read and validate a sweep file; every error names the file, the line and the key.

    ``check_forwards=False`` skips the checks of the forward processes (a known name, a K and a
    memory they allow): they import torch, seconds on a login node, and ``status``, ``table`` and
    ``cancel`` only read a sweep that ``run`` has checked in full before submitting anything.
    ``backends``: the names a ``backend:`` key may give (``run`` passes the registry's).
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"sweep file not found: {path}")
    text = path.read_text()
    lines = _Lines(text, path)
    data = yaml.load(text, Loader=_Loader)
    if not isinstance(data, dict):
        raise lines.error((), "a sweep file is a mapping with at least 'config' and 'axes'")
    try:
        spec = SweepFile.model_validate(data)
    except pydantic.ValidationError as exc:
        raise _schema_error(lines, exc) from None
    if backends and spec.backend is not None and spec.backend not in backends:
        raise lines.error(("backend",), f"unknown backend {spec.backend!r}; valid: {', '.join(backends)}")
    if "seed" in spec.axes:
        raise lines.error(("axes", "seed"), "'seed' is reserved: list the seeds under the top-level 'seeds' key")
    config_path = _find_config(lines, spec.config, path.parent)
    python_path = (path.parent.resolve(), *_python_path(lines, spec.python_path, path.parent), PACKAGE_ROOT)
    try:
        base = cfg.load_file(config_path, python_path)
    except UsageError as exc:
        raise lines.error(("config",), str(exc)) from None
    seeds = spec.seeds if spec.seeds is not None else [base.get("seed", 0)]
    name = spec.name or path.stem
    if not re.fullmatch(SWEEP_NAME, name):
        raise lines.error(("name",), f"the file name {path.stem!r} cannot name a sweep; give 'name:'")
    _check_values(lines, spec, base, config_path, check_forwards)
    _check_asha(lines, spec, base)
    if spec.slurm.signal_delay_s >= 60 * spec.resources.time_min:
        limit = f"time limit (resources.time_min: {spec.resources.time_min} min)"
        raise lines.error(("slurm", "signal_delay_s"), f"{spec.slurm.signal_delay_s} s must be below the {limit}: "
                          "the job would be signalled as it starts")  # fmt: skip
    _check_sbatch_options(lines, spec)
    evaluations = _check_evaluations(lines, spec, base)
    sweep = Sweep(
        path=path, name=name, config=config_path, config_as_written=Path(spec.config).as_posix(),
        python_path=python_path, base=base, axes=dict(spec.axes), seeds=list(seeds), overrides=dict(spec.overrides),
        evaluations=evaluations, resources=spec.resources, backend=spec.backend,
        runs_dir=runs_root(runs_dir, spec.runs_dir, path.parent), slurm=spec.slurm, ray=spec.ray, local=spec.local,
        search=spec.search, forward_sources=user_forward_sources(),
    )  # fmt: skip
    if sweep.size > max_trials:
        raise lines.error(("axes",), f"{sweep.size:,} trials is more than --max-trials={max_trials:,}; "
                                     "narrow the axes or raise --max-trials")  # fmt: skip
    if check_forwards:
        _check_forward_memory(lines, sweep)
    return sweep


def _beside(folder: Path, written: str | Path) -> Path:
    """``written`` against ``folder`` (an absolute path stays itself), with ``..`` folded so that the
    paths lintrans prints stay as short as the ones typed (``sweeps/../runs`` is ``runs``)."""
    return Path(os.path.normpath(folder / written))


def _find_config(lines: _Lines, written: str, folder: Path) -> Path:
    """The file ``config:`` names: beside the sweep file, else (relative only) under :data:`PACKAGE_ROOT`."""
    tried = [_beside(folder, written)] + ([] if Path(written).is_absolute() else [PACKAGE_ROOT / written])
    found = next((p for p in tried if p.is_file()), None)
    if found is None and len(tried) == 1:
        raise lines.error(("config",), f"config file not found: {written}")
    if found is None:
        raise lines.error(("config",), f"config file not found: {written}, neither against the sweep file's folder "
                          f"({tried[0].resolve()}) nor against lintrans's root ({tried[1]})")  # fmt: skip
    return found


def _python_path(lines: _Lines, entries: list[str], folder: Path) -> list[Path]:
    """The ``python_path:`` folders, absolute (the trial imports from them wherever it runs); each must exist."""
    out = []
    for i, entry in enumerate(entries):
        found = _beside(folder, entry).resolve()
        if not found.is_dir():
            raise lines.error(("python_path", i), f"no such folder: {entry} ({found}, against the sweep file's folder)")
        out.append(found)
    return out


def runs_root(flag: str | Path | None, in_file: str | None, folder: Path) -> Path:
    """Where a sweep's runs go: ``--runs-dir``, else the sweep file's ``runs_dir:`` (against its folder),
    else ``$LINTRANS_RUNS_DIR``, else ``runs/`` beside the sweep file.

    The flag comes first because it is the most specific request (this command, now: an archived
    copy, a scratch disk); the file's key says where its author keeps this sweep; the environment
    variable is a default for every sweep of a session. None of them depends on the working directory.
    """
    if flag:
        return Path(flag)
    if in_file:
        return _beside(folder, in_file)
    return Path(os.environ[RUNS_ENV]) if os.environ.get(RUNS_ENV) else _beside(folder, "runs")


def _check_values(
    lines: _Lines, spec: SweepFile, base: ml_collections.ConfigDict, config_path: Path, forwards: bool
) -> None:
    """Every axis value and override: a key of the config, the right type, a value :func:`cfg.validate` accepts."""
    if spec.search.method == "grid":
        for key, axis in spec.axes.items():
            if isinstance(axis, Distribution):
                raise lines.error(("axes", key), "a distribution needs search: {method: random|optuna, n_trials: N}; "
                                                 "grid search takes a list of values")  # fmt: skip
    fixed = _apply(lines, base, spec.overrides, lambda key: ("overrides", key), config_path, forwards)
    for key, axis in spec.axes.items():
        if isinstance(axis, Distribution):
            values = axis.choice or [axis.sample(random.Random(i)) for i in range(2)]
            where = [("axes", key)] * len(values)
        else:
            if not axis:
                raise lines.error(("axes", key), "an axis is a non-empty list of values")
            duplicates = sorted({json.dumps(v, default=str) for v in axis if axis.count(v) > 1})
            if duplicates:
                raise lines.error(("axes", key), f"duplicate values {', '.join(duplicates)}: each gives the same trial")
            values, where = axis, [("axes", key, i) for i in range(len(axis))]
        for value, at in zip(values, where, strict=True):
            _apply(lines, fixed, {key: value}, lambda _k, at=at: at, config_path, forwards)


def _apply(lines, config, overrides: dict, where, config_path: Path, forwards: bool) -> ml_collections.ConfigDict:
    """``config`` with ``overrides`` applied and validated, or the error at the value's line."""
    for key, value in overrides.items():
        if not isinstance(key, str):
            raise lines.error(where(key), f"config keys are dotted strings, got {key!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise lines.error(where(key), f"{value!r} is not a finite number")
    try:
        out = cfg.apply_overrides(config, overrides)
    except KeyError as exc:
        key = exc.args[0]
        raise lines.error(where(key), f"unknown config key '{key}' in {config_path}") from None
    except (TypeError, ValueError) as exc:
        key = next(iter(overrides))
        value = overrides[key]
        raise lines.error(where(key), f"wrong type for '{key}': {type(value).__name__} {value!r} ({exc})") from None
    try:
        cfg.validate(out, forward=forwards)
    except UsageError as exc:
        named = [k for k in overrides if f"config.{k}" in str(exc) or f"'{overrides[k]}'" in str(exc)]
        at = where(named[0]) if named else where(next(iter(overrides))) if overrides else ("config",)
        raise lines.error(at, str(exc)) from None
    return out


def _check_sbatch_options(lines: _Lines, spec: SweepFile) -> None:
    """``slurm.additional`` options that would ask twice for what ``resources`` asks already."""
    given = {k for k, v in spec.slurm.additional.items() if v is not None and v is not False}
    for key in sorted(given & {"gres", "gpus"} if spec.resources.gpus else set()):
        raise lines.error(("slurm", "additional", key), f"resources.gpus ({spec.resources.gpus}) asks for GPUs "
                          "already (--gpus-per-node): give one")  # fmt: skip
    for key in sorted(given & MEMORY_OPTIONS if spec.resources.mem_gb else set()):
        raise lines.error(("slurm", "additional", key), f"resources.mem_gb ({spec.resources.mem_gb}, --mem) and {key} "
                          "are exclusive: give one")  # fmt: skip


def _check_asha(lines: _Lines, spec: SweepFile, base: ml_collections.ConfigDict) -> None:
    """ASHA stops trials at rungs from ``grace_period`` steps on: the shortest trial must train longer than that."""
    asha = spec.ray.asha if spec.ray else None
    if asha is None:
        return
    shortest = _shortest_training(spec, base)
    if asha.grace_period >= shortest:
        raise lines.error(("ray", "asha", "grace_period"), f"{asha.grace_period} steps must be below the shortest "
                          f"trial's training.n_iters ({shortest}): ASHA would never compare trials")  # fmt: skip


def _shortest_training(spec: SweepFile, base: ml_collections.ConfigDict) -> int:
    """The fewest steps any trial trains (``training.n_iters`` as an axis, an override, or the config's)."""
    axis = spec.axes.get("training.n_iters")
    if isinstance(axis, list):
        return min(axis)
    if isinstance(axis, Distribution) and axis.choice is not None:
        return min(axis.choice)
    if isinstance(axis, Distribution):
        return (axis.randint or axis.uniform or axis.loguniform)[0]
    return spec.overrides.get("training.n_iters", base.training.n_iters)


def _check_evaluations(lines: _Lines, spec: SweepFile, base: ml_collections.ConfigDict) -> list[EvalSpec]:
    """Each evaluation as an :class:`EvalSpec`, valid for every data set the trials use."""
    data_key = "data.dataset"
    datasets = spec.axes.get(data_key) if isinstance(spec.axes.get(data_key), list) else None
    datasets = datasets or [spec.overrides.get(data_key, base.data.dataset)]
    every = spec.overrides.get("training.snapshot_freq", base.training.snapshot_freq)
    shortest = _shortest_training(spec, base)
    out = []
    for i, ev in enumerate(spec.evaluations):
        try:
            parsed = EvalSpec.parse(ev if isinstance(ev, dict) else {"mode": ev})
            for dataset in datasets:
                parsed.resolved(dataset)
        except SpecError as exc:
            raise lines.error(("evaluations", i, exc.field), str(exc)) from None
        if parsed.checkpoint:  # a named snapshot: every trial must write checkpoint_<N>.pth
            if parsed.checkpoint % every or parsed.checkpoint > shortest:
                raise lines.error(("evaluations", i, "checkpoint"), f"{parsed.checkpoint} is not a snapshot every "
                                  f"trial saves: choose a multiple of training.snapshot_freq ({every}) up to the "
                                  f"shortest trial's training.n_iters ({shortest}), or 0 for the last")  # fmt: skip
        out.append(parsed)
    identities = [(e.mode, e.experiment_name, e.param_name, e.checkpoint) for e in out]
    if len(set(identities)) != len(identities):
        raise lines.error(
            ("evaluations",), "two evaluations with the same mode, names and checkpoint write the same record"
        )
    return out


def _check_forward_memory(lines: _Lines, sweep: Sweep) -> None:
    """The memory each distinct (process, K, shape, budget) of the trials would take, without building any."""
    from lintrans.forward import check_forward

    keys = ("model.forward", "model.K", "data.num_channels", "data.image_size", "model.max_dense_bytes")

    def value(trial_overrides: dict, key: str):
        if key in trial_overrides:
            return trial_overrides[key]
        section, leaf = key.split(".")
        return sweep.base[section][leaf]

    axes = {k: v for k, v in sweep.axes.items() if k in keys and isinstance(v, list)}
    for combo in itertools.product(*axes.values()):
        ov = {**sweep.overrides, **dict(zip(axes, combo, strict=True))}
        name, K, C, size, budget = (value(ov, k) for k in keys)
        try:
            check_forward(name, K, (C, size, size), budget)
        except UsageError as exc:
            at = ("axes", next(iter(axes))) if axes else ("config",)
            raise lines.error(
                at, f"{exc} (for {', '.join(f'{k}={v}' for k, v in zip(axes, combo, strict=True))})"
            ) from None
