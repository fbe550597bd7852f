"""FID through clean-fid, with Inception features or with the project's own digit features.

Two metrics that are never compared with each other, so they carry different names:

* ``fid_inception``: clean-fid's Inception-v3 (``clean`` or ``legacy_tensorflow`` mode) against
  clean-fid's named reference statistics or custom statistics made with ``--save_stats``. The
  weights are a file clean-fid downloads on first use; compute nodes often have no internet, so
  nothing here downloads implicitly: :func:`prefetch_inception` puts the file where clean-fid
  looks (``/tmp``, or ``$LINTRANS_INCEPTION_DIR`` where ``/tmp`` is node-local), and a missing
  file is a :class:`UsageError` naming the file and the command that fetches it.
* ``fid_mnist_features``: the 64-d penultimate layer of :class:`DigitNet`, a small CNN trained by
  ``scripts/train_mnist_features.py`` on the mnist5k training digits (weights in
  ``lintrans/assets``), given to clean-fid as ``custom_feat_extractor``; the reference is the 500
  held-out digits. It measures the same thing offline, on a scale of its own.

Both go through ``cleanfid.fid.compute_fid`` with a generator callable: clean-fid asks for
``ceil(num_gen / batch_size)`` batches of ``batch_size`` images in ``[0, 255]`` and keeps the
first ``num_gen`` feature rows, which :class:`BatchStream` relies on to pad the last batch.
:func:`features` runs any images through the same clean-fid path (resize and extractor of the
metric, :func:`extractor_for`), which the memorisation figures of an FID evaluation use.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lintrans.atomic import write_atomic
from lintrans.errors import UsageError, choices

METRICS = ("fid_inception", "fid_mnist_features")
CLEANFID_MODES = ("clean", "legacy_tensorflow")
ASSETS = Path(__file__).resolve().parent / "assets"
FEATURES_FILE = ASSETS / "mnist5k_features.pt"
FEATURES_INFO = ASSETS / "mnist5k_features.json"
INCEPTION_NAME = "inception-2015-12-05.pt"
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_NAME}"
STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats"
DOWNLOAD_TIMEOUT_S = 30
PREFETCH_HINT = (
    "fetch them with `python evaluate.py --prefetch` (needs internet), "
    f"or copy them there with `python evaluate.py --prefetch --prefetch_from=<a copy of {INCEPTION_NAME}>`"
)
FEATURES_HINT = "recreate them with `python scripts/train_mnist_features.py`"


# --------------------------------------------------------------------------- digit features


class DigitNet(nn.Module):
    """A ~84k-parameter CNN for 28x28 grey digits; ``features`` is its 64-d penultimate layer.

    Global average pooling keeps the weights small (a few hundred KB) and the feature dimension
    well below the 500 reference digits, so the reference covariance has full rank.
    """

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(
            *block(1, 16),
            *block(16, 32),
            nn.MaxPool2d(2),
            *block(32, 48),
            *block(48, 64),
            nn.MaxPool2d(2),
            *block(64, self.feature_dim),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        """``(B, 1, 28, 28)`` in ``[0, 1]`` to ``(B, 64)``."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class CleanFidDigitFeatures(nn.Module):
    """clean-fid's view of :class:`DigitNet`: ``(B, 3, H, W)`` in ``[0, 255]``, any dtype, to features."""

    def __init__(self, net: DigitNet) -> None:
        super().__init__()
        self.net = net.eval()

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x.float().mean(dim=1, keepdim=True) / 255.0)


def features_info() -> dict:
    """Accuracy, seed and checksum stored next to the weights by the training script."""
    return json.loads(FEATURES_INFO.read_text())


def require_file(path: Path, what: str, remedy: str) -> Path:
    """``path``, or a :class:`UsageError` naming it and what creates it."""
    if not path.is_file():
        raise UsageError(f"{what} not found: {path}; {remedy}")
    return path


def load_digit_net(device: torch.device | str = "cpu") -> DigitNet:
    require_file(FEATURES_FILE, "digit feature weights", FEATURES_HINT)
    net = DigitNet()
    net.load_state_dict(torch.load(FEATURES_FILE, map_location="cpu", weights_only=True), strict=True)
    return net.to(device).eval()


