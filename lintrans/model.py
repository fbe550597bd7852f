"""Builders, not a model: the U-Net from plain values, strict weight loading, the optimizer, the lr schedule.

Nothing here holds a network or its state (the network is :class:`lintrans.unet.UNet`). Everything
takes plain values (``model_args`` from :func:`lintrans.config.model_args`), so the trainer,
``sample.py``, ``evaluate.py``, an imported IHDM run and the benchmarks build the same network the
same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lintrans.errors import UsageError
from lintrans.unet import UNet


def build_model(model_args: dict[str, Any], seed: int, device: torch.device | str = "cpu") -> UNet:
    """The U-Net with initial weights drawn from ``seed`` (identical on every DDP rank)."""
    torch.manual_seed(int(seed))
    return UNet(**model_args).to(device)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> nn.Module:
    """Load ``state`` with strict key matching; a mismatch names the checkpoint instead of a traceback."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UsageError(f"checkpoint {source} does not match this model: {str(exc).splitlines()[0]}") from None
    return model


def make_optimizer(
    params, *, optimizer: str, lr: float, beta1: float, eps: float, weight_decay: float
) -> torch.optim.Optimizer:
    """IHDM's Adam, or plain SGD (whose updates are linear in the gradient: the DDP test uses it)."""
    if optimizer == "Adam":
        return torch.optim.Adam(params, lr=lr, betas=(beta1, 0.999), eps=eps, weight_decay=weight_decay, foreach=True)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, foreach=True)


def learning_rate(step: int, lr: float, warmup: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps (IHDM's schedule)."""
    return lr * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
