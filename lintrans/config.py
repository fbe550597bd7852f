"""Configs: load an ml_collections file, apply overrides, validate once, hand out plain values.

Configs stay ml_collections files with ``--config.x.y=value`` overrides, as in IHDM. A file plus
a dict of overrides means the same config wherever it is read: a sweep's trial calls :func:`load`;
the entry points (:mod:`lintrans.cmdline`) load the file with :func:`load_file` and let
ml_collections' config flags set the command line's overrides. :func:`validate`
is the one place that checks values; past it, the code takes the plain values it needs from
:func:`forward_args`, :func:`model_args` and :func:`optim_args` instead of the whole ConfigDict.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from lintrans import trackers
from lintrans.errors import UsageError, choices

RUN_CONFIG = "config.json"  # a run directory's resolved config: what it trained (lintrans.run writes it)
PRECISIONS = ("auto", "no", "bf16")
COMPILE = ("auto", "on", "off")  # training.compile: lintrans.device.use_compile
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("Adam", "SGD")
PRIORS = ("data", "gaussian")  # sampling.prior: IHDM's mixture over the training set, or a fitted Gaussian
DEFAULT_PRIOR_RANK = 256  # sampling.prior_rank where a config lacks it


# --------------------------------------------------------------------------- loading


def load_file(path: str | Path, python_path: Sequence[str | Path] = ()) -> ml_collections.ConfigDict:
    """Import a config file (which may register forward processes) and call its ``get_config()``.

    ``python_path``: folders put in front of ``sys.path`` first, in order, so that the file can
    import its author's modules (a sweep passes its own folder and ``python_path:``; the entry
    points pass the current directory, from which repository configs import ``configs.*``). They
    stay there, as the current directory always did: what the config imported may import more later.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    for folder in reversed([str(p) for p in python_path]):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(f"lintrans_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # as importlib's recipe does: a forward process it defines has a source file
        spec.loader.exec_module(module)
        return module.get_config()
    except Exception as exc:  # noqa: BLE001 - whatever a config file raises, the user must see which file
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise UsageError(f"cannot load config file {path}: {type(exc).__name__}: {text}".rstrip(": ")) from None


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with dotted keys set by ml_collections (``update_from_flattened_dict``).

    ml_collections checks each value's type (and makes YAML and JSON lists tuples where the config
    holds a tuple). Raises ``KeyError(key)`` for a key the config does not have and
    ``TypeError``/``ValueError`` for a value of the wrong type (callers turn those into messages
    that say where the value came from).
    """
    config = copy.deepcopy(config)
    config.lock()  # a key the config lacks is an error, not a new field
    for key, value in overrides.items():
        try:
            config.update_from_flattened_dict({key: value})
        except (KeyError, AttributeError):
            raise KeyError(key) from None
    config.unlock()
    return config


def load(
    path: str | Path, overrides: dict[str, Any] | None = None, python_path: Sequence[str | Path] = ()
) -> ml_collections.ConfigDict:
    """:func:`load_file` then :func:`apply_overrides`, with bad overrides as one-line errors."""
    config = load_file(path, python_path)
    try:
        return apply_overrides(config, overrides or {})
    except KeyError as exc:
        raise UsageError(f"unknown config key '{exc.args[0]}' in {path}") from None
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad override for {path}: {str(exc).splitlines()[0]}") from None


def to_json(config: ml_collections.ConfigDict) -> str:
    return config.to_json_best_effort(sort_keys=True)


def resolved(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config`` as plain JSON values, exactly as a run directory's ``config.json`` records it
    (tuples as lists): what a sweep's trial ids hash, and what tells two versions of a trial apart."""
    return json.loads(to_json(config))


