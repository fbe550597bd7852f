"""Negative ELBO (an upper bound on the NLL) for any linear forward process, broken down as IHDM does.

The model, for a forward process ``T`` with ``K`` levels (``d`` = pixels per image):

* inference, factorised as in IHDM: ``q(u_k | u_0) = N(T(k) u_0, sigma^2 I)`` independently for
  ``k = 1..K``;
* generation: ``p(u_K) = (1/N) sum_i N(T(K) x_i, delta^2 I)`` over the ``N`` training images ``x_i``
  (IHDM's, ``prior="data"``) or ``p(u_K) = N(mu, Sigma + delta^2 I)`` with ``mu, Sigma`` the mean and
  covariance of ``T(K) u_0`` over the training set (``prior="gaussian"``, :mod:`lintrans.gaussian_prior`),
  then ``p(u_{k-1} | u_k) = N(u_k + f(u_k, k), delta^2 I)`` for ``k = K..1`` (``k = 1`` is the decoder).

Then ``-log p(u_0) <= L_K + sum_{k=2..K} L_k + L_1`` with

* ``L_K = KL(q(u_K | u_0) || p(u_K))``, bounded in closed form for the mixture (below), exact for the
  Gaussian (:func:`lintrans.gaussian_prior.kl_to_prior`: both are Gaussians);
* ``L_k = E_{u_k} KL(N(T(k-1) u_0, sigma^2 I) || N(u_k + f(u_k, k), delta^2 I))``
  ``= c + E ||T(k-1) u_0 - u_k - f(u_k, k)||^2 / (2 delta^2)``,
  ``c = d/2 (sigma^2/delta^2 - 1 + log(delta^2/sigma^2))``, for every ``k = 2..K``, each once
  (``K -> K-1`` included; IHDM's code misses it and counts ``k = 1`` twice);
* ``L_1 = E_{u_1} [-log N(u_0; u_1 + f(u_1, 1), delta^2 I)]``.

Every level is evaluated for every test image; the expectations are estimated with one noise draw
per (image, level), so the only Monte Carlo error is over the noise (IHDM instead draws one random
level per image and rescales by ``K``, which adds the variance across levels).

The prior term: ``KL(q || sum_i w_i p_i) <= -log sum_i w_i exp(-KL(q || p_i))`` (Jensen with the
optimal variational weights over components), which here is
``L_K <= c + log N - logsumexp_i(-||T(K) u_0 - T(K) x_i||^2 / (2 delta^2))``: exact when ``T(K) = 0``
(all components coincide, the prior is ``N(0, delta^2 I)`` and ``L_K = c``), and never looser than
the nearest-component bound. ``T(K) x_i`` is computed once per evaluation and kept on the device,
centred, so that the squared distances (expanded as ``|a|^2 + |b|^2 - 2 a.b``) lose no precision to
the common mean. The Gaussian's ``L_K`` is ``c`` too when ``T(K) = 0`` (``mu = 0``, ``Sigma = 0``): the two
priors agree where both are ``N(0, delta^2 I)``. Given a Gaussian fit, both priors' ``L_K`` are
computed for every test image (the mixture's needs the training set, which the bound has anyway),
the chosen one enters the bound, and their difference says how far the limit distribution is from
a Gaussian, seen from the test images.

Stochastic processes (``T_theta`` with ``theta ~ p(theta)`` independent of ``u_0``): the generative
model draws ``theta`` from ``p(theta)``, then ``u_K`` from the mixture over ``T_theta(K) x_i`` (or from
the Gaussian, fitted marginally over ``theta``, independently of it), then the reverse chain
``f(u_k, k, theta)``; taking ``q(theta | u_0) = p(theta)`` (exact, since ``theta`` is
independent of ``u_0``) makes ``KL(q(theta) || p(theta)) = 0`` and
``-log p(u_0) <= E_theta[L(u_0 | theta)]``, the bound above with ``T = T_theta`` averaged over
``theta``. Estimator: one ``theta`` per *test batch* (drawn first from ``generator``), unbiased for
the average over test images because each image's ``theta`` is marginally ``p(theta)``. The prior
mixture needs the training set pushed through ``T_theta(K)`` for that ``theta``; batches that drew
the same value (a discrete ``theta``) are grouped and share one push, so the training set is
pushed once per distinct ``theta`` (once in all for a deterministic process, for which nothing is
drawn and the estimator is the one above), not once per test image. ``nll_nats_stderr`` treats
images as independent, which understates the ``theta`` part of the variance when images of a batch
share ``theta``; the draws are returned (``theta``) so a result can be reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from tqdm import tqdm

from lintrans.config import PRIORS
from lintrans.datasets import dequantize
from lintrans.errors import UsageError, choices
from lintrans.forward import ForwardProcess
from lintrans.gaussian_prior import GaussianFit, kl_to_prior
from lintrans.loss import Model

# Rows of the pushed-forward training set per log-sum-exp chunk: bounds the (batch, chunk) matrix.
PRIOR_CHUNK = 16384

DEQUANTIZATION_8BIT = (
    "8-bit data (every value a multiple of 1/255): each test image x = pixel/255 is dequantised to "
    "y = x + (U - 1/2)/255, U ~ Uniform[0,1)^d (one draw per image), the bound is evaluated at y, and "
    "bpd = (nll_nats + d log 255) / (d log 2) bounds the NLL of the discrete pixels, since the bins of "
    "side 1/255 centred on the pixel values are disjoint (Jensen over each bin)."
)
DEQUANTIZATION_CONTINUOUS = (
    "continuous data (not all values are multiples of 1/255): no dequantisation, "
    "bpd = nll_nats / (d log 2) is the bits per dimension of the continuous density."
)


def is_8bit(x: Tensor) -> bool:
    """Whether every value is ``pixel/255`` for an integer ``pixel`` in ``0..255``."""
    scaled = x.float() * 255.0
    return bool(x.min() >= 0 and x.max() <= 1 and (scaled - scaled.round()).abs().max() < 1e-3)


def gaussian_kl_constant(dim: int, sigma: float, delta: float) -> float:
    """``KL(N(a, sigma^2 I) || N(b, delta^2 I))`` without its mean term ``|a - b|^2 / (2 delta^2)``."""
    r = (sigma / delta) ** 2
    return 0.5 * dim * (r - 1.0 - math.log(r))


class MixturePrior:
    """``p(u_K) = mean_i N(T(K) x_i, delta^2 I)`` with ``T(K) x_i`` pushed forward once, and its KL bound."""

    def __init__(self, pushed: Tensor, delta: float) -> None:
        flat = pushed.flatten(1)
        self.centre = flat.mean(0)
        self.points = flat - self.centre
        self.sq_norms = self.points.pow(2).sum(1)
        self.delta = delta

    def kl_bound(self, u_mean: Tensor, constant: float) -> Tensor:
        """Upper bound on ``KL(N(u_mean, sigma^2 I) || p)`` per row, ``(B,)`` (``constant`` is ``c``)."""
        a = u_mean.flatten(1) - self.centre
        a_sq = a.pow(2).sum(1, keepdim=True)
        chunks = []
        for start in range(0, len(self.points), PRIOR_CHUNK):
            b = self.points[start : start + PRIOR_CHUNK]
            dist2 = (a_sq + self.sq_norms[start : start + PRIOR_CHUNK] - 2.0 * a @ b.T).clamp_min(0.0)
            chunks.append(torch.logsumexp(-dist2.double() / (2.0 * self.delta**2), dim=1))
        log_mixture = torch.logsumexp(torch.stack(chunks, dim=1), dim=1)
        return constant + math.log(len(self.points)) - log_mixture


def theta_groups(thetas: Tensor | None, count: int) -> list[tuple[Tensor | None, list[int]]]:
    """Batches ``0..count-1`` grouped by identical ``theta`` row (in order of first appearance).

    ``thetas`` is ``(count, theta_dim)``, one row per batch, or ``None`` (deterministic: one group).
    """
    if thetas is None:
        return [(None, list(range(count)))]
    groups: dict[tuple[float, ...], list[int]] = {}
    for batch, row in enumerate(thetas.tolist()):
        groups.setdefault(tuple(row), []).append(batch)
    return [(thetas[ids[0]], ids) for ids in groups.values()]


def _default_device(model: Callable, x: Tensor) -> torch.device:
    """The device of the model's first parameter or buffer, else the data's."""
    tensors = (*model.parameters(), *model.buffers()) if isinstance(model, nn.Module) else ()
    return tensors[0].device if tensors else x.device


def _check_inputs(
    process: ForwardProcess, train_x0: Tensor, test_x0: Tensor, sigma: float, delta: float, prior: str,
    gaussian: GaussianFit | None,
) -> None:  # fmt: skip
    if sigma <= 0 or delta <= 0:
        raise UsageError(f"sigma and delta must be positive, got sigma={sigma!r}, delta={delta!r}")
    if prior not in PRIORS:
        raise UsageError(f"unknown prior '{prior}'; valid: {choices(PRIORS)}")
    if prior == "gaussian" and gaussian is None:
        raise UsageError("prior='gaussian' needs the Gaussian fit (gaussian=)")
    if gaussian is not None and gaussian.dim != process.dim:
        raise UsageError(f"the Gaussian fit has {gaussian.dim} dimensions, the process {process.dim}")
    for name, x in (("train_x0", train_x0), ("test_x0", test_x0)):
        if not x.is_floating_point() or tuple(x.shape[1:]) != tuple(process.shape) or len(x) == 0:
            raise UsageError(
                f"{name} must be a non-empty float tensor of shape (N, {', '.join(map(str, process.shape))}), "
                f"got {x.dtype} {tuple(x.shape)}"
            )


@contextmanager
def _eval_mode(model: Callable) -> Iterator[None]:
    """``model`` in eval mode (if it is a module) for the block, then back as it was."""
    is_module = isinstance(model, nn.Module)
    was_training = is_module and model.training
    if is_module:
        model.eval()
    try:
        yield
    finally:
        if is_module:
            model.train(was_training)


class _BoundSums:
    """The running sums of one :func:`negative_elbo` call, and the two computations it repeats.

    All randomness (dequantisation, noise) comes from ``gen``, in the order the batches are visited.
    """

    def __init__(
        self, model: Model, process: ForwardProcess, *, sigma: float, delta: float, dtype: torch.dtype,
        device: torch.device, gen: torch.Generator, bar: tqdm, prior: str, gaussian: GaussianFit | None,
    ) -> None:  # fmt: skip
        self.model, self.process, self.sigma, self.delta = model, process, sigma, delta
        self.dtype, self.device, self.gen, self.bar = dtype, device, gen, bar
        self.prior_kind, self.gaussian = prior, None if gaussian is None else gaussian.to(device)
        self.c = gaussian_kl_constant(process.dim, sigma, delta)
        self.decoder_constant = 0.5 * process.dim * math.log(2.0 * math.pi * delta**2)
        self.applications = 0  # images pushed through T
        self.level_sums = torch.zeros(process.K + 1, dtype=torch.float64, device=device)  # sum of L_k over images
        self.mse_sums = torch.zeros(process.K + 1, dtype=torch.float64, device=device)
        self.prior_sums = {kind: torch.zeros((), dtype=torch.float64, device=device) for kind in PRIORS}  # of L_K
        self.total_moments = torch.zeros(2, dtype=torch.float64, device=device)  # sum and sum of squares

    def _draw(self, draw: Callable, shape: torch.Size) -> Tensor:
        return draw(shape, generator=self.gen, device=self.gen.device, dtype=self.dtype).to(self.device)

    def _rows(self, theta: Tensor | None, n: int) -> Tensor | None:
        return None if theta is None else theta.to(self.device).expand(n, -1)

    def prior(self, train_x0: Tensor, theta: Tensor | None, batch_size: int) -> MixturePrior:
        """The mixture over ``T_theta(K) x_i``, the training set pushed forward in batches."""
        process, pushed = self.process, []
        for start in range(0, len(train_x0), batch_size):
            x = train_x0[start : start + batch_size].to(device=self.device, dtype=self.dtype)
            pushed.append(process(x, process.levels(process.K, len(x), self.device), self._rows(theta, len(x))))
            self.bar.update(1)
        self.applications += len(train_x0)
        return MixturePrior(torch.cat(pushed), self.delta)

    def add(self, x: Tensor, theta: Tensor | None, mixture: MixturePrior, quantised: bool) -> None:
        """Every term of the bound for the test images ``x``, added to the sums."""
        if quantised:
            x = dequantize(x, self._draw(torch.rand, x.shape))
        process, theta_x = self.process, self._rows(theta, len(x))
        total = torch.zeros(len(x), dtype=torch.float64, device=self.device)
        previous = x  # T(0) u_0
        for k in range(1, process.K + 1):
            levels = process.levels(k, len(x), self.device)
            current = process(x, levels, theta_x)
            self.applications += len(x)
            u = current + self.sigma * self._draw(torch.randn, x.shape)
            sq = (previous - u - self.model(u, levels, theta_x).to(self.dtype)).double().pow(2).flatten(1).sum(1)
            term = sq / (2.0 * self.delta**2) + (self.decoder_constant if k == 1 else self.c)
            self.mse_sums[k] += sq.sum()
            self.level_sums[k] += term.sum()
            total += term
            previous = current
            self.bar.update(1)
        terms = {"data": mixture.kl_bound(previous, self.c)}
        if self.gaussian is not None:
            terms["gaussian"] = kl_to_prior(self.gaussian, previous, self.sigma, self.delta)
        for kind, term in terms.items():
            self.prior_sums[kind] += term.sum()
        total += terms[self.prior_kind]
        self.total_moments += torch.stack([total.sum(), total.pow(2).sum()])


def _summary(bound: _BoundSums, n_train: int, n_test: int, quantised: bool, thetas: Tensor | None, pushes: int) -> dict:
    """:func:`negative_elbo`'s answer from the sums over all ``n_test`` images."""
    d = bound.process.dim
    levels_mean = (bound.level_sums / n_test).tolist()
    mse_mean = (bound.mse_sums / n_test).tolist()
    mean, second = (bound.total_moments / n_test).tolist()
    prior_means = {kind: total.item() / n_test for kind, total in bound.prior_sums.items()}
    gaussian = prior_means["gaussian"] if bound.gaussian is not None else None
    stderr = math.sqrt(max(second - mean**2, 0.0) / max(n_test - 1, 1))
    bits = 1.0 / (d * math.log(2.0))
    continuous_bpd = mean * bits
    return {
        "nll_nats": mean,
        "nll_nats_stderr": stderr,
        "bpd": (mean + d * math.log(255.0)) * bits if quantised else continuous_bpd,
        "nll_bpd_continuous": continuous_bpd,
        "dequantization": DEQUANTIZATION_8BIT if quantised else DEQUANTIZATION_CONTINUOUS,
        "L_K": prior_means[bound.prior_kind],
        "prior": bound.prior_kind,
        "L_K_data": prior_means["data"],
        "L_K_gaussian": gaussian,
        "prior_gap_nats": None if gaussian is None else prior_means["data"] - gaussian,
        "L_1": levels_mean[1],
        "L_levels": [None, None, *levels_mean[2:]],
        "L_mid_total": sum(levels_mean[2:]),
        "mse_per_level": [None, *mse_mean[1:]],
        "dims": d,
        "K": bound.process.K,
        "num_train": n_train,
        "num_test": n_test,
        "theta": None if thetas is None else thetas.tolist(),
        "prior_pushes": pushes,
        "forward_applications": bound.applications,
        "sigma": float(bound.sigma),
        "delta": float(bound.delta),
    }


