"""``pca_heat``: heat in the principal-component basis of the training set, fitted once and stored with the run."""

from __future__ import annotations

import math

import pytest
import torch

from lintrans import datasets
from lintrans.config import forward_args
from lintrans.forward import create_forward
from lintrans.run import FORWARD_STATE, Run, load_model
from tests import conftest
from tests.configs import tiny

SHAPES = [(1, 6, 6), (3, 4, 4)]


def images(n: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """Images around a mean of 0.5 with a few strong directions: distinct principal components."""
    gen = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    directions = torch.randn(4, d, generator=gen, dtype=torch.float64)
    weights = torch.randn(n, 4, generator=gen, dtype=torch.float64) * torch.tensor([0.3, 0.2, 0.1, 0.05])
    noise = 0.01 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return (0.5 + weights @ directions / math.sqrt(d) + noise).view(n, *shape)


def fitted(shape: tuple[int, int, int], K: int = 7, blur_sigma_max: float = 4.0):
    p = conftest.make_process("pca_heat", shape, K, blur_sigma_max=blur_sigma_max)
    p.fit_data(images(400, shape).split(64))
    return p


@pytest.mark.parametrize("shape", SHAPES)
def test_unfitted_pca_heat_is_heat(shape):
    """Before the fit the basis is the DCT's, ordered by frequency: the rates then are heat's."""
    pca, heat = conftest.make_process("pca_heat", shape), conftest.make_process("heat", shape)
    for k in range(pca.K + 1):
        torch.testing.assert_close(pca.matrix(k), heat.matrix(k), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_fitted_matrix_matches_the_batched_path_and_pair(shape):
    p = fitted(shape)
    d = p.dim
    torch.testing.assert_close(p.basis.double().T @ p.basis.double(), torch.eye(d, dtype=torch.float64), atol=1e-5,
                               rtol=0)  # fmt: skip
    x = torch.randn(5, *shape)
    k = torch.tensor([0, 1, 3, 6, 7])
    y = p(x, k)
    for i, level in enumerate(k.tolist()):
        expected = p.matrix(level) @ x[i].double().reshape(-1)
        torch.testing.assert_close(y[i].double().reshape(-1), expected, atol=1e-5, rtol=0)
    now, previous = p.pair(x[1:], k[1:])
    torch.testing.assert_close(now, p(x[1:], k[1:]), atol=1e-6, rtol=0)
    torch.testing.assert_close(previous, p(x[1:], k[1:] - 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(p.matrix(0), torch.eye(d, dtype=torch.float64), atol=1e-5, rtol=0)
    assert not torch.allclose(p.matrix(3), conftest.make_process("heat", shape).matrix(3), atol=1e-2)


def test_components_are_ranked_by_second_moment_and_the_limit_keeps_the_first():
    """Most energy first; the first component (rate 0, never damped) is the mean image's direction."""
    shape = (1, 6, 6)
    p = fitted(shape, K=5, blur_sigma_max=40.0)  # s_K so wide that every nonzero rate is damped to ~0
    x = images(400, shape).flatten(1)
    energy = ((x @ p.basis.double()) ** 2).mean(0)
    assert (energy[:-1] >= energy[1:] - 1e-9).all()
    first = p.basis[:, 0].double()
    mean = x.mean(0)
    assert abs(first @ mean / mean.norm()) > 0.99
    torch.testing.assert_close(p.matrix(p.K), torch.outer(first, first), atol=1e-6, rtol=0)


def test_a_run_fits_the_basis_once_stores_it_and_loads_it(tmp_path):
    workdir = tmp_path / "run"
    forward = "--config.model.forward=pca_heat"
    result = conftest.run(conftest.train_args(workdir, forward, "--config.training.n_iters=2"))
    assert result.returncode == 0, result.stderr
    stored = workdir / FORWARD_STATE
    written = stored.stat().st_mtime_ns

    config = tiny.get_config()
    config.model.forward = "pca_heat"
    expected = create_forward(**forward_args(config))
    expected.fit_data(datasets.in_batches(datasets.load(config)[0], 256))
    loaded = load_model(workdir).process
    torch.testing.assert_close(loaded.basis, expected.basis, atol=1e-6, rtol=0)  # the training images' components
    assert loaded.matrix(3).sub(create_forward(**forward_args(config)).matrix(3)).abs().max() > 1e-2  # not heat

    again = conftest.run(conftest.train_args(workdir, forward, "--config.training.n_iters=3"))  # resume: no refit
    assert again.returncode == 0, again.stderr
    assert stored.stat().st_mtime_ns == written
    sampled = conftest.run(["sample.py", f"--workdir={workdir}", "--batch_size=2", f"--outdir={tmp_path / 'out'}"])
    assert sampled.returncode == 0, sampled.stderr

    stored.unlink()
    refused = conftest.run(["sample.py", f"--workdir={workdir}", "--batch_size=2", f"--outdir={tmp_path / 'out'}"])
    conftest.assert_usage_error(refused, "was fitted to the data")
    assert Run(workdir).load_forward_state() is None
