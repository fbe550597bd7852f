"""The reverse process: ``u_{k-1} = u_k + f(u_k, k) + delta * eps`` for ``k = K..1``.

Sampling starts from IHDM's prior ``u_K = T(K) u_0' + delta * eps`` with ``u_0'`` a training
image, and returns the last mean (no noise after ``k = 1``). ``share_noise`` uses one noise draw
per step for the whole batch; a shared initial state (``--same_init``) is expressed by passing a
prior that repeats one state.

A stochastic forward process needs one ``theta`` per sample: :func:`draw_theta` draws it from
``p(theta)`` (``None`` for a deterministic process), and the same ``theta`` goes into the prior
``T_theta(K) u_0'`` and into every step of the reverse path, ``f(u_k, k, theta)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lintrans.forward import ForwardProcess
from lintrans.loss import Model


def _noise(shape: torch.Size, generator: torch.Generator, device: torch.device, share: bool) -> Tensor:
    if share:
        return torch.randn((1, *shape[1:]), generator=generator, device=device).expand(shape)
    return torch.randn(shape, generator=generator, device=device)


def draw_theta(process: ForwardProcess, n: int, generator: torch.Generator, share: bool = False) -> Tensor | None:
    """``theta`` for ``n`` samples (``share``: one draw repeated), or ``None`` for a deterministic process."""
    theta = process.sample_theta(1 if share else n, generator)
    return None if theta is None else theta.expand(n, -1)


@torch.no_grad()
def prior(
    process: ForwardProcess, x0: Tensor, delta: float, generator: torch.Generator, theta: Tensor | None = None
) -> Tensor:
    """``T(K) u_0' + delta * eps`` (``T_theta(K)`` for a stochastic process) for training images ``u_0'``."""
    k = process.levels(process.K, len(x0), x0.device)
    return process(x0, k, theta) + delta * torch.randn(x0.shape, generator=generator, device=x0.device)


def interpolate(a: Tensor, b: Tensor, num_points: int) -> Tensor:
    """Linear path between two prior states, ``(num_points, C, H, W)``."""
    w = torch.linspace(0, 1, num_points, device=a.device).view(-1, 1, 1, 1)
    return (1 - w) * a + w * b


@torch.no_grad()
def reverse(
    model: Model,
    u_K: Tensor,
    K: int,
    delta: float,
    generator: torch.Generator,
    share_noise: bool = False,
    num_frames: int = 0,
    theta: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Run ``k = K..1`` from ``u_K`` with the prior's ``theta``; the final mean and ``num_frames`` snapshots."""
    u = u_K
    every = max(1, K // num_frames) if num_frames else 0
    frames = [u.cpu()] if num_frames else []
    for k in range(K, 0, -1):
        levels = torch.full((len(u),), k, device=u.device, dtype=torch.long)
        mean = u + model(u, levels, theta).to(u.dtype)
        if k == 1:
            u = mean
        else:
            u = mean + delta * _noise(u.shape, generator, u.device, share_noise)
        if every and ((K - k + 1) % every == 0 or k == 1):
            frames.append(u.cpu())
    return u, frames