@torch.no_grad()
def negative_elbo(
    model: Model,
    process: ForwardProcess,
    train_x0: Tensor,
    test_x0: Tensor,
    *,
    sigma: float,
    delta: float,
    batch_size: int = 256,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    prior: str = "data",
    gaussian: GaussianFit | None = None,
) -> dict:
    """The negative ELBO of ``test_x0``, per image, and its breakdown (see the module docstring).

    ``model(u, k, theta)`` returns the residual ``f`` (``k`` a ``LongTensor (B,)``, ``theta`` the
    process's per-sample parameter or ``None``); ``train_x0`` defines the prior mixture, ``gaussian`` (a
    fit of ``T(K) u_0``, optional with ``prior="data"``) the Gaussian prior, and ``prior`` which of the two
    enters the bound. Computation
    runs in ``test_x0``'s float dtype on ``device`` (default: the model's); ``process`` is moved
    there. ``theta``, the noise (and the dequantisation of 8-bit data) come from ``generator``
    (default: seed 0 on ``device``), so a call is reproducible.

    Returns plain floats/ints/lists: ``nll_nats`` (= ``L_K + L_mid_total + L_1``, mean per image) and
    its standard error over the test images ``nll_nats_stderr``, ``bpd`` and ``nll_bpd_continuous``
    (the convention is in ``dequantization``), ``L_K`` (the prior term of ``prior``), ``L_K_data`` and
    ``L_K_gaussian`` (each prior's; ``None`` without a fit) and ``prior_gap_nats`` (data minus Gaussian),
    ``L_1`` (the decoder),
    ``L_levels`` (index ``k`` = mean ``L_k`` for ``k = 2..K``, where ``L_levels[K]`` is the ``K -> K-1``
    transition, not the prior; ``None`` at 0 and 1), ``L_mid_total``, ``mse_per_level`` (index ``k`` =
    mean ``|T(k-1) u_0 - u_k - f(u_k, k)|^2`` summed over pixels, index 1 the decoder's, ``None`` at 0),
    ``theta`` (a stochastic process's draw per test batch, a list of rows; ``None`` otherwise), and the
    bookkeeping ``dims``, ``K``, ``num_train``, ``num_test``, ``sigma``, ``delta``, ``prior_pushes``
    (distinct ``theta`` values, 1 for a deterministic process) and ``forward_applications``: images
    pushed through ``T``, i.e. ``prior_pushes * num_train`` (``T(K)`` of the training set) plus
    ``K * num_test`` (``T(k) u_0`` for ``k = 1..K``, each reused as the target ``T(k-1) u_0`` of level
    ``k + 1``, and ``T(K) u_0`` for the prior term).
    """
    _check_inputs(process, train_x0, test_x0, sigma, delta, prior, gaussian)
    device = torch.device(device) if device is not None else _default_device(model, test_x0)
    process, dtype = process.to(device), test_x0.dtype
    gen = generator if generator is not None else torch.Generator(device=device).manual_seed(0)

    # One theta per test batch (None, nothing drawn, for a deterministic process); batches that
    # drew the same theta share one push of the training set through T_theta(K).
    test_batches = math.ceil(len(test_x0) / batch_size)
    thetas = process.sample_theta(test_batches, gen)
    groups = theta_groups(thetas, test_batches)
    bar_total = math.ceil(len(train_x0) / batch_size) * len(groups) + test_batches * process.K
    quantised = is_8bit(test_x0)

    # Every level of every test image, batch by batch, against its group's prior.
    with _eval_mode(model), tqdm(total=bar_total, desc="elbo", disable=not progress, dynamic_ncols=True) as bar:
        bound = _BoundSums(model, process, sigma=sigma, delta=delta, dtype=dtype, device=device, gen=gen, bar=bar,
                           prior=prior, gaussian=gaussian)  # fmt: skip
        for theta, batch_ids in groups:
            mixture = bound.prior(train_x0, theta, batch_size)
            for batch in batch_ids:
                x = test_x0[batch * batch_size : (batch + 1) * batch_size].to(device=device, dtype=dtype)
                bound.add(x, theta, mixture, quantised)
            del mixture
    return _summary(bound, len(train_x0), len(test_x0), quantised, thetas, len(groups))
