"""Memorisation figures: chunked nearest-two search against brute force, a copying oracle, real held-out digits."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lintrans import datasets, fid, memorisation
from lintrans.errors import UsageError
from lintrans.eval_spec import EvalSpec
from lintrans.evaluation import run_fid, run_memorisation
from tests.conftest import make_process

DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> tuple[datasets.TensorImages, datasets.TensorImages]:
    """Every third training digit (1,500, 150 per class: the data are class-sorted) and the 500 held out."""
    train, test = datasets.mnist5k()
    return datasets.TensorImages(train[::3]), datasets.TensorImages(test)


def test_streamed_nearest_two_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    queries, reference = torch.randn(50, 3, 4, 4, generator=gen), torch.randn(203, 3, 4, 4, generator=gen)
    found = memorisation.NearestTwo(queries + 100.0)  # a large common offset must not cost precision
    for start in range(0, 203, 37):  # chunks of 37, the last one of 18
        found.update(reference[start : start + 37] + 100.0)
    nearest, second, index = found.distances()
    dist = torch.cdist(queries.flatten(1).double(), reference.flatten(1).double())
    want, want_index = dist.topk(2, dim=1, largest=False)
    torch.testing.assert_close(nearest.double(), want[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(second.double(), want[:, 1], atol=1e-4, rtol=0)
    assert torch.equal(index, want_index[:, 0])


def test_summary_and_too_few_references():
    s = memorisation.summary(torch.tensor([0.0, 1.0, 0.0, 2.0]), torch.tensor([0.0, 2.0, 3.0, 2.5]))
    assert s["memorised_fraction"] == 0.5  # a twice-held exact copy (0 / 0) and 0 / 3
    assert s["nn_distance_mean"] == 0.75 and s["second_nn_distance_mean"] == pytest.approx(1.875)
    found = memorisation.NearestTwo(torch.zeros(2, 4))
    found.update(torch.ones(1, 4))
    with pytest.raises(UsageError, match="at least 2 training images to compare with, got 1"):
        found.distances()


def test_features_are_the_fids_digit_features(digits):
    """fid.features runs images through clean-fid's generator path: the DigitNet features of the PNG levels."""
    train, _ = digits
    gen = torch.Generator().manual_seed(1)
    images = (train.images[:130].float() / 255 + 0.05 * torch.randn(130, 1, 28, 28, generator=gen)).clamp(0, 1)
    extractor, resize = fid.extractor_for("fid_mnist_features", "clean", DEVICE)
    got = fid.features(images, extractor, resize, "clean", 64, DEVICE)  # 130 = 2 * 64 + 2: a padded last batch
    with torch.no_grad():
        want = fid.load_digit_net().features((images * 255).round() / 255)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class ZeroResidual(nn.Module):
    def forward(self, u: Tensor, k: Tensor, theta: Tensor | None = None) -> Tensor:
        return torch.zeros_like(u)


def test_copying_oracle_is_flagged_in_an_fid_record(digits):
    """Identity process, zero residual, K = 1: each sample is its prior's training image plus N(0, 0.004^2) noise.

    The digit features are far more sensitive to pixel noise than the pixels: with noise of std
    0.022 (K = 3, delta = 0.0125) the pixel test still flags every sample, the feature test none
    (measured: feature ratio median 0.79), so the oracle's noise here is one grey level.
    """
    train, test = digits
    spec = EvalSpec(mode="fid", metric="fid_mnist_features", num_gen=150, batch_size=100, memorisation_samples=120)
    metrics, breakdown = run_fid(ZeroResidual(), make_process("identity", (1, 28, 28), K=1), train, test, spec,
                                 0.004, 28, DEVICE)  # fmt: skip
    print({k: round(v, 4) for k, v in metrics.items()}, breakdown["memorisation"]["feature"])
    assert metrics["memorised_fraction"] >= 0.95
    assert breakdown["memorisation"]["feature"]["memorised_fraction"] >= 0.9  # measured 0.94
    assert breakdown["memorisation"]["samples"] == 120 and breakdown["memorisation"]["train_images"] == 1500
    assert metrics["nn_distance_pixel"] < 0.5 and metrics.keys() >= {"fid_mnist_features", "nn_distance_feature"}


def test_real_held_out_digits_are_not_flagged(digits):
    train, test = digits
    metrics, breakdown = run_memorisation(test.images, train, "fid_mnist_features", "clean", 250, DEVICE)
    print({k: round(v, 4) for k, v in metrics.items()}, breakdown["feature"])
    assert metrics["memorised_fraction"] <= 0.02
    assert breakdown["feature"]["memorised_fraction"] <= 0.05
    assert metrics["nn_distance_pixel"] > 3.0
