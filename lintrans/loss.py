"""The IHDM training objective, a pure function of the model, process, data and randomness.

``E || T(k-1) u_0 - (u_k + f(u_k, k)) ||^2`` with ``u_k = T(k) u_0 + sigma * eps``: summed over
pixels, averaged over the batch, ``k ~ Uniform{1..K}`` (``K`` included, since sampling starts
there). For a stochastic process ``T = T_theta`` with one ``theta`` per sample, and the model is
called as ``f(u_k, k, theta)`` (``theta`` is ``None`` for a deterministic process). Levels, noise
and ``theta`` are passed in rather than drawn here, so that a sharded DDP step and a
single-process step see exactly the same randomness per sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lintrans.forward import ForwardProcess


def sample_levels(batch: int, K: int, generator: torch.Generator) -> Tensor:
    """``k ~ Uniform{1..K}``, one per sample."""
    return torch.randint(1, K + 1, (batch,), generator=generator)


Model = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def denoising_loss(
    model: Model,
    target_k: Tensor,
    target_prev: Tensor,
    k: Tensor,
    noise: Tensor,
    sigma: float,
    theta: Tensor | None = None,
) -> Tensor:
    """Squared error of the one-level prediction from ``(T(k) u_0, T(k-1) u_0)``, ``(B,)`` (summed over pixels)."""
    u_k = target_k + sigma * noise
    prediction = u_k + model(u_k, k, theta)
    return (target_prev - prediction).float().pow(2).flatten(1).sum(1)


def per_sample_loss(
    model: Model,
    process: ForwardProcess,
    x0: Tensor,
    k: Tensor,
    noise: Tensor,
    sigma: float,
    theta: Tensor | None = None,
) -> Tensor:
    """:func:`denoising_loss` of clean images ``x0``, pushing them through the process once for both levels."""
    target_k, target_prev = process.pair(x0, k, theta)
    return denoising_loss(model, target_k, target_prev, k, noise, sigma, theta)
