"""Read an IHDM checkpoint safely and translate its weights, EMA and Adam state to lintrans names.

IHDM (AaltoML/generative-inverse-heat-dissipation) saves ``{'optimizer', 'model', 'step', 'ema'}``
with ``torch.save``: the model is wrapped in ``DataParallel`` (keys start with ``module.``), the
EMA is score-SDE's ``ExponentialMovingAverage`` state (``decay``, ``num_updates`` and
``shadow_params``, a list in parameter order) and the optimizer is Adam over the same parameters.
Its U-Net is guided-diffusion's layout; lintrans's :class:`~lintrans.unet.UNet` computes the same
function under other module names. The translation is written out module by module
(:func:`key_map`) and checked strictly (:func:`check_keys`): every IHDM tensor is used exactly
once, every lintrans tensor is filled, shapes agree, and the first offender is named.

Loading never unpickles code: ``torch.load(weights_only=True)`` with only numpy's scalar and
dtype constructors allowlisted (IHDM's optimizer state holds a numpy float learning rate).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lintrans.errors import UsageError
from lintrans.unet import AttentionBlock, Downsample, ResBlock, UNet, Upsample

# numpy's scalar constructor under its numpy 2 and numpy 1 module names, plus every dtype class:
# all a pickled numpy number needs, and nothing that can run code.
_SCALAR = np._core.multiarray.scalar
SAFE_NUMPY_GLOBALS: list[Any] = [
    _SCALAR,
    (_SCALAR, "numpy.core.multiarray.scalar"),
    np.dtype,
    *(getattr(np.dtypes, name) for name in np.dtypes.__all__),
]
_SAFE_NAMES = {"numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar", "numpy.dtype"} | {
    f"numpy.dtypes.{name}" for name in np.dtypes.__all__
}

IHDM_KEYS = ("optimizer", "model", "step", "ema")

# Submodule names inside each kind of block: lintrans name -> IHDM name ("" is the module itself).
RESBLOCK = {
    "in_layers.0": "in_layers.0",  # GroupNorm
    "in_layers.2": "in_layers.2",  # 3x3 conv
    "emb.1": "emb_layers.1",  # level embedding -> channels
    "out_norm": "out_layers.0",  # IHDM keeps this GroupNorm inside out_layers
    "out_layers.2": "out_layers.3",  # zero-initialised 3x3 conv (after SiLU, Dropout)
    "skip": "skip_connection",  # 1x1 conv where the width changes
}
ATTENTION = {"norm": "norm", "qkv": "qkv", "proj": "proj_out"}
DOWNSAMPLE = {"op": "op"}
UPSAMPLE = {"conv": "conv"}
SEQUENTIAL_0_2 = {"0": "0", "2": "2"}  # Linear/SiLU/Linear and GroupNorm/SiLU/Conv
WHOLE = {"": ""}


@dataclass(frozen=True)
class Converted:
    """An IHDM checkpoint in lintrans terms (state dicts keyed by lintrans names)."""

    model: dict[str, Tensor]
    ema: dict[str, Tensor]
    ema_num_updates: int
    ema_decay: float
    optimizer_state: dict[int, dict[str, Any]]
    step: int


# --------------------------------------------------------------------------- reading


def load(path: Path) -> dict:
    """The checkpoint at ``path``, unpickled with tensors, containers and numpy numbers only."""
    if not path.is_file():
        raise UsageError(f"IHDM checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_NUMPY_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - foreign pickles, truncated zips and garbage all land here
        foreign = _foreign_globals(path)
        if foreign:
            raise UsageError(
                f"IHDM checkpoint {path} pickles {foreign[0]}, which is not a tensor or numpy number: "
                "refusing to unpickle it (weights_only=True)"
            ) from None
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"cannot read IHDM checkpoint {path}: {detail}") from None
    missing = [key for key in IHDM_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise UsageError(
            f"{path} is not an IHDM checkpoint: it lacks '{missing[0]}' "
            f"(IHDM's save_checkpoint writes {', '.join(IHDM_KEYS)})"
        )
    return state


def _foreign_globals(path: Path) -> list[str]:
    """Globals the pickle names beyond torch's and ours (read from the opcodes, nothing is run)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a zip: no names to report
        return []
    return [name for name in names if name not in _SAFE_NAMES]


def model_state(state: dict, path: Path) -> dict[str, Tensor]:
    """IHDM's model state dict with DataParallel's ``module.`` prefix removed, in saved order."""
    raw = state["model"]
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, Tensor) for v in raw.values()):
        raise UsageError(f"{path}: 'model' is not a state dict of tensors")
    wrapped = all(key.startswith("module.") for key in raw)
    return {(key[len("module.") :] if wrapped else key): value for key, value in raw.items()}


