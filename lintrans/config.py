"""Config checks and serialisation shared by the entry points.

Configs stay ml_collections files with ``--config.x.y=value`` overrides, as in the seed; this
module only validates the values whose mistakes would otherwise surface deep inside training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_collections

from lintrans.errors import UsageError, choices

PRECISIONS = ("no", "bf16")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise :class:`UsageError` naming the first impossible value."""
    m, t = config.model, config.training
    K = m.K
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise UsageError(f"config.model.K must be an integer >= 1, got {K!r}")
    for key in ("sigma",):
        v = m[key]
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise UsageError(f"config.model.{key} must be a finite number >= 0, got {v!r}")
    delta = config.sampling.get("delta", None)
    if delta is not None and (not math.isfinite(delta) or delta < 0):
        raise UsageError(f"config.sampling.delta must be a finite number >= 0, got {delta!r}")
    for key in ("batch_size", "n_iters"):
        if not isinstance(t[key], int) or t[key] < (1 if key == "batch_size" else 0):
            raise UsageError(f"config.training.{key} must be a positive integer, got {t[key]!r}")
    if t.get("mixed_precision", "no") not in PRECISIONS:
        raise UsageError(f"unknown config.training.mixed_precision '{t.mixed_precision}'; valid: {choices(PRECISIONS)}")
    if not 0 <= m.ema_rate < 1:
        raise UsageError(f"config.model.ema_rate must be in [0, 1), got {m.ema_rate!r}")


def sampling_delta(config: ml_collections.ConfigDict) -> float:
    """IHDM's sampling noise: ``config.sampling.delta`` if set, else ``1.25 * sigma``."""
    delta = config.sampling.get("delta", None)
    return float(1.25 * config.model.sigma if delta is None else delta)


def to_json(config: ml_collections.ConfigDict) -> str:
    return config.to_json_best_effort(sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))


# Keys that fix what a checkpoint means: the forward process, its horizon and noise, the network,
# and the data it models. Training-only knobs (dropout, EMA rate) and memory budgets may differ.
_RUN_KEYS = ("model", "data.dataset", "data.image_size", "data.num_channels", "data.centered")
_FREE_MODEL_KEYS = ("dropout", "ema_rate", "max_dense_bytes")


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def check_matches_run(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
    """Refuse a config that disagrees with the one the run in ``workdir`` was trained with.

    A checkpoint does not store the forward process, K or σ, so evaluating (or resuming) a
    ``constant_velocity`` run under a config that says ``heat`` loads fine and silently gives
    numbers for the wrong model. ``config.json``, written by the trainer, is the run's truth.
    """
    saved_path = Path(workdir) / "config.json"
    if not saved_path.is_file():
        return
    try:
        saved = _flatten(json.loads(saved_path.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read the run's config {saved_path}: {exc}") from None
    given = _flatten(json.loads(to_json(config)))
    differ = []
    for key in sorted(saved.keys() & given.keys()):
        if not any(key == k or key.startswith(f"{k}.") for k in _RUN_KEYS):
            continue
        if key.startswith("model.") and key.split(".", 1)[1] in _FREE_MODEL_KEYS:
            continue
        if saved[key] != given[key]:
            differ.append(key)
    if differ:
        shown = ", ".join(f"{k}={given[k]!r} (run: {saved[k]!r})" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        fix = " ".join(f"--config.{k}={_flag_value(saved[k])}" for k in differ[:4])
        raise UsageError(
            f"the config disagrees with the run in {workdir} ({saved_path.name}): {shown}{more}; pass {fix}"
        )


def _flag_value(value: object) -> str:
    """A value as ``--config.x=...`` accepts it (tuples for lists, as ml_collections parses them)."""
    if isinstance(value, list):
        return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)