def keep_size(image: np.ndarray) -> np.ndarray:
    """clean-fid ``custom_fn_resize``: the digit features see the 28x28 images they were trained on.

    Without it clean-fid's ``clean`` mode would resize every digit to Inception's 299x299.
    """
    return image


# --------------------------------------------------------------------------- image stream


def to_levels(images: Tensor) -> Tensor:
    """``(B, C, H, W)`` in ``[0, 1]`` to the 256 levels a saved PNG has, as floats in ``[0, 255]``."""
    return (images.float().clamp(0, 1) * 255).round()


def to_cleanfid(images: Tensor) -> Tensor:
    """``(B, C, H, W)`` in ``[0, 1]`` to what clean-fid wants from a generator: ``(B, 3, H, W)`` in ``[0, 255]``.

    Values are rounded to the 256 levels a saved PNG has (the reference images are PNGs), and
    grey images are repeated to three channels.
    """
    out = to_levels(images)
    return out.expand(-1, 3, -1, -1) if out.shape[1] == 1 else out


class BatchStream:
    """A clean-fid generator callable over ``produce(n)``, which returns ``n`` images in ``[0, 1]``.

    clean-fid calls it ``ceil(num_gen / batch_size)`` times with a latent it does not need and
    keeps the first ``num_gen`` feature rows; the last batch therefore produces only what is
    missing and is padded (by repetition) to ``batch_size``, which costs no generation. The first
    ``keep`` images are kept on the CPU as the FID saw them (``uint8``, their own channels):
    :meth:`kept`.
    """

    def __init__(
        self, produce: Callable[[int], Tensor], num_gen: int, batch_size: int, desc: str = "", keep: int = 0
    ) -> None:
        from tqdm import tqdm

        self.produce, self.batch_size, self.remaining, self.keep = produce, batch_size, num_gen, keep
        self.kept_batches: list[Tensor] = []
        self.bar = tqdm(total=num_gen, desc=desc, unit="img", dynamic_ncols=True, disable=not desc)

    def kept(self) -> Tensor:
        """The first ``keep`` images produced (fewer if fewer were), ``uint8 (N, C, H, W)``."""
        return torch.cat(self.kept_batches) if self.kept_batches else torch.empty(0, dtype=torch.uint8)

    def __call__(self, latent: Tensor) -> Tensor:
        n = min(self.batch_size, max(self.remaining, 1))
        produced = self.produce(n)
        room = self.keep - sum(len(b) for b in self.kept_batches)
        if room > 0:
            self.kept_batches.append(to_levels(produced[:room]).to(torch.uint8).cpu())
        images = to_cleanfid(produced)
        self.remaining -= n
        self.bar.update(n)
        if self.remaining <= 0:
            self.bar.close()
        if n < self.batch_size:
            images = torch.cat([images, images[-1:].expand(self.batch_size - n, -1, -1, -1)])
        return images


# --------------------------------------------------------------------------- FID computations


def check_fid_args(num_gen: int, batch_size: int, mode: str) -> None:
    if num_gen < 2:
        raise UsageError(f"--num_gen must be at least 2 (FID needs a covariance), got {num_gen}")
    if batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {batch_size}")
    if mode not in CLEANFID_MODES:
        raise UsageError(f"unknown --cleanfid_mode '{mode}'; valid: {choices(CLEANFID_MODES)}")


def save_png_folder(images: Tensor, folder: Path) -> Path:
    """``uint8 (N, C, H, W)`` as numbered PNG files: clean-fid reads reference images from a folder."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:06d}.png")
    return folder


def weights_file(metric: str) -> Path:
    """The file of ``metric``'s extractor weights (what a feature cache checks them by)."""
    if metric == "fid_mnist_features":
        return require_file(FEATURES_FILE, "digit feature weights", FEATURES_HINT)
    if metric == "fid_inception":
        return require_file(inception_file(), "Inception weights", PREFETCH_HINT)
    raise UsageError(f"unknown FID metric '{metric}'; valid: {choices(METRICS)}")


