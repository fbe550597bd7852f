"""The reverse process: ``u_{k-1} = u_k + f(u_k, k) + delta * eps`` for ``k = K..1``.

Sampling starts from IHDM's prior ``u_K = T(K) u_0' + delta * eps`` with ``u_0'`` a training
image, and returns the last mean (no noise after ``k = 1``). ``share_noise`` uses one noise draw
per step for the whole batch; a shared initial state (``--same_init``) is expressed by passing a
prior that repeats one state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lintrans.forward import ForwardProcess


def _noise(shape: torch.Size, generator: torch.Generator, device: torch.device, share: bool) -> Tensor:
    if share:
        return torch.randn((1, *shape[1:]), generator=generator, device=device).expand(shape)
    return torch.randn(shape, generator=generator, device=device)


@torch.no_grad()
def prior(process: ForwardProcess, x0: Tensor, delta: float, generator: torch.Generator) -> Tensor:
    """``T(K) u_0' + delta * eps`` for a batch of training images ``u_0'``."""
    k = process.levels(process.K, len(x0), x0.device)
    return process(x0, k) + delta * torch.randn(x0.shape, generator=generator, device=x0.device)


def interpolate(a: Tensor, b: Tensor, num_points: int) -> Tensor:
    """Linear path between two prior states, ``(num_points, C, H, W)``."""
    w = torch.linspace(0, 1, num_points, device=a.device).view(-1, 1, 1, 1)
    return (1 - w) * a + w * b


@torch.no_grad()
def reverse(
    model: Callable[[Tensor, Tensor], Tensor],
    u_K: Tensor,
    K: int,
    delta: float,
    generator: torch.Generator,
    share_noise: bool = False,
    num_frames: int = 0,
) -> tuple[Tensor, list[Tensor]]:
    """Run ``k = K..1`` from ``u_K``; returns the final mean and up to ``num_frames`` snapshots."""
    u = u_K
    every = max(1, K // num_frames) if num_frames else 0
    frames = [u.cpu()] if num_frames else []
    for k in range(K, 0, -1):
        levels = torch.full((len(u),), k, device=u.device, dtype=torch.long)
        mean = u + model(u, levels).to(u.dtype)
        if k == 1:
            u = mean
        else:
            u = mean + delta * _noise(u.shape, generator, u.device, share_noise)
        if every and ((K - k + 1) % every == 0 or k == 1):
            frames.append(u.cpu())
    return u, frames
