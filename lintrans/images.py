"""Pictures people look at: sample grids (PNG) and reverse-process animations (GIF)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from torch import Tensor

from lintrans.atomic import write_atomic


def grid(images: Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """``(B, C, H, W)`` in ``[0, 1]`` to one ``uint8`` ``(H', W', C)`` picture."""
    import torchvision

    nrow = nrow or math.ceil(math.sqrt(len(images)))
    g = torchvision.utils.make_grid(images.float().clamp(0, 1), nrow=nrow, padding=pad, pad_value=1.0)
    return (g.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_grid(path: str | Path, images: Tensor, nrow: int | None = None) -> Path:
    img = _pil(grid(images, nrow))
    return write_atomic(path, lambda f: img.save(f, format="PNG"))


def save_gif(path: str | Path, frames: list[Tensor], nrow: int | None = None, ms: int = 80) -> Path:
    """Animate grids of the reverse process; the last frame is held for a second."""
    pics = [_pil(grid(f, nrow)) for f in frames]
    durations = [ms] * (len(pics) - 1) + [1000]
    buf = io.BytesIO()
    pics[0].save(buf, format="GIF", save_all=True, append_images=pics[1:], duration=durations, loop=0)
    return write_atomic(path, lambda f: f.write(buf.getvalue()))