def extractor_for(metric: str, mode: str, device: torch.device) -> tuple[nn.Module, Callable | None]:
    """The feature extractor of ``metric`` and its clean-fid ``custom_fn_resize`` (``None``: clean-fid's own)."""
    weights_file(metric)  # an unknown metric, or missing weights: its one line
    if metric == "fid_mnist_features":
        return CleanFidDigitFeatures(load_digit_net(device)), keep_size
    return inception_extractor(mode, device), None


def features(
    images: Tensor,
    extractor: nn.Module,
    resize: Callable | None,
    mode: str,
    batch_size: int,
    device: torch.device,
) -> Tensor:
    """Features of ``images`` (``(N, C, H, W)`` in ``[0, 1]``) along clean-fid's generator path.

    That is the path the FID's samples take (:class:`BatchStream`, the metric's resize and
    extractor, ``cleanfid.fid.get_model_features``), so these features are the FID's features.
    """
    from cleanfid import fid as cleanfid

    position = 0

    def serve(n: int) -> Tensor:
        nonlocal position
        position += n
        return images[position - n : position]

    stream = BatchStream(serve, len(images), batch_size)
    feats = cleanfid.get_model_features(
        stream, extractor, mode=mode, num_gen=len(images), batch_size=batch_size, device=device, verbose=False,
        custom_fn_resize=resize,
    )  # fmt: skip
    return torch.from_numpy(feats)


def fid_mnist_features(
    gen: BatchStream,
    reference: Tensor,
    num_gen: int,
    batch_size: int,
    device: torch.device,
    mode: str = "clean",
) -> float:
    """FID in digit-feature space of ``num_gen`` images from ``gen`` against ``reference`` (uint8 digits)."""
    from cleanfid import fid as cleanfid

    check_fid_args(num_gen, batch_size, mode)
    extractor, resize = extractor_for("fid_mnist_features", mode, device)
    with tempfile.TemporaryDirectory(prefix="lintrans-fid-ref-") as tmp:
        folder = save_png_folder(reference, Path(tmp) / "reference")
        score = cleanfid.compute_fid(
            gen=gen,
            fdir2=str(folder),
            mode=mode,
            num_gen=num_gen,
            batch_size=batch_size,
            device=device,
            num_workers=0,
            custom_feat_extractor=extractor,
            custom_fn_resize=resize,
            verbose=False,
        )
    return float(score)


def fid_inception(
    gen: BatchStream,
    dataset_name: str,
    resolution: int,
    split: str,
    num_gen: int,
    batch_size: int,
    device: torch.device,
    mode: str = "clean",
) -> float:
    """clean-fid's FID against named (``split`` = train/test/...) or custom (``split`` = custom) statistics."""
    from cleanfid import fid as cleanfid

    check_fid_args(num_gen, batch_size, mode)
    ensure_reference_stats(dataset_name, resolution, mode, split)
    extractor, resize = extractor_for("fid_inception", mode, device)
    score = cleanfid.compute_fid(
        gen=gen,
        dataset_name=dataset_name,
        dataset_res=resolution,
        dataset_split=split,
        mode=mode,
        num_gen=num_gen,
        batch_size=batch_size,
        device=device,
        num_workers=0,
        custom_feat_extractor=extractor,
        custom_fn_resize=resize,
        verbose=False,
    )
    return float(score)


# --------------------------------------------------------------------------- Inception weights


def inception_dir() -> Path:
    """Where clean-fid looks for the Inception weights (``/tmp``; ``./`` on Windows), unless overridden.

    ``LINTRANS_INCEPTION_DIR`` points evaluation and :func:`prefetch_inception` at another folder,
    for clusters whose ``/tmp`` is local to each node.
    """
    default = "./" if platform.system() == "Windows" else "/tmp"
    return Path(os.environ.get("LINTRANS_INCEPTION_DIR") or default)


def inception_file() -> Path:
    return inception_dir() / INCEPTION_NAME