# --------------------------------------------------------------------------- the key mapping


def _table(layer: nn.Module) -> dict[str, str]:
    for kind, table in ((ResBlock, RESBLOCK), (AttentionBlock, ATTENTION), (Downsample, DOWNSAMPLE),
                        (Upsample, UPSAMPLE)):  # fmt: skip
        if isinstance(layer, kind):
            return table
    raise UsageError(f"lintrans layer {type(layer).__name__} has no IHDM counterpart")


def module_map(model: UNet) -> list[tuple[nn.Module, str, str, dict[str, str]]]:
    """``(module, lintrans prefix, IHDM prefix, submodule table)`` for every block, in IHDM's order.

    IHDM's ``input_blocks[0]`` is the first convolution, so lintrans's ``down[i]`` is
    ``input_blocks[i+1]``; IHDM keeps each upsampler as the last layer of its output block, lintrans
    in ``upsamplers[str(i)]`` beside ``up[i]``.
    """
    out: list[tuple[nn.Module, str, str, dict[str, str]]] = [
        (model.level_mlp, "level_mlp", "time_embed", SEQUENTIAL_0_2),
        (model.input_conv, "input_conv", "input_blocks.0.0", WHOLE),
    ]
    for i, layers in enumerate(model.down):
        out += [(layer, f"down.{i}.{j}", f"input_blocks.{i + 1}.{j}", _table(layer)) for j, layer in enumerate(layers)]
    out += [(layer, f"middle.{j}", f"middle_block.{j}", _table(layer)) for j, layer in enumerate(model.middle)]
    for i, layers in enumerate(model.up):
        out += [(layer, f"up.{i}.{j}", f"output_blocks.{i}.{j}", _table(layer)) for j, layer in enumerate(layers)]
        if str(i) in model.upsamplers:
            up = model.upsamplers[str(i)]
            out.append((up, f"upsamplers.{i}", f"output_blocks.{i}.{len(layers)}", UPSAMPLE))
    out.append((model.out, "out", "out", SEQUENTIAL_0_2))
    return out


def key_map(model: UNet) -> dict[str, str]:
    """lintrans state-dict key -> IHDM key (without ``module.``), for every lintrans key, in lintrans order."""
    mapping: dict[str, str] = {}
    for module, prefix, ihdm_prefix, table in module_map(model):
        for name in module.state_dict():
            sub, _, leaf = name.rpartition(".")
            if sub not in table:
                raise UsageError(f"lintrans key {prefix}.{name} has no entry in the IHDM key table")
            ihdm_sub = ".".join(part for part in (ihdm_prefix, table[sub]) if part)
            mapping[f"{prefix}.{name}"] = f"{ihdm_sub}.{leaf}"
    own = list(model.state_dict())
    unfilled = [key for key in own if key not in mapping]
    if unfilled:
        raise UsageError(f"lintrans key {unfilled[0]} is not covered by the IHDM key mapping")
    if len(set(mapping.values())) != len(mapping):
        raise UsageError("the IHDM key mapping sends two lintrans keys to one IHDM key")
    return {key: mapping[key] for key in own}


def check_keys(mapping: dict[str, str], ihdm: dict[str, Tensor], shapes: dict[str, torch.Size], where: str) -> None:
    """Every IHDM key used once with the shape lintrans expects, every lintrans key filled."""
    back = {ihdm_key: key for key, ihdm_key in mapping.items()}
    hint = "model_channels, channel_mult, num_res_blocks, attention_levels, use_scale_shift_norm, conv_resample"
    for ihdm_key, value in ihdm.items():
        if ihdm_key not in back:
            raise UsageError(f"{where}: IHDM key {ihdm_key} has no place in the lintrans network (CONFIG's {hint})")
        key = back[ihdm_key]
        if tuple(value.shape) != tuple(shapes[key]):
            raise UsageError(
                f"{where}: IHDM key {ihdm_key} has shape {tuple(value.shape)}, lintrans {key} needs "
                f"{tuple(shapes[key])} (CONFIG's {hint})"
            )
    absent = [key for key in mapping if mapping[key] not in ihdm]
    if absent:
        raise UsageError(f"{where}: no IHDM key {mapping[absent[0]]} for lintrans {absent[0]} (CONFIG's {hint})")


def legacy_qkv_to_new(t: Tensor, heads: int) -> Tensor:
    """Reorder qkv rows from IHDM's legacy attention order (head, q|k|v, ch) to lintrans's (q|k|v, head, ch).

    Exact: it only permutes the output rows of a 1x1 convolution (and of its Adam moments).
    """
    rows = t.shape[0]
    return t.reshape(heads, 3, rows // (3 * heads), *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _transforms(model: UNet, legacy_attention: bool) -> dict[str, int]:
    """lintrans keys whose tensors need :func:`legacy_qkv_to_new`, with the heads of their block."""
    if not legacy_attention:
        return {}
    out: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, AttentionBlock) and module.heads > 1:
            out.update({f"{name}.qkv.weight": module.heads, f"{name}.qkv.bias": module.heads})
    return out


