"""Rank 0's voice: progress bar, log lines, TensorBoard, reports, files; other ranks get a silent stand-in.

As in DiT, the loop calls the same methods on every rank and only rank 0 writes anything, so the
loop itself needs no ``if rank == 0`` guards: files only one process may write (checkpoints, sample
grids) go through :meth:`Monitor.write`, metrics for the launcher through :meth:`Monitor.report`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor

T = TypeVar("T")
Report = Callable[[int, dict], None]


class Monitor:
    """Progress bar over ``total`` steps from ``start``, TensorBoard under ``<workdir>/tensorboard``.

    ``report(step, metrics)``, if given, is the launcher's callback (a sweep's trial records them).
    """

    def __init__(self, workdir: Path, start: int, total: int, report: Report | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self._report = report
        self.writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=start)
        self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)

    def info(self, message: str) -> None:
        self.bar.write(message)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: Tensor, step: int) -> None:
        self.writer.add_image(tag, image, step)

    def report(self, step: int, metrics: dict) -> None:
        if self._report is not None:
            self._report(step, metrics)

    def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``: a file that one process writes for the run (the silent ranks skip it)."""
        return fn(*args, **kwargs)

    def advance(self, **postfix: Any) -> None:
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


class SilentMonitor:
    """What ranks other than 0 hold: every method of :class:`Monitor`, doing nothing (``write`` returns None)."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def create(rank: int, workdir: Path, start: int, total: int, report: Report | None = None) -> Monitor | SilentMonitor:
    return Monitor(workdir, start, total, report) if rank == 0 else SilentMonitor()
