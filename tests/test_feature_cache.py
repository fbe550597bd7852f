"""The feature cache: a warm cache gives the cold figures without computing them; bad files are replaced."""

from __future__ import annotations

import os

import pytest
import torch

from lintrans import datasets, feature_cache, fid
from lintrans.evaluation import run_memorisation

DEVICE = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(feature_cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "features"


@pytest.fixture(scope="module")
def digits() -> tuple[datasets.TensorImages, torch.Tensor]:
    train, test = datasets.mnist5k()
    return datasets.TensorImages(train[::5]), test[:40]  # 900 training digits, 40 held-out ones as samples


def memorise(digits, monkeypatch) -> tuple[dict, int]:
    """The memorisation figures, and how many images went through the feature extractor."""
    train, samples = digits
    seen = []
    original = fid.features

    def counting(images, *args, **kwargs):
        seen.append(len(images))
        return original(images, *args, **kwargs)

    monkeypatch.setattr(fid, "features", counting)
    metrics, breakdown = run_memorisation(samples, train, "fid_mnist_features", "clean", 64, DEVICE)
    return {**metrics, **{f"feature_{k}": v for k, v in breakdown["feature"].items()}}, sum(seen)


def test_a_warm_cache_gives_the_cold_figures_without_computing_the_training_features(cache, digits, monkeypatch,
                                                                                      capsys):  # fmt: skip
    cold, extracted = memorise(digits, monkeypatch)
    assert extracted == 40 + 900 and "written to" in capsys.readouterr().out
    assert len(list(cache.iterdir())) == 1
    warm, extracted = memorise(digits, monkeypatch)
    assert extracted == 40 and "read from" in capsys.readouterr().out  # only the samples
    assert warm == cold  # bit for bit: the file holds what the computation gave


def test_other_images_or_sizes_get_their_own_file(cache, digits, monkeypatch):
    train, samples = digits
    memorise(digits, monkeypatch)
    memorise((datasets.TensorImages(train.images[1:]), samples), monkeypatch)  # one digit fewer
    shifted = train.images.clone()
    shifted[0, 0, 0, 0] ^= 1  # one grey level of one pixel
    memorise((datasets.TensorImages(shifted), samples), monkeypatch)
    run_memorisation(samples, train, "fid_mnist_features", "clean", 32, DEVICE)  # another batch size
    assert len(list(cache.iterdir())) == 4


@pytest.mark.parametrize("damage", ["truncated", "other rows"])
def test_an_unusable_file_is_computed_again_and_replaced(cache, digits, monkeypatch, damage):
    cold, _ = memorise(digits, monkeypatch)
    [file] = cache.iterdir()
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[:1000])
    else:
        saved = torch.load(file, weights_only=True)
        torch.save({"key": saved["key"], "features": saved["features"][:-1]}, file)
    with pytest.warns(UserWarning, match=f"feature cache {file} is unusable"):
        again, extracted = memorise(digits, monkeypatch)
    assert again == cold and extracted == 940
    assert len(torch.load(file, weights_only=True)["features"]) == 900  # replaced by a whole file
    assert memorise(digits, monkeypatch)[1] == 40


def test_an_unwritable_cache_warns_and_the_evaluation_goes_on(tmp_path, digits, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the cache folder would be inside a file: refused to root as well
    monkeypatch.setenv(feature_cache.CACHE_ENV, str(blocker))
    with pytest.warns(UserWarning, match=f"cannot write the feature cache .*set {feature_cache.CACHE_ENV}"):
        figures, extracted = memorise(digits, monkeypatch)
    assert 0 <= figures["memorised_fraction"] <= 1 and extracted == 940


def test_a_folder_data_sets_fingerprint_follows_its_files(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("L", (8, 8), color=10 * i).save(tmp_path / f"{i}.png")
    first = datasets.FolderImages(tmp_path, 8, 1).fingerprint()
    assert datasets.FolderImages(tmp_path, 8, 1).fingerprint() == first
    assert datasets.FolderImages(tmp_path, 4, 1).fingerprint() != first  # another crop
    Image.new("L", (8, 8), color=255).save(tmp_path / "1.png")
    os.utime(tmp_path / "1.png", ns=(1, 1))  # rewritten: its modification time moves
    assert datasets.FolderImages(tmp_path, 8, 1).fingerprint() != first
