"""A Gaussian prior for ``u_K``, fitted to ``T(K) u_0`` over the training set: the maths, no files.

IHDM's prior is the training set pushed through ``T(K)``, a mixture of ``N`` Gaussians: sampling
needs the data set, and its prior term rewards memorisation (a process whose ``T(K)`` is invertible
scores its training images). The alternative here is one Gaussian ``N(mu, Sigma + delta^2 I)`` with
``mu`` and ``Sigma`` the mean and covariance of ``T(K) u_0`` over the training set: once fitted it
is a few tensors, so sampling needs no data, and the prior term has a closed form.

The fit is one streaming pass in float64 (:func:`fit_gaussian`), with the data shifted by its first
batch's mean so that the sums do not cancel. Two forms, one representation (:class:`GaussianFit`),
``Sigma = V diag(lambda) V^T + rho (I - V V^T)``:

* dense: the sum of outer products, ``d x d``, then every eigenpair (``V`` square, ``rho = 0``);
* low rank, where ``d^2`` float64s do not fit the memory budget: probabilistic PCA's form, the top
  ``r`` eigenpairs plus one variance ``rho`` for the remaining ``d - r`` directions (the maximum
  likelihood choice of ``rho`` given them: the mean of the other eigenvalues, i.e. the leftover
  trace over ``d - r``). The pass keeps ``Sigma Omega`` for a fixed random orthonormal ``Omega``
  with ``r + 10`` columns, and the eigenpairs come from the stabilised Nystrom approximation
  ``(Sigma Omega)(Omega^T Sigma Omega)^+ (Sigma Omega)^T`` (Tropp et al., "Fixed-rank approximation
  of a positive-semidefinite matrix from streaming data", 2017, Alg. 3): one pass, and exact when
  ``Omega`` is square (``r = d``), so the two forms agree there. The trace is kept exactly.

Everything the prior is used for follows from the eigen-structure, with no ``d x d`` matrix:
:func:`kl_to_prior` (the ELBO's prior term), :func:`sample_prior`, :func:`limit_summary`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lintrans.datasets import in_batches

if TYPE_CHECKING:
    from lintrans.forward import ForwardProcess

# Extra sketch columns beyond the rank kept: the Nystrom approximation's top-r eigenpairs are
# accurate when the sketch is a little wider than r (Halko, Martinsson & Tropp's usual 5-10).
OVERSAMPLE = 10
# Seeds of the fit's own randomness, fixed so that a run's prior is a function of its config and data.
THETA_SEED = 20240
SKETCH_SEED = 20241
FLOAT64 = 8  # bytes


@dataclass(frozen=True)
class GaussianFit:
    """``N(mean, Sigma)`` with ``Sigma = basis diag(eigvals) basis^T + residual (I - basis basis^T)`` (float64).

    ``basis`` is ``(d, r)`` with orthonormal columns, ``eigvals`` ``(r,)`` descending and ``>= 0``;
    dense fits have ``r = d`` and ``residual = 0``. ``count`` images were fitted.
    """

    mean: Tensor
    basis: Tensor
    eigvals: Tensor
    residual: float
    count: int

    @property
    def dim(self) -> int:
        return len(self.mean)

    @property
    def rank(self) -> int:
        return len(self.eigvals)

    def to(self, device: torch.device | str) -> GaussianFit:
        return GaussianFit(self.mean.to(device), self.basis.to(device), self.eigvals.to(device), self.residual,
                           self.count)  # fmt: skip

    def covariance(self) -> Tensor:
        """The dense ``d x d`` ``Sigma``: for tests and small images only."""
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.mean.device)
        V = self.basis
        return (V * self.eigvals) @ V.T + self.residual * (eye - V @ V.T)

    def spectrum(self) -> Tensor:
        """All ``d`` eigenvalues of ``Sigma``, descending (``residual`` repeated ``d - r`` times)."""
        rest = torch.full((self.dim - self.rank,), self.residual, dtype=torch.float64, device=self.mean.device)
        return torch.cat([self.eigvals, rest]).sort(descending=True).values

    def state(self) -> dict:
        """Plain tensors and numbers (``torch.load(weights_only=True)`` reads them back)."""
        return {"mean": self.mean.cpu(), "basis": self.basis.cpu(), "eigvals": self.eigvals.cpu(),
                "residual": float(self.residual), "count": int(self.count)}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict) -> GaussianFit:
        return cls(state["mean"], state["basis"], state["eigvals"], float(state["residual"]), int(state["count"]))


# --------------------------------------------------------------------------- the fit


def dense_fits(dim: int, max_bytes: int) -> bool:
    """Whether the ``d x d`` float64 sum of outer products fits ``max_bytes`` (else: the low-rank form)."""
    return FLOAT64 * dim * dim <= max_bytes


def fit_gaussian(batches: Iterable[Tensor], dim: int, rank: int | None = None) -> GaussianFit:
    """Mean and covariance (divided by the count: the maximum-likelihood fit) of rows ``(B, d)``, one pass.

    ``rank=None``: the dense fit. ``rank=r``: the top-``r`` eigenpairs of a Nystrom sketch with
    ``min(d, r + OVERSAMPLE)`` columns and the isotropic remainder (see the module docstring);
    memory ``d (r + OVERSAMPLE)`` float64s instead of ``d^2``.
    """
    width = dim if rank is None else min(dim, rank + OVERSAMPLE)
    omega = None
    if rank is not None:
        gen = torch.Generator().manual_seed(SKETCH_SEED)
        omega = torch.linalg.qr(torch.randn(dim, width, generator=gen, dtype=torch.float64)).Q
    shift, count, total, trace_sum, products = None, 0, None, 0.0, None
    for batch in batches:
        x = batch.reshape(len(batch), dim).double()
        if shift is None:
            shift = x.mean(0)
            omega = None if omega is None else omega.to(x.device)
            total = torch.zeros(dim, dtype=torch.float64, device=x.device)
            products = torch.zeros(dim, width, dtype=torch.float64, device=x.device)
        y = x - shift
        count += len(y)
        total += y.sum(0)
        trace_sum += y.pow(2).sum().item()
        products += y.T @ (y if omega is None else y @ omega)
    if shift is None:
        raise ValueError("fit_gaussian needs at least one image")
    centre = total / count
    mean = shift + centre
    # Covariance (times Omega) from the shifted sums: E[y y^T] - E[y] E[y]^T.
    cov_omega = products / count - torch.outer(centre, centre if omega is None else centre @ omega)
    trace = trace_sum / count - centre.pow(2).sum().item()
    if omega is None:
        eigvals, basis = torch.linalg.eigh((cov_omega + cov_omega.T) / 2)
        eigvals, basis = eigvals.flip(0).clamp_min(0.0), basis.flip(1)
        return GaussianFit(mean, basis, eigvals, 0.0, count)
    eigvals, basis = nystrom(cov_omega, omega)
    eigvals, basis = eigvals[:rank], basis[:, :rank]
    rest = dim - len(eigvals)
    residual = max(trace - eigvals.sum().item(), 0.0) / rest if rest else 0.0
    return GaussianFit(mean, basis, eigvals, residual, count)


def nystrom(sketch: Tensor, omega: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs (descending) of the Nystrom approximation of a PSD ``A`` from ``sketch = A Omega``.

    Tropp et al.'s stabilised form: shift by a tiny ``nu`` so that the small core matrix
    ``Omega^T A Omega`` is safely positive definite, factor it once, and remove the shift from the
    eigenvalues.
    """
    norm = torch.linalg.matrix_norm(sketch).item()
    if norm == 0.0:  # A Omega = 0, so the approximation is 0 (T(K) = 0 gives exactly this)
        return torch.zeros(omega.shape[1], dtype=torch.float64, device=omega.device), omega
    nu = torch.finfo(torch.float64).eps * math.sqrt(sketch.shape[0]) * norm
    shifted = sketch + nu * omega
    core = omega.T @ shifted
    chol = torch.linalg.cholesky((core + core.T) / 2, upper=True)
    factor = torch.linalg.solve_triangular(chol, shifted, upper=True, left=False)
    basis, singular, _ = torch.linalg.svd(factor, full_matrices=False)
    return (singular.pow(2) - nu).clamp_min(0.0), basis