class Resolver:
    """``resolved(apply_overrides(base, overrides))`` for many override sets of one base, fast.

    A sweep of 10,000 trials has few distinct (key, value) pairs: the base is resolved once, each pair
    is converted by ml_collections once (its type checks and tuple conversions), and each trial's
    config is the base's JSON with its converted values set. The same result as applying them all at
    once, since an override sets a plain field that no other field refers to.
    """

    def __init__(self, base: ml_collections.ConfigDict) -> None:
        self.base, self.text = base, to_json(base)
        self.typed: dict[tuple[str, str], Any] = {}
        self.as_is: set[tuple[str, type]] = set()  # (key, type) whose values ml_collections keeps as they are

    def __call__(self, overrides: dict[str, Any]) -> dict[str, Any]:
        out = json.loads(self.text)
        for key, value in overrides.items():
            text = json.dumps(value, sort_keys=True, default=str)
            if (key, type(value)) in self.as_is:  # a seed, say: 1,000 of them need no conversion each
                converted = json.loads(text)
            else:
                if (key, text) not in self.typed:
                    one = resolved(apply_overrides(self.base, {key: value}))
                    for part in key.split("."):
                        one = one[part]
                    self.typed[(key, text)] = one
                    if json.dumps(one, sort_keys=True, default=str) == text:  # 1 into a float field is 1.0: not as is
                        self.as_is.add((key, type(value)))
                converted = json.loads(json.dumps(self.typed[(key, text)]))  # a copy: trials share no mutable value
            *path, last = key.split(".")
            node = out
            for part in path:
                node = node[part]
            node[last] = converted
        return out


# A trial's identity is what it computes (launchers.sweep.trial_id): how a run is watched is not part of it.
NOT_IDENTITY = ("logging",)
# Keys added after trials existed, with the value that does what runs did before the key: left out of a
# trial's identity while they hold it, so that adding a key to the config renames no trial. A key added
# from now on goes here with its neutral value.
NEUTRAL = {("sampling", "prior"): "data", ("sampling", "prior_rank"): 256, ("training", "compile"): "auto",
           ("eval", "max_batch_bytes"): 0}  # fmt: skip


def identity(resolved: dict[str, Any]) -> dict[str, Any]:
    """What of a resolved config names a trial: all of it but :data:`NOT_IDENTITY`, and the :data:`NEUTRAL`
    keys that hold their neutral value (or are absent: a ``config.json`` written before they existed)."""
    out = {k: v for k, v in resolved.items() if k not in NOT_IDENTITY}
    for (section, key), neutral in NEUTRAL.items():
        if isinstance(out.get(section), dict) and out[section].get(key, neutral) == neutral:
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))


