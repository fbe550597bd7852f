"""Rank 0's voice: progress bar, log lines and TensorBoard; every other rank gets a silent stand-in.

As in DiT, the loop calls the same methods on every rank and only rank 0 writes anything, so the
loop itself needs no ``if rank == 0`` guards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor


class Monitor:
    """Progress bar over ``total`` steps from ``start``, TensorBoard under ``<workdir>/tensorboard``."""

    enabled = True

    def __init__(self, workdir: Path, start: int, total: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=start)
        self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)

    def info(self, message: str) -> None:
        self.bar.write(message)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: Tensor, step: int) -> None:
        self.writer.add_image(tag, image, step)

    def advance(self, **postfix: Any) -> None:
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


class SilentMonitor:
    """What ranks other than 0 hold: every method of :class:`Monitor`, doing nothing."""

    enabled = False

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def create(rank: int, workdir: Path, start: int, total: int) -> Monitor | SilentMonitor:
    return Monitor(workdir, start, total) if rank == 0 else SilentMonitor()