def pushed_limit(process: ForwardProcess, images: Iterable[Tensor], device: torch.device) -> Iterator[Tensor]:
    """``T(K) x`` in float64 for each batch of training images.

    A stochastic process draws ``theta`` per image from a fixed seed: the fit is the marginal over
    ``theta``, one Gaussian for all of them. The generative model draws ``theta`` independently of
    ``u_K`` (the sampler does exactly that), so its prior must be one density of ``u_K`` alone, and
    the best Gaussian for it is the one fitted to ``T_theta(K) u_0`` over ``theta`` and ``u_0``
    together; per-``theta`` fits would need ``theta`` before ``u_K``, a different model.
    """
    gen = torch.Generator().manual_seed(THETA_SEED)
    for x in images:
        theta = process.sample_theta(len(x), gen)
        theta = None if theta is None else theta.to(device)
        x = x.to(device=device, dtype=torch.float64)
        yield process(x, process.levels(process.K, len(x), device), theta)


def fit_limit(
    process: ForwardProcess, train_set, *, max_bytes: int, rank: int, device: torch.device, batch_size: int = 256
) -> GaussianFit:
    """The Gaussian of ``T(K) u_0`` over every image of ``train_set`` (a data set with ``batch(idx)``).

    Dense where ``d^2`` float64s fit ``max_bytes`` (``config.model.max_dense_bytes``), else the
    top-``rank`` form (``config.sampling.prior_rank``).
    """
    images, dim = in_batches(train_set, batch_size), process.dim
    return fit_gaussian(pushed_limit(process, images, device), dim, None if dense_fits(dim, max_bytes) else rank)


