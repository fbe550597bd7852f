"""The reverse process: ``u_{k-1} = u_k + f(u_k, k) + delta * eps`` for ``k = K..1``.

Sampling starts from the prior (``config.sampling.prior``) and returns the last mean (no noise
after ``k = 1``):

* ``data``, IHDM's: ``u_K = T(K) u_0' + delta * eps`` with ``u_0'`` a training image
  (:class:`DataPrior`);
* ``gaussian``: ``u_K ~ N(mu, Sigma + delta^2 I)``, fitted to ``T(K) u_0`` over the training set
  and stored with the run (:class:`GaussianPrior`, :mod:`lintrans.gaussian_prior`): no data set.

``share_noise`` uses one noise draw per step for the whole batch; a shared initial state
(``--same_init``) is expressed by passing a prior that repeats one state.

A stochastic forward process needs one ``theta`` per sample: :func:`draw_theta` draws it from
``p(theta)`` (``None`` for a deterministic process), and the same ``theta`` goes into the data
prior ``T_theta(K) u_0'`` and into every step of the reverse path, ``f(u_k, k, theta)``. The
Gaussian prior is one density for every ``theta`` (fitted marginally over it), so it ignores it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lintrans.forward import ForwardProcess
from lintrans.gaussian_prior import GaussianFit, sample_prior
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


class DataPrior:
    """IHDM's prior over the training images in a seeded order (``seed``), cycled: ``draw(n, generator, theta)``."""

    def __init__(self, process: ForwardProcess, train_set, delta: float, seed: int, device: torch.device) -> None:
        self.process, self.train_set, self.delta, self.device = process, train_set, delta, device
        self.order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
        self.position = 0

    def draw(self, n: int, generator: torch.Generator, theta: Tensor | None = None) -> Tensor:
        idx = self.order[(self.position + torch.arange(n)) % len(self.order)]
        self.position += n
        return prior(self.process, self.train_set.batch(idx).to(self.device), self.delta, generator, theta)


class GaussianPrior:
    """``N(mu, Sigma + delta^2 I)`` from a stored fit, as images of ``shape``: ``draw(n, generator, theta)``."""

    def __init__(self, fit: GaussianFit, shape: tuple[int, ...], delta: float) -> None:
        self.fit, self.shape, self.delta = fit, shape, delta

    def draw(self, n: int, generator: torch.Generator, theta: Tensor | None = None) -> Tensor:
        """``theta`` is not used: ``u_K`` is drawn independently of it (see the module docstring)."""
        return sample_prior(self.fit, n, self.delta, generator).float().view(n, *self.shape)


def prior_for(
    process: ForwardProcess, delta: float, device: torch.device, *, fit: GaussianFit | None, train_set, seed: int
) -> DataPrior | GaussianPrior:
    """The Gaussian prior where there is a ``fit`` (moved to ``device`` once), else IHDM's over ``train_set`` in
    the order ``seed`` draws."""
    if fit is not None:
        return GaussianPrior(fit.to(device), process.shape, delta)
    return DataPrior(process, train_set, delta, seed, device)


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