# --------------------------------------------------------------------------- conversion


def convert(state: dict, model: UNet, path: Path, *, legacy_attention: bool = False) -> Converted:
    """IHDM's model, EMA and Adam state under lintrans's names (``model`` only supplies names and shapes)."""
    ihdm = model_state(state, path)
    mapping = key_map(model)
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    check_keys(mapping, ihdm, shapes, f"{path} (model)")
    heads = _transforms(model, legacy_attention)

    def fix(key: str, value: Tensor) -> Tensor:
        return legacy_qkv_to_new(value, heads[key]) if key in heads else value

    ihdm_order = list(ihdm)  # IHDM's parameter order (its U-Net has no buffers)
    ema = _ema(state["ema"], ihdm, ihdm_order, path)
    return Converted(
        model={key: fix(key, ihdm[ihdm_key]).clone() for key, ihdm_key in mapping.items()},
        ema={key: fix(key, ema["params"][ihdm_key]).clone() for key, ihdm_key in mapping.items()},
        ema_num_updates=ema["num_updates"] if ema["num_updates"] is not None else int(state["step"]),
        ema_decay=ema["decay"],
        optimizer_state=_adam_state(state["optimizer"], model, mapping, ihdm, ihdm_order, fix, path),
        step=_int(state["step"], "step", path),
    )


def _int(value: Any, what: str, path: Path) -> int:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    raise UsageError(f"{path}: '{what}' must be a count >= 0, got {value!r}")


def _ema(raw: Any, ihdm: dict[str, Tensor], order: list[str], path: Path) -> dict[str, Any]:
    """Name IHDM's shadow parameters (a list in parameter order) by the model's keys."""
    if not isinstance(raw, dict) or not all(k in raw for k in ("decay", "num_updates", "shadow_params")):
        raise UsageError(
            f"{path}: 'ema' is not IHDM's ExponentialMovingAverage state (decay, num_updates, shadow_params)"
        )
    shadow = raw["shadow_params"]
    if not isinstance(shadow, list) or len(shadow) != len(order):
        count = len(shadow) if isinstance(shadow, list) else type(shadow).__name__
        raise UsageError(f"{path}: the EMA holds {count} shadow parameters, the model {len(order)}")
    for i, (key, value) in enumerate(zip(order, shadow)):
        if not isinstance(value, Tensor) or value.shape != ihdm[key].shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise UsageError(
                f"{path}: EMA shadow parameter {i} has shape {got}, model key {key} {tuple(ihdm[key].shape)}"
            )
    updates = raw["num_updates"]
    return {
        "params": dict(zip(order, shadow)),
        "num_updates": None if updates is None else _int(updates, "ema.num_updates", path),
        "decay": float(raw["decay"]),
    }


def _adam_state(
    raw: Any, model: UNet, mapping: dict[str, str], ihdm: dict[str, Tensor], order: list[str], fix, path: Path
) -> dict[int, dict[str, Any]]:
    """IHDM's per-parameter Adam state, re-indexed from IHDM's parameter order to lintrans's."""
    if not isinstance(raw, dict) or "state" not in raw or "param_groups" not in raw:
        raise UsageError(f"{path}: 'optimizer' is not an optimizer state dict")
    ids = [i for group in raw["param_groups"] for i in group.get("params", [])]
    if len(ids) != len(order):
        raise UsageError(f"{path}: the optimizer covers {len(ids)} parameters, the model {len(order)}")
    by_name = {order[pos]: raw["state"].get(i) for pos, i in enumerate(ids)}
    out: dict[int, dict[str, Any]] = {}
    for j, (key, param) in enumerate(model.named_parameters()):
        entry = by_name[mapping[key]]
        if entry is None:
            continue  # no step taken on this parameter yet
        if "exp_avg" not in entry:
            raise UsageError(f"{path}: optimizer state of {mapping[key]} is not Adam's (no exp_avg)")
        moved = {}
        for name, value in entry.items():
            if isinstance(value, Tensor) and value.dim() > 0:
                if value.shape != param.shape:
                    raise UsageError(
                        f"{path}: optimizer {name} of {mapping[key]} has shape {tuple(value.shape)}, "
                        f"lintrans {key} needs {tuple(param.shape)}"
                    )
                value = fix(key, value)
            moved[name] = value.clone() if isinstance(value, Tensor) else value
        out[j] = moved
    return out