# --------------------------------------------------------------------------- validation


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _need(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise UsageError(f"config.{key} must be {what}, got {value!r}")


def validate(config: ml_collections.ConfigDict, forward: bool = True) -> None:
    """Raise :class:`UsageError` naming the first impossible value; afterwards nothing re-checks.

    ``forward=False`` leaves out the forward process (its name, K and memory), the one check that
    imports torch.
    """

    m, t, o, e = config.model, config.training, config.optim, config.eval
    _need(_is_int(config.seed), "seed", "an integer", config.seed)
    _need(_is_int(m.K) and m.K >= 1, "model.K", "an integer >= 1", m.K)
    _need(_is_number(m.sigma) and m.sigma >= 0, "model.sigma", "a finite number >= 0", m.sigma)
    delta = config.sampling.get("delta", None)
    _need(delta is None or (_is_number(delta) and delta >= 0), "sampling.delta", "a finite number >= 0", delta)
    prior, prior_rank = sampling_prior(config), config.sampling.get("prior_rank", DEFAULT_PRIOR_RANK)
    if prior not in PRIORS:
        raise UsageError(f"unknown config.sampling.prior '{prior}'; valid: {choices(PRIORS)}")
    _need(_is_int(prior_rank) and prior_rank >= 1, "sampling.prior_rank", "an integer >= 1", prior_rank)
    _need(_is_number(m.ema_rate) and 0 <= m.ema_rate < 1, "model.ema_rate", "in [0, 1)", m.ema_rate)
    _need(_is_number(m.dropout) and 0 <= m.dropout < 1, "model.dropout", "in [0, 1)", m.dropout)
    for key in ("model_channels", "num_res_blocks"):
        _need(_is_int(m[key]) and m[key] >= 1, f"model.{key}", "an integer >= 1", m[key])
    mult = tuple(m.channel_mult)
    _need(bool(mult) and all(_is_int(c) and c >= 1 for c in mult), "model.channel_mult", "positive integers", mult)
    bad = [lvl for lvl in m.attention_levels if not (_is_int(lvl) and 0 <= lvl < len(mult))]
    if bad:
        raise UsageError(
            f"config.model.attention_levels {tuple(m.attention_levels)}: levels {bad} do not exist; "
            f"valid: 0..{len(mult) - 1} (indices into channel_mult {mult})"
        )
    for key in ("batch_size", "log_freq", "eval_freq", "snapshot_freq", "snapshot_freq_for_preemption"):
        _need(_is_int(t[key]) and t[key] >= 1, f"training.{key}", "an integer >= 1", t[key])
    _need(_is_int(t.n_iters) and t.n_iters >= 0, "training.n_iters", "an integer >= 0", t.n_iters)
    _need(_is_int(t.sampling_freq) and t.sampling_freq >= 0, "training.sampling_freq", "an integer >= 0 (0: off)",
          t.sampling_freq)  # fmt: skip
    for key in ("batch_size", "num_batches"):
        _need(_is_int(e[key]) and e[key] >= 1, f"eval.{key}", "an integer >= 1", e[key])
    budget = max_batch_bytes(config)
    _need(_is_int(budget) and budget >= 0, "eval.max_batch_bytes", "an integer >= 0 (0: no limit)", budget)
    if t.mixed_precision not in PRECISIONS:
        raise UsageError(f"unknown config.training.mixed_precision '{t.mixed_precision}'; valid: {choices(PRECISIONS)}")
    if t.get("compile", "auto") not in COMPILE:
        raise UsageError(f"unknown config.training.compile '{t.compile}'; valid: {choices(COMPILE)}")
    if config.device not in DEVICES:
        raise UsageError(f"unknown config.device '{config.device}'; valid: {choices(DEVICES)}")
    if o.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown config.optim.optimizer '{o.optimizer}'; valid: {choices(OPTIMIZERS)}")
    _need(_is_number(o.lr) and o.lr > 0, "optim.lr", "a finite number > 0", o.lr)
    for key in ("warmup", "grad_clip", "weight_decay"):
        _need(_is_number(o[key]) and o[key] >= 0, f"optim.{key}", "a finite number >= 0", o[key])
    d = config.data
    for key in ("image_size", "num_channels"):
        _need(_is_int(d[key]) and d[key] >= 1, f"data.{key}", "an integer >= 1", d[key])
    theta = m.get("condition_on_theta", False)
    _need(isinstance(theta, bool), "model.condition_on_theta", "true or false", theta)
    _check_logging(config)
    if forward:
        from lintrans.forward import check_forward

        check_forward(**forward_args(config))


def _check_logging(config: ml_collections.ConfigDict) -> None:
    """``logging.backends``: known trackers whose library is installed (checked before any training)."""
    section = config.get("logging", None) or {}
    backends, uri = section.get("backends", trackers.DEFAULT_BACKENDS), section.get("mlflow_uri", None)
    _need(isinstance(backends, (tuple, list)), "logging.backends", "a list of tracker names", backends)
    for name in backends:
        if name not in trackers.BACKENDS:
            valid = choices(trackers.BACKENDS)
            raise UsageError(f"unknown tracker '{name}' in config.logging.backends; valid: {valid}")
    missing = trackers.not_installed(backends)
    if missing:
        raise UsageError(f"config.logging.backends names {missing}, which is not installed: "
                         f"pip install 'lintrans[{missing}]'")  # fmt: skip
    _need(uri is None or (isinstance(uri, str) and uri != ""), "logging.mlflow_uri", "a URI or None", uri)


# --------------------------------------------------------------------------- plain values


def logging_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``backends`` (a tuple of tracker names) and ``mlflow_uri`` (None: a store in the run directory).

    A run from before trackers existed has no ``logging`` section: it logs to TensorBoard, as it did.
    """
    section = config.get("logging", None) or {}
    return {
        "backends": tuple(section.get("backends", trackers.DEFAULT_BACKENDS)),
        "mlflow_uri": section.get("mlflow_uri", None),
    }


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """``(C, H, W)`` of the configured data; images are square as in IHDM."""
    return (config.data.num_channels, config.data.image_size, config.data.image_size)


def forward_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword arguments of :func:`lintrans.forward.create_forward` for this config."""
    from lintrans.forward import process_class

    m = config.model
    cls = process_class(m.forward)
    params = {key: m.get(key) for key in cls.config_keys}
    if "forward_seed" in params and params["forward_seed"] is None:
        params["forward_seed"] = config.seed  # a random process is part of the run's randomness
    missing = [key for key, value in params.items() if value is None]
    if missing:
        raise UsageError(f"forward process '{m.forward}' needs config.model.{missing[0]}")
    return {"name": m.forward, "K": m.K, "shape": image_shape(config), "max_bytes": m.max_dense_bytes, **params}


def model_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword arguments of :class:`lintrans.unet.UNet` for this config.

    ``theta_dim`` is the forward process's when ``model.condition_on_theta`` is set (the network then
    sees each sample's theta), else 0; it is 0 for a deterministic process either way. Runs from
    before the key existed read it as false.
    """
    from lintrans.forward import process_class

    m = config.model
    conditioned = bool(m.get("condition_on_theta", False))
    return {
        "in_channels": config.data.num_channels,
        "model_channels": m.model_channels,
        "channel_mult": tuple(m.channel_mult),
        "num_res_blocks": m.num_res_blocks,
        "attention_levels": tuple(m.attention_levels),
        "dropout": float(m.dropout),
        "use_scale_shift_norm": bool(m.use_scale_shift_norm),
        "conv_resample": bool(m.conv_resample),
        "num_heads": m.num_heads,
        "num_head_channels": m.num_head_channels,
        "rescale_resblocks": bool(m.rescale_resblocks),
        "theta_dim": process_class(m.forward).theta_dim if conditioned else 0,
    }


def optim_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword arguments of :func:`lintrans.model.make_optimizer`."""
    o = config.optim
    return {"optimizer": o.optimizer, "lr": o.lr, "beta1": o.beta1, "eps": o.eps, "weight_decay": o.weight_decay}


def sampling_prior(config: ml_collections.ConfigDict) -> str:
    """``config.sampling.prior``: ``data`` (IHDM's, and what runs from before the key used) or ``gaussian``."""
    return config.sampling.get("prior", "data")


def prior_fit_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword arguments of :func:`lintrans.gaussian_prior.fit_limit` for this config (besides process and data)."""
    return {"max_bytes": config.model.max_dense_bytes, "rank": config.sampling.get("prior_rank", DEFAULT_PRIOR_RANK)}


def max_batch_bytes(config: ml_collections.ConfigDict) -> int:
    """``eval.max_batch_bytes``: the memory budget of one network call in sampling and evaluations (0: none)."""
    return config.eval.get("max_batch_bytes", 0)


def sampling_delta(config: ml_collections.ConfigDict) -> float:
    """IHDM's sampling noise: ``config.sampling.delta`` if set, else ``1.25 * sigma``."""
    delta = config.sampling.get("delta", None)
    return float(1.25 * config.model.sigma if delta is None else delta)


# --------------------------------------------------------------------------- agreement with a run

# Keys that fix what a checkpoint means: the forward process, its horizon and noise, the network,
# and the data it models. Training-only knobs (dropout, EMA rate) and memory budgets may differ.
_RUN_KEYS = ("model", "data.dataset", "data.image_size", "data.num_channels")
_FREE_MODEL_KEYS = ("dropout", "ema_rate", "max_dense_bytes")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def check_matches_run(config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict, where: str) -> None:
    """Refuse a config that disagrees with the one a run was trained with (``where`` names the run).

    A run directory carries its own config (``config.json``), so ``sample.py`` and
    ``evaluate.py`` need no ``--config``; where one is given anyway, evaluating a
    ``constant_velocity`` run under a config that says ``heat`` must not silently give numbers
    for the wrong model.
    """
    given, kept = flatten(json.loads(to_json(config))), flatten(json.loads(to_json(saved)))
    differ = []
    for key in sorted(kept.keys() & given.keys()):
        if not any(key == k or key.startswith(f"{k}.") for k in _RUN_KEYS):
            continue
        if key.startswith("model.") and key.split(".", 1)[1] in _FREE_MODEL_KEYS:
            continue
        if kept[key] != given[key]:
            differ.append(key)
    if differ:
        shown = ", ".join(f"{k}={given[k]!r} (run: {kept[k]!r})" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        fix = " ".join(f"--config.{k}={_flag_value(kept[k])}" for k in differ[:4])
        raise UsageError(
            f"the config disagrees with the run in {where}: {shown}{more}; pass {fix}, or leave out --config"
        )


def _flag_value(value: object) -> str:
    """A value as ``--config.x=...`` accepts it (tuples for lists, as ml_collections parses them)."""
    if isinstance(value, list):
        return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)
