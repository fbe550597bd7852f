"""Sweep files: YAML with line-precise validation, and deterministic expansion into trials.

A sweep file names a base config, axes (any config key, e.g. ``model.forward``, ``model.K``,
``model.sigma``) whose Cartesian product times ``seeds`` gives the trials, fixed overrides, the
evaluations to run after training, per-trial resources and optional backend sections::

    name: quickstart
    config: configs/mnist5k/default_mnist5k_configs.py
    axes:
      model.forward: [heat, constant_velocity, identity]
      model.K: [10, 20]
    seeds: [0]
    overrides: {training.n_iters: 200}
    evaluations: [{mode: elbo}, {mode: fid, num_gen: 500}]
    resources: {cpus: 1, gpus: 0, mem_gb: 4, time_min: 30}
    slurm: {partition: debug, array_parallelism: 4, max_requeues: 3}

A trial's id is a short stable hash of its base config and resolved overrides (seed included),
so the same trial keeps its run directory ``runs/sweeps/<sweep>/<id>/`` across re-runs, edits
that add axis values, and backends.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import itertools
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_collections
import yaml

from lintrans.errors import UsageError, choices

BACKENDS = ("local", "slurm", "ray")
EVAL_MODES = ("elbo", "fid")
EVAL_KEYS = {
    "mode", "checkpoint", "delta", "batch_size", "num_gen", "experiment_name", "param_name",
    "dataset_name_cleanfid", "dataset_split", "cleanfid_mode", "metric", "num_train", "num_test", "seed",
}  # fmt: skip
RESOURCE_KEYS = {"gpus": int, "cpus": int, "mem_gb": (int, float), "time_min": int, "nodes": int}
SECTIONS = {
    "slurm": {
        "partition": str, "account": str, "qos": str, "constraint": str, "array_parallelism": int,
        "max_requeues": int, "signal_delay_s": int, "setup": list,
    },
    "ray": {"address": str, "max_failures": int, "max_concurrent": int, "asha": dict},
    "local": {"slots": int},
}  # fmt: skip
TOP_KEYS = {
    "name", "config", "axes", "seeds", "overrides", "evaluations", "resources", "backend", "runs_dir", *SECTIONS,
}  # fmt: skip
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Trial:
    """One point of the sweep: base config + overrides (seed included) → one run directory."""

    id: str
    index: int
    overrides: dict[str, Any]
    run_dir: Path
    axes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """The values that tell this trial apart, e.g. ``forward=heat K=20 seed=0``."""
        return " ".join(f"{k.split('.')[-1]}={self.overrides[k]}" for k in (*self.axes, "seed"))


@dataclass
class Sweep:
    path: Path
    name: str
    config: Path
    axes: dict[str, list]
    seeds: list[int]
    overrides: dict[str, Any]
    evaluations: list[dict]
    resources: dict[str, Any]
    backend: str | None
    runs_dir: Path
    sections: dict[str, dict] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.runs_dir / "sweeps" / self.name

    def section(self, name: str) -> dict:
        return self.sections.get(name, {})

    def trials(self) -> list[Trial]:
        """The Cartesian product of the axes (in file order) times the seeds."""
        keys = list(self.axes)
        out = []
        for values in itertools.product(*(self.axes[k] for k in keys)):
            for seed in self.seeds:
                ov = {**self.overrides, **dict(zip(keys, values, strict=True)), "seed": seed}
                tid = trial_id(self.config, ov)
                out.append(Trial(tid, len(out), ov, self.dir / tid, tuple(keys)))
        return out


def trial_id(config: Path, overrides: dict[str, Any]) -> str:
    blob = json.dumps({"config": config.as_posix(), "overrides": overrides}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


class _Lines:
    """Line numbers of every mapping key and sequence item, from the YAML node tree."""

    def __init__(self, text: str, path: Path) -> None:
        self.path = path
        self.lines: dict[tuple, int] = {}
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark else 1
            raise UsageError(f"{path}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if node is not None:
            self._walk(node, ())

    def _walk(self, node, at: tuple) -> None:
        self.lines.setdefault(at, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                self.lines[(*at, key.value)] = key.start_mark.line + 1
                self._walk(value, (*at, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, (*at, i))

    def error(self, at: tuple, message: str) -> UsageError:
        line = self.lines.get(at) or self.lines.get(at[:-1]) or 1
        key = ".".join(str(a) for a in at if not isinstance(a, int)) or "(top)"
        return UsageError(f"{self.path}:{line}: {key}: {message}")


def load_config(path: Path) -> ml_collections.ConfigDict:
    """Import an ml_collections config file (which may register forward processes) and build it."""
    root = str(Path.cwd())
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"lintrans_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """Set dotted keys with ml_collections' own type checks; YAML lists become tuples where a tuple stands."""
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        parent, _, leaf = key.rpartition(".")
        node = config
        for part in parent.split(".") if parent else []:
            node = node[part]
        if leaf not in node:
            raise KeyError(key)
        if isinstance(node[leaf], tuple) and isinstance(value, list):
            value = tuple(value)
        node[leaf] = value
    return config