# --------------------------------------------------------------------------- using it


def _prior_variances(fit: GaussianFit, delta: float) -> tuple[Tensor, float, int]:
    """Eigenvalues of ``Sigma + delta^2 I``: the top ``r``, the remainder's, and how many share it."""
    return fit.eigvals + delta**2, fit.residual + delta**2, fit.dim - fit.rank


def kl_to_prior(fit: GaussianFit, means: Tensor, sigma: float, delta: float) -> Tensor:
    """``KL(N(m, sigma^2 I) || N(mu, Sigma + delta^2 I))`` per row ``m`` of ``means`` ``(B, ...)``, float64 ``(B,)``.

    ``1/2 [sigma^2 tr P^-1 + (m - mu)^T P^-1 (m - mu) - d + log det P - d log sigma^2]`` with
    ``P = Sigma + delta^2 I``, evaluated in ``P``'s eigenbasis. ``Sigma = 0`` (``T(K) = 0``) gives
    ``c``, the constant of every other level, as the mixture prior does there.
    """
    top, rest, rest_dim = _prior_variances(fit, delta)
    a = means.flatten(1).double() - fit.mean
    proj = a @ fit.basis
    mahalanobis = (proj.pow(2) / top).sum(1)
    if rest_dim:
        mahalanobis = mahalanobis + (a.pow(2).sum(1) - proj.pow(2).sum(1)).clamp_min(0.0) / rest
    trace = sigma**2 * ((1.0 / top).sum() + rest_dim / rest)
    logdet = top.log().sum() + rest_dim * math.log(rest)
    d = fit.dim
    return 0.5 * (trace + mahalanobis - d + logdet - d * math.log(sigma**2))


def sample_prior(fit: GaussianFit, n: int, delta: float, generator: torch.Generator) -> Tensor:
    """``n`` draws ``(n, d)`` from ``N(mu, Sigma + delta^2 I)`` (float64, on the generator's device)."""
    fit = fit.to(generator.device)
    top, rest, rest_dim = _prior_variances(fit, delta)
    draw = torch.randn(n, fit.rank, generator=generator, device=generator.device, dtype=torch.float64)
    out = fit.mean + (draw * top.sqrt()) @ fit.basis.T
    if rest_dim:  # the remaining directions: an independent draw projected off the basis
        z = torch.randn(n, fit.dim, generator=generator, device=generator.device, dtype=torch.float64)
        out = out + math.sqrt(rest) * (z - (z @ fit.basis) @ fit.basis.T)
    return out


def limit_summary(fit: GaussianFit, delta: float) -> dict[str, float | int]:
    """What ``T(K)`` leaves of the data, from the fit of ``Cov(T(K) u_0)``.

    ``limit_rank_99``: eigenvalues holding 99 % of the trace (0 when ``T(K) u_0`` is constant);
    ``limit_rank_above_noise``: eigenvalues above ``delta^2``, the directions the sampling noise does
    not drown; ``limit_entropy_bpd``: the entropy of the prior ``N(mu, Sigma + delta^2 I)`` in bits
    per dimension (``Sigma`` alone is singular whenever ``T(K)`` is).
    """
    spectrum = fit.spectrum()
    total = spectrum.sum().item()
    rank_99 = int((spectrum.cumsum(0) < 0.99 * total).sum().item()) + 1 if total > 0 else 0
    d = fit.dim
    entropy_nats = 0.5 * (d * math.log(2 * math.pi * math.e) + (spectrum + delta**2).log().sum().item())
    return {
        "limit_rank_99": min(rank_99, d),
        "limit_rank_above_noise": int((spectrum > delta**2).sum().item()),
        "limit_entropy_bpd": entropy_nats / (d * math.log(2.0)),
        "limit_fit_rank": fit.rank,
    }
