"""The Gaussian prior (``sampling.prior=gaussian``): its fit, KL and draws, the bound it gives, and data-free sampling.

The analytic toys of ``tests/test_elbo.py`` run for both priors there; here are the cases where the
Gaussian prior's answer is known exactly: a toy on which the whole bound is tight, ``T(K) = 0``
(both priors are then ``N(0, delta^2 I)``), and the low-rank form against the dense one.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor
from torch.distributions import MultivariateNormal, kl_divergence

from lintrans import config as cfg
from lintrans import datasets, records
from lintrans.elbo import gaussian_kl_constant, negative_elbo
from lintrans.errors import UsageError
from lintrans.eval_spec import EvalSpec
from lintrans.forward import ScalarProcess, create_forward
from lintrans.gaussian_prior import (
    GaussianFit,
    fit_gaussian,
    fit_limit,
    kl_to_prior,
    limit_summary,
    pushed_limit,
    sample_prior,
)
from lintrans.run import PRIOR, Run
from tests import conftest
from tests.configs import tiny
from tests.test_elbo import OptimalReverse

CPU = torch.device("cpu")


def correlated_rows(n: int, d: int, seed: int, offset: float = 100.0) -> Tensor:
    """Rows with a spread-out spectrum, far from the origin (the fit's sums must not cancel)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=gen, dtype=torch.float64) * torch.logspace(0, -3, d, dtype=torch.float64)
    return offset + torch.randn(n, d, generator=gen, dtype=torch.float64) @ A.T


def test_dense_fit_is_the_sample_mean_and_covariance():
    x = correlated_rows(300, 10, seed=0)
    fit = fit_gaussian(x.split(41), 10)  # batches of uneven size, streamed
    assert fit.count == 300 and fit.rank == 10 and fit.residual == 0.0
    torch.testing.assert_close(fit.mean, x.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(fit.covariance(), torch.cov(x.T, correction=0), rtol=1e-9, atol=1e-12)


def test_low_rank_fit_equals_the_dense_fit_when_the_rank_is_d():
    x = correlated_rows(300, 10, seed=1)
    dense, low = fit_gaussian(x.split(41), 10), fit_gaussian(x.split(41), 10, rank=10)
    assert low.rank == 10 and low.residual == 0.0
    torch.testing.assert_close(low.mean, dense.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(low.eigvals, dense.eigvals, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(low.covariance(), dense.covariance(), rtol=1e-8, atol=1e-12)


def test_low_rank_fit_keeps_the_top_eigenpairs_and_the_rest_of_the_trace():
    """One pass cannot give the top eigenvalues exactly: Nystrom's are below them (its approximation is
    below the covariance), by at most about the trace of what it leaves out (Tropp et al. 2017)."""
    d, r = 40, 6
    gen = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q
    scales = torch.cat([torch.tensor([9.0, 7.0, 5.0, 4.0, 3.0, 2.0]), torch.full((d - r,), 0.1)]).double()
    x = 1.0 + (torch.randn(4000, d, generator=gen, dtype=torch.float64) * scales) @ basis.T
    dense, low = fit_gaussian(x.split(500), d), fit_gaussian(x.split(500), d, rank=r)
    assert low.rank == r
    missed = dense.eigvals[:r] - low.eigvals
    tail = dense.eigvals[r:].sum().item()
    assert missed.min() >= -1e-9 and missed.max() <= tail, (missed, tail)
    assert low.spectrum().sum().item() == pytest.approx(dense.eigvals.sum().item(), rel=1e-12)  # trace kept
    assert low.residual == pytest.approx((tail + missed.sum().item()) / (d - r), rel=1e-9)  # the rest, spread evenly
    top = dense.basis[:, :r]
    torch.testing.assert_close(low.basis @ low.basis.T, top @ top.T, rtol=0, atol=0.02)  # the same subspace


@pytest.mark.parametrize("rank", [None, 4])
def test_kl_and_draws_match_the_dense_gaussian(rank):
    """The eigenbasis formulas against ``torch.distributions`` on ``Sigma + delta^2 I`` built densely."""
    d, sigma, delta = 12, 0.05, 0.3
    fit = fit_gaussian(correlated_rows(500, d, seed=3, offset=1.0).split(100), d, rank=rank)
    eye = torch.eye(d, dtype=torch.float64)
    prior = MultivariateNormal(fit.mean, fit.covariance() + delta**2 * eye)
    means = fit.mean + torch.randn(7, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected = kl_divergence(MultivariateNormal(means, sigma**2 * eye), prior)
    torch.testing.assert_close(kl_to_prior(fit, means.view(7, 3, 2, 2), sigma, delta), expected, rtol=1e-9, atol=0)
    draws = sample_prior(fit, 200_000, delta, torch.Generator().manual_seed(5))
    torch.testing.assert_close(draws.mean(0), fit.mean, rtol=0, atol=0.02)
    torch.testing.assert_close(torch.cov(draws.T), prior.covariance_matrix, rtol=0, atol=0.03)


def test_limit_summary_counts_the_spectrum_and_the_entropy_of_the_prior():
    d, delta = 5, 0.1
    eigvals = torch.tensor([10.0, 1.0, 0.001, 0.0, 0.0], dtype=torch.float64)
    fit = GaussianFit(torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64), eigvals, 0.0, 1)
    out = limit_summary(fit, delta)
    assert out["limit_rank_99"] == 2  # 10 + 1 of 11.001 is 99.99 %; 10 alone is 90.9 %
    assert out["limit_rank_above_noise"] == 2  # 0.001 < delta^2 = 0.01
    prior = MultivariateNormal(fit.mean, torch.diag(eigvals + delta**2))
    assert out["limit_entropy_bpd"] == pytest.approx(prior.entropy().item() / (d * math.log(2)), rel=1e-12)
    zero = GaussianFit(fit.mean, fit.basis, torch.zeros(d, dtype=torch.float64), 0.0, 1)
    assert (
        limit_summary(zero, delta)["limit_rank_99"] == 0 and limit_summary(zero, delta)["limit_rank_above_noise"] == 0
    )


# --------------------------------------------------------------------------- the bound


class Fade(ScalarProcess):
    """``T(k) = (1 - k / 2K) I``: at K = 1, ``u_1 = u_0 / 2 + sigma eps``."""

    name = "fade"

    @staticmethod
    def coefficients(k: Tensor, K: int) -> Tensor:
        return 1.0 - k / (2 * K)


class IsotropicData:
    """``N(m, s I)``: what :class:`tests.test_elbo.OptimalReverse` needs (``m``, ``S``), draws and exact NLL."""

    def __init__(self, shape: tuple[int, int, int], variance: float, seed: int = 0) -> None:
        self.shape, self.dim = shape, math.prod(shape)
        self.gen = torch.Generator().manual_seed(seed)
        self.m = 0.5 + 0.1 * torch.randn(self.dim, generator=self.gen, dtype=torch.float64)
        self.S = variance * torch.eye(self.dim, dtype=torch.float64)
        self.dist = MultivariateNormal(self.m, self.S)

    def sample(self, n: int) -> Tensor:
        eps = torch.randn(n, self.dim, generator=self.gen, dtype=torch.float64)
        return (self.m + eps * self.S.diagonal().sqrt()).view(n, *self.shape)

    def nll(self, x: Tensor) -> Tensor:
        return -self.dist.log_prob(x.flatten(1))


def test_bound_with_the_gaussian_prior_is_tight_where_the_model_can_be_exact():
    """A toy on which the ELBO equals the NLL: the Gaussian prior reaches it, the data mixture does not.

    K = 1, ``T(1) = t I`` (t = 1/2), ``sigma = delta`` and ``u_0 ~ N(m, s I)`` with ``s (1 - t^2) = delta^2``
    (variance preserving: ``u_1 ~ N(t m, s I)``). The generative model ``u_1 ~ N(mu, Sigma + delta^2 I)``
    with the fitted ``mu = t m``, ``Sigma = t^2 s I``, then ``u_0 ~ N(t u_1 + (1 - t^2) m, delta^2 I)`` (the optimal
    linear decoder), has marginal ``N(m, s I)`` and posterior ``q(u_1 | u_0) = N(t u_0, delta^2 I)`` exactly, so
    the bound is the exact NLL; what is left is the fit's sampling error (O(d^2 / N) nats) and the
    one-draw noise of the decoder term.
    """
    shape, sigma = (1, 3, 3), 0.05
    delta, t = sigma, 0.5
    data = IsotropicData(shape, delta**2 / (1 - t**2))
    process = Fade(1, shape)
    train, test = data.sample(20_000), data.sample(4000)
    fit = fit_gaussian(pushed_limit(process, train.split(1000), CPU), data.dim)
    model = OptimalReverse(process, data, sigma)
    gaps = {}
    for prior in ("data", "gaussian"):
        out = negative_elbo(model, process, train, test, sigma=sigma, delta=delta, batch_size=1000,
                            generator=torch.Generator().manual_seed(1), progress=False, prior=prior,
                            gaussian=fit)  # fmt: skip
        gaps[prior] = out["nll_nats"] - data.nll(test).mean().item()
    stderr = out["nll_nats_stderr"]
    assert abs(gaps["gaussian"]) <= 4 * stderr + 0.01, (gaps, stderr)
    assert gaps["data"] > 0.5, gaps  # the mixture's kernel estimate in 9 dimensions is far from exact


def test_both_priors_give_c_when_T_K_is_zero():
    """``constant_velocity`` reaches the origin at K: the fit is ``N(0, 0)``, both priors ``N(0, delta^2 I)``.

    A 1000-byte budget makes it the low-rank fit (d = 16), whose sketch is then exactly zero.
    """
    process = conftest.make_process("constant_velocity", (1, 4, 4), K=5)
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (64, 1, 4, 4), generator=gen, dtype=torch.uint8)
    test = torch.rand(30, 1, 4, 4, generator=gen)
    fit = fit_limit(process, datasets.TensorImages(train), max_bytes=1000, rank=3, device=CPU, batch_size=10)
    assert fit.mean.abs().max() == 0 and fit.spectrum().abs().max() == 0
    sigma, delta = 0.01, 0.0125
    out = negative_elbo(lambda u, k, theta: torch.zeros_like(u), process, train.float() / 255, test, sigma=sigma,
                        delta=delta, batch_size=7, progress=False, prior="gaussian", gaussian=fit)  # fmt: skip
    c = gaussian_kl_constant(16, sigma, delta)
    assert out["L_K"] == out["L_K_gaussian"] == pytest.approx(c, rel=1e-9)
    assert out["L_K_data"] == pytest.approx(c, rel=1e-9)
    assert out["prior_gap_nats"] == pytest.approx(0.0, abs=1e-9 * c)


def test_a_stochastic_process_is_fitted_marginally_over_theta():
    """One Gaussian for every theta: the fit of T_theta(K) u_0 with theta drawn per image from a fixed seed."""
    process = conftest.make_process("random_choice", (1, 3, 3), K=2, num_choices=2)
    x = torch.rand(400, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fit = fit_gaussian(pushed_limit(process, x.split(50), CPU), 9)
    assert fit_gaussian(pushed_limit(process, x.split(50), CPU), 9).mean.equal(fit.mean)  # fixed seed
    families = [process(x, process.levels(2, len(x), CPU), torch.full((len(x), 1), float(m))) for m in (0, 1)]
    one = [fit_gaussian([f], 9) for f in families]
    # about half the images from each family: between the two families' means, near their average
    average = (one[0].mean + one[1].mean) / 2
    assert (fit.mean - average).abs().max() < 0.25 * (one[0].mean - one[1].mean).abs().max()


def test_bad_prior_keys_are_refused_with_one_line():
    config = tiny.get_config()
    config.sampling.prior = "mixture"
    with pytest.raises(UsageError, match=r"^unknown config.sampling.prior 'mixture'; valid: data, gaussian$"):
        cfg.validate(config, forward=False)
    config.sampling.prior, config.sampling.prior_rank = "gaussian", 0
    with pytest.raises(UsageError, match=r"^config.sampling.prior_rank must be an integer >= 1, got 0$"):
        cfg.validate(config, forward=False)


# --------------------------------------------------------------------------- a run with a Gaussian prior


def write_digits(folder: Path, n: int) -> None:
    """``n`` random 28 x 28 grey images: a folder data set this test can take away."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny ``sampling.prior=gaussian`` run on a folder of 24 images, 2 steps; ``(workdir, data folder)``."""
    root = tmp_path_factory.mktemp("gaussian_run")
    data, workdir = root / "data", root / "run"
    write_digits(data, 24)
    overrides = ["--config.data.dataset=folder", f"--config.data.path={data}", "--config.sampling.prior=gaussian",
                 "--config.training.n_iters=2"]  # fmt: skip
    result = conftest.run(conftest.train_args(workdir, *overrides), timeout=300)
    assert result.returncode == 0, result.stderr
    return workdir, data


def test_training_stores_the_fit_of_the_limit(gaussian_run):
    workdir, _ = gaussian_run
    run = Run(workdir)
    config = run.config()
    process = create_forward(**cfg.forward_args(config))
    train, _ = datasets.load(config)
    expected = fit_limit(process, train, device=CPU, **cfg.prior_fit_args(config))
    stored = run.load_prior()
    assert stored.count == 24 and stored.rank == 784
    torch.testing.assert_close(stored.mean, expected.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(stored.eigvals, expected.eigvals, rtol=1e-9, atol=1e-15)


def test_sample_needs_no_data_set_with_a_gaussian_prior(gaussian_run, tmp_path):
    workdir, data = gaussian_run
    hidden = tmp_path / "hidden"
    shutil.move(data, hidden)
    data.mkdir()  # the run's data root is now an empty folder
    try:
        with pytest.raises(UsageError, match="no images"):
            datasets.load(Run(workdir).config())
        out = tmp_path / "out"
        result = subprocess.run([sys.executable, "sample.py", f"--workdir={workdir}", "--batch_size=3",
                                 f"--outdir={out}"], cwd=conftest.ROOT, env=conftest.env(), capture_output=True,
                                text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr
        arrays = np.load(out / "samples.npz")
        assert arrays["samples"].shape == arrays["prior"].shape == (3, 1, 28, 28)
        assert np.isfinite(arrays["samples"]).all()
    finally:
        data.rmdir()
        shutil.move(hidden, data)


def test_sample_refuses_a_gaussian_run_without_its_fit(gaussian_run, tmp_path):
    workdir, _ = gaussian_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    (copy / PRIOR).unlink()
    result = conftest.run(["sample.py", f"--workdir={copy}", "--batch_size=2", f"--outdir={tmp_path / 'out'}"])
    conftest.assert_usage_error(result, "config.sampling.prior=gaussian")


def test_elbo_record_says_what_T_K_leaves_of_the_data(gaussian_run, tmp_path, monkeypatch):
    from launchers import table
    from lintrans.evaluation import evaluate

    workdir, _ = gaussian_run
    monkeypatch.setenv(records.RUNS_ENV, str(tmp_path / "runs"))
    spec = EvalSpec(mode="elbo", num_train=20, num_test=4, batch_size=8, experiment_name="limit")
    record = evaluate(workdir, spec)
    b = record["breakdown"]
    assert b["prior"] == "gaussian" and b["L_K"] == b["L_K_gaussian"]
    assert b["prior_gap_nats"] == pytest.approx(b["L_K_data"] - b["L_K_gaussian"])
    assert 1 <= b["limit_rank_99"] <= b["limit_fit_rank"] == 784
    assert 0 <= b["limit_rank_above_noise"] <= 784 and math.isfinite(b["limit_entropy_bpd"])
    row = {"sweep": "s", "trial": "t", "status": "done", "steps": 2, **records.metrics(workdir)}
    limit = {"elbo.limit_rank_99", "elbo.limit_rank_above_noise", "elbo.limit_entropy_bpd", "elbo.prior_gap_nats"}
    assert limit <= set(table.columns([row])) and not limit & set(table.brief([row]))


def test_one_checkpoint_is_evaluated_under_either_prior(trained_tiny, tmp_path, monkeypatch):
    """A data-prior run: FID and the ELBO under the Gaussian prior, fitted at evaluation time, get columns of their
    own beside the run's own prior's, and the records say which prior produced them."""
    from lintrans.evaluation import evaluate

    monkeypatch.setenv(records.RUNS_ENV, str(tmp_path / "runs"))
    fid = {"mode": "fid", "num_gen": 8, "batch_size": 8, "memorisation_samples": 8}
    own = evaluate(trained_tiny, EvalSpec(**fid, param_name="own"), device=CPU)
    other = evaluate(trained_tiny, EvalSpec(**fid, param_name="gaussian", prior="gaussian"), device=CPU)
    assert own["evaluation"]["prior"] == "data" and other["evaluation"]["prior"] == "gaussian"
    assert set(other["metrics"]) == {f"{name}_gaussian_prior" for name in own["metrics"]}
    assert other["metrics"]["fid_mnist_features_gaussian_prior"] != own["metrics"]["fid_mnist_features"]
    elbo = evaluate(trained_tiny, EvalSpec(mode="elbo", num_train=20, num_test=4, prior="gaussian"), device=CPU)
    b = elbo["breakdown"]
    assert b["prior"] == "gaussian" and b["L_K"] == b["L_K_gaussian"]
    assert set(elbo["metrics"]) == {"nll_bpd_gaussian_prior", "nll_nats_gaussian_prior"}
    columns = records.metrics(trained_tiny)
    assert {"fid_mnist_features", "fid_mnist_features_gaussian_prior", "nll_bpd_gaussian_prior"} <= set(columns)
