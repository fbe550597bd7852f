"""Config checks and serialisation shared by the entry points.

Configs stay ml_collections files with ``--config.x.y=value`` overrides, as in the seed; this
module only validates the values whose mistakes would otherwise surface deep inside training.
"""

from __future__ import annotations

import json
import math

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