def inception_extractor(mode: str, device: torch.device) -> nn.Module:
    """clean-fid's Inception wrapper loaded from :func:`inception_file`, without its implicit download."""
    from cleanfid.inception_torchscript import InceptionV3W

    path = require_file(inception_file(), "Inception weights", PREFETCH_HINT)
    try:
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice is clean-fid's business
            warnings.simplefilter("ignore", FutureWarning)
            model = InceptionV3W(str(path.parent), download=False, resize_inside=mode == "legacy_tensorflow")
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0].split(". ")[0]
        raise UsageError(f"cannot load Inception weights {path} ({reason}); delete it, then {PREFETCH_HINT}") from None
    return model.to(device).eval()


def _fetch(source: str, dest: Path) -> Path:
    """Copy a local file or download a URL to ``dest`` atomically (a broken download leaves nothing)."""
    if Path(source).is_file():
        with Path(source).open("rb") as src:
            return write_atomic(dest, lambda f: shutil.copyfileobj(src, f))
    try:
        with urllib.request.urlopen(source, timeout=DOWNLOAD_TIMEOUT_S) as response:
            return write_atomic(dest, lambda f: shutil.copyfileobj(response, f))
    except OSError as exc:  # URLError, HTTPError and timeouts are all OSErrors
        raise UsageError(f"cannot fetch {source} to {dest}: {getattr(exc, 'reason', exc)}") from None


def prefetch_inception(source: str | None = None) -> Path:
    """Put the Inception weights where evaluation looks, from ``source`` (a file or URL; default clean-fid's URL)."""
    dest = inception_file()
    _fetch(source or INCEPTION_URL, dest)
    return dest


# --------------------------------------------------------------------------- reference statistics


def stats_folder() -> Path:
    import cleanfid

    return Path(cleanfid.__file__).resolve().parent / "stats"


def stats_file(name: str, resolution: int, mode: str, split: str) -> Path:
    """clean-fid's file name for Inception reference statistics (``features.get_reference_statistics``)."""
    res = "na" if split == "custom" else resolution
    return stats_folder() / f"{name}_{mode}_{split}_{res}.npz".lower()


def ensure_reference_stats(name: str, resolution: int, mode: str, split: str) -> Path:
    """The statistics file clean-fid will read, fetched now (with a timeout) if it is a named one."""
    path = stats_file(name, resolution, mode, split)
    if path.is_file():
        return path
    if split == "custom":
        raise UsageError(
            f"no custom statistics '{name}' for mode {mode}: {path} does not exist; create them with "
            f"evaluate.py --save_stats --custom_name={name} --dataset_path=<image folder> --cleanfid_mode={mode}"
        )
    url = f"{STATS_URL}/{path.name}"
    try:
        return _fetch(url, path)
    except UsageError as exc:
        raise UsageError(
            f"reference statistics for --dataset_name_cleanfid={name} --dataset_split={split} at resolution "
            f"{resolution}, mode {mode} are not available: {exc}"
        ) from None


def save_custom_stats(name: str, folder: str | Path, mode: str, device: torch.device, batch_size: int = 64) -> Path:
    """clean-fid's ``make_custom_stats`` for a folder of images, with the weights from :func:`inception_file`.

    clean-fid 0.1.35's ``make_custom_stats`` builds its own extractor (downloading on first use)
    and accepts no ``custom_feat_extractor``; this computes the features with clean-fid's folder
    code and writes the two files under the names and keys clean-fid reads, atomically.
    """
    from cleanfid import fid as cleanfid

    check_fid_args(2, batch_size, mode)
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--dataset_path {folder} is not a folder of images")
    path = stats_file(name, 0, mode, "custom")
    if path.is_file():
        raise UsageError(f"custom statistics '{name}' for mode {mode} already exist: {path}; delete the file first")
    feats = cleanfid.get_folder_features(
        str(folder),
        inception_extractor(mode, device),
        num_workers=0,
        batch_size=batch_size,
        device=device,
        mode=mode,
        description=f"custom stats {name}",
    )
    if len(feats) < 2:
        raise UsageError(f"--dataset_path {folder} holds {len(feats)} images; statistics need at least 2")
    mu, sigma = np.mean(feats, axis=0), np.cov(feats, rowvar=False)
    kid = path.with_name(path.stem + "_kid.npz")
    write_atomic(kid, lambda f: np.savez_compressed(f, feats=feats))
    return write_atomic(path, lambda f: np.savez_compressed(f, mu=mu, sigma=sigma))
