"""The feature cache: a warm cache gives the cold figures without computing them; bad files are replaced."""

from __future__ import annotations

import os

import pytest
import torch

from lintrans import datasets, feature_cache, fid
from lintrans.evaluation import MEMORISATION_CHUNK, memorisation_key, run_memorisation

DEVICE = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(feature_cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "features"


@pytest.fixture(scope="module")
def digits() -> tuple[datasets.TensorImages, torch.Tensor]:
    train, test = datasets.mnist5k()
    return datasets.TensorImages(train[::2]), test[:40]  # 2,250 training digits (two chunks), 40 held-out ones


def memorise(digits, monkeypatch, batch_size: int = 64) -> tuple[dict, int]:
    """The memorisation figures, and how many images went through the feature extractor."""
    train, samples = digits
    seen = []
    original = fid.features

    def counting(images, *args, **kwargs):
        seen.append(len(images))
        return original(images, *args, **kwargs)

    monkeypatch.setattr(fid, "features", counting)
    metrics, breakdown = run_memorisation(samples, train, "fid_mnist_features", "clean", batch_size, DEVICE)
    return {**metrics, **{f"feature_{k}": v for k, v in breakdown["feature"].items()}}, sum(seen)


def key_of(train, batch_size: int = 64, mode: str = "clean") -> dict:
    return memorisation_key(train, "fid_mnist_features", mode, batch_size, DEVICE)


def test_a_warm_cache_gives_the_cold_figures_without_computing_the_training_features(cache, digits, monkeypatch,
                                                                                      capsys):  # fmt: skip
    train, _ = digits
    cold, extracted = memorise(digits, monkeypatch)
    assert extracted == 40 + 2250 and "written to" in capsys.readouterr().out
    # The file holds the extractor's features of the training digits, chunk by chunk as the comparison reads them.
    extractor, resize = fid.extractor_for("fid_mnist_features", "clean", DEVICE)
    want = torch.cat([fid.features(x, extractor, resize, "clean", 64, DEVICE)
                      for x in datasets.in_batches(train, MEMORISATION_CHUNK)])  # fmt: skip
    assert torch.equal(feature_cache.read(key_of(train), 2250), want)
    warm, extracted = memorise(digits, monkeypatch)
    assert extracted == 40 and "read from" in capsys.readouterr().out  # only the samples
    assert warm == cold


def test_what_the_features_depend_on_names_another_file(cache, digits, monkeypatch):
    train, samples = digits
    shifted = train.images.clone()
    shifted[0, 0, 0, 0] ^= 1  # one grey level of one pixel
    keys = [key_of(train), key_of(datasets.TensorImages(train.images[1:])), key_of(datasets.TensorImages(shifted)),
            key_of(train, batch_size=32), key_of(train, mode="legacy_tensorflow")]  # fmt: skip
    assert len({feature_cache.path_for(k) for k in keys}) == 5
    assert keys[0]["device"].startswith("cpu: ") and {"torch", "clean-fid", "Pillow"} <= keys[0]["versions"].keys()
    assert set(keys[0]["code"]) == {"lintrans.fid", "lintrans.datasets"}
    memorise(digits, monkeypatch)
    memorise((datasets.TensorImages(shifted), samples), monkeypatch)
    assert len(list(cache.iterdir())) == 2


@pytest.mark.parametrize("damage", ["truncated", "another key", "a row missing"])
def test_an_unusable_file_is_computed_again_and_replaced(cache, digits, monkeypatch, damage):
    cold, _ = memorise(digits, monkeypatch)
    [file] = cache.iterdir()
    saved = torch.load(file, weights_only=True)
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[:1000])
    elif damage == "another key":
        torch.save({"key": saved["key"].replace("clean", "legacy_tensorflow"), "features": saved["features"]}, file)
    else:
        torch.save({"key": saved["key"], "features": saved["features"][:-1]}, file)
    with pytest.warns(UserWarning, match=f"feature cache {file} is unusable"):
        again, extracted = memorise(digits, monkeypatch)
    assert again == cold and extracted == 40 + 2250
    assert torch.equal(torch.load(file, weights_only=True)["features"], saved["features"])  # replaced, whole
    assert memorise(digits, monkeypatch)[1] == 40


def test_a_file_another_process_finished_first_is_kept(cache, digits):
    train, _ = digits
    key = key_of(train)
    first = feature_cache.write(key, torch.ones(2250, 64))
    stamp = first.stat().st_mtime_ns
    assert feature_cache.write(key, torch.zeros(2250, 64)) == first and first.stat().st_mtime_ns == stamp
    assert torch.equal(feature_cache.read(key, 2250), torch.ones(2250, 64))


@pytest.mark.parametrize("failure", ["a file where the folder goes", "the write fails"])
def test_an_unwritable_cache_warns_and_the_evaluation_goes_on(tmp_path, digits, monkeypatch, capsys, failure):
    if failure == "a file where the folder goes":  # refused to root as well
        blocker = tmp_path / "not-a-folder"
        blocker.write_text("")
        monkeypatch.setenv(feature_cache.CACHE_ENV, str(blocker))
    else:  # as torch.save reports an I/O error: a RuntimeError
        monkeypatch.setenv(feature_cache.CACHE_ENV, str(tmp_path / "cache"))
        monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("write failed")))
    with pytest.warns(UserWarning) as said:
        figures, extracted = memorise(digits, monkeypatch)
    file = feature_cache.path_for(key_of(digits[0]))
    assert [str(w.message).split(" (")[0] for w in said] == [f"cannot write the feature cache {file}"]  # only that
    assert 0 <= figures["memorised_fraction"] <= 1 and extracted == 40 + 2250
    assert "computed, not kept in" in capsys.readouterr().out


def test_a_folder_data_sets_fingerprint_follows_its_files(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("L", (8, 8), color=10 * i).save(tmp_path / f"{i}.png")
    first = datasets.FolderImages(tmp_path, 8, 1).fingerprint()
    assert datasets.FolderImages(tmp_path, 8, 1).fingerprint() == first
    assert datasets.FolderImages(tmp_path, 4, 1).fingerprint() != first  # another crop
    assert datasets.FolderImages(tmp_path, 8, 3).fingerprint() != first  # colour
    os.utime(tmp_path / "1.png", ns=(1, 1))  # touched: its modification time moves
    assert datasets.FolderImages(tmp_path, 8, 1).fingerprint() != first