def _impossible(key: str, value: Any) -> str | None:
    """Values that type-check but cannot run; checked here so nothing is submitted."""
    from lintrans.forward import FORWARD_PROCESSES  # after the config file: it may register more

    if key == "model.forward" and value not in FORWARD_PROCESSES:
        return f"unknown forward process '{value}'; valid: {choices(FORWARD_PROCESSES)}"
    if key == "model.K" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        return f"K must be an integer >= 1, got {value!r}"
    if key == "model.sigma" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
        return f"sigma must be a number >= 0, got {value!r}"
    return None


def _type(value: Any) -> str:
    return type(value).__name__


def load(path: str | Path, runs_dir: str | Path | None = None) -> Sweep:
    """Read and validate a sweep file; every error names the file, the line and the key."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"sweep file not found: {path}")
    text = path.read_text()
    lines = _Lines(text, path)
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise lines.error((), "a sweep file is a mapping with at least 'config' and 'axes'")
    for key in data:
        if key not in TOP_KEYS:
            raise lines.error((key,), f"unknown key; valid: {choices(TOP_KEYS)}")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise lines.error(("name",), f"must match {NAME.pattern} (it names folders and jobs), got {name!r}")
    if "config" not in data or not isinstance(data["config"], str):
        raise lines.error(("config",), "required: the path of an ml_collections config file")
    config_path = Path(data["config"])
    if not config_path.is_file():
        raise lines.error(("config",), f"config file not found: {config_path}")
    try:
        base = load_config(config_path)
    except Exception as exc:  # noqa: BLE001 - a broken config file is user input
        raise lines.error(("config",), f"cannot load {config_path}: {type(exc).__name__}: {exc}") from None

    def check_override(at: tuple, key: Any, value: Any) -> None:
        if not isinstance(key, str):
            raise lines.error(at, f"config keys are dotted strings, got {key!r}")
        try:
            apply_overrides(base, {key: value})
        except KeyError:
            raise lines.error(at, f"unknown config key '{key}' in {config_path}") from None
        except (TypeError, ValueError) as exc:
            raise lines.error(at, f"wrong type for '{key}': {_type(value)} {value!r} ({exc})") from None

    axes = data.get("axes", {})
    if not isinstance(axes, dict) or not axes:
        raise lines.error(("axes",), "required: a mapping of config keys to non-empty lists of values")
    overrides = data.get("overrides", {}) or {}
    if not isinstance(overrides, dict):
        raise lines.error(("overrides",), "a mapping of config keys to values")
    settings = []  # (where, key, value) for every value the sweep sets
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise lines.error(("axes", key), f"an axis is a non-empty list of values, got {values!r}")
        settings += [(("axes", key, i), key, value) for i, value in enumerate(values)]
    settings += [(("overrides", key), key, value) for key, value in overrides.items()]
    for at, key, value in settings:
        check_override(at, key, value)
        problem = _impossible(key, value)
        if problem:
            raise lines.error(at, problem)
    seeds = data.get("seeds", [base.get("seed", 0)])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise lines.error(("seeds",), f"a non-empty list of integers, got {seeds!r}")

    evaluations = data.get("evaluations", []) or []
    if not isinstance(evaluations, list):
        raise lines.error(("evaluations",), "a list of {mode: elbo|fid, ...flags}")
    for i, ev in enumerate(evaluations):
        if not isinstance(ev, dict) or ev.get("mode") not in EVAL_MODES:
            raise lines.error(("evaluations", i), f"each evaluation needs mode: one of {choices(EVAL_MODES)}")
        for key in ev:
            if key not in EVAL_KEYS:
                raise lines.error(("evaluations", i, key), f"unknown evaluation flag; valid: {choices(EVAL_KEYS)}")
    resources = data.get("resources", {}) or {}
    _check_section(lines, ("resources",), resources, RESOURCE_KEYS)
    sections = {}
    for name_ in SECTIONS:
        sec = data.get(name_, {}) or {}
        _check_section(lines, (name_,), sec, SECTIONS[name_])
        sections[name_] = sec
    backend = data.get("backend")
    if backend is not None and backend not in BACKENDS:
        raise lines.error(("backend",), f"unknown backend '{backend}'; valid: {choices(BACKENDS)}")
    runs = Path(runs_dir or data.get("runs_dir", "runs"))
    return Sweep(path, name, config_path, axes, seeds, overrides, evaluations, resources, backend, runs, sections)


def _check_section(lines: _Lines, at: tuple, section: Any, schema: dict) -> None:
    if not isinstance(section, dict):
        raise lines.error(at, f"a mapping with keys {choices(schema)}")
    for key, value in section.items():
        if key not in schema:
            raise lines.error((*at, key), f"unknown key; valid: {choices(schema)}")
        want = schema[key]
        if isinstance(value, bool) or not isinstance(value, want):
            names = "/".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise lines.error((*at, key), f"expected {names}, got {_type(value)} {value!r}")
