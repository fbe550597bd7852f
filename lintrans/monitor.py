"""Rank 0's voice: progress bar, log lines, trackers, reports, files; other ranks get a silent stand-in.

As in DiT, the loop calls the same methods on every rank and only rank 0 writes anything, so the
loop itself needs no ``if rank == 0`` guards: files only one process may write (checkpoints, sample
grids) go through :meth:`Monitor.write`, metrics for the launcher through :meth:`Monitor.report`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from lintrans import trackers

T = TypeVar("T")
Report = Callable[[int, dict], None]


class Monitor:
    """Progress bar over ``total`` steps from ``start``; scalars and images to the run's trackers.

    ``report(step, metrics)``, if given, is the launcher's callback (a sweep's trial records them).
    """

    def __init__(self, tracked: trackers.Trackers, start: int, total: int, report: Report | None = None) -> None:
        from tqdm import tqdm

        self._report = report
        self.trackers = tracked
        self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)

    def info(self, message: str) -> None:
        self.bar.write(message)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.trackers.scalars(values, step)

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        """``grid``: ``(H, W, C)`` uint8, as :func:`lintrans.images.grid` makes it."""
        self.trackers.image(tag, grid, step)

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
        self.trackers.close()


class SilentMonitor:
    """What ranks other than 0 hold: every method of :class:`Monitor`, doing nothing (``write`` returns None)."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def create(
    rank: int, workdir: Path, start: int, total: int, tracking: dict[str, Any], report: Report | None = None
) -> Monitor | SilentMonitor:
    """Rank 0's :class:`Monitor`, its trackers opened by :func:`lintrans.trackers.open_training` with
    ``tracking`` (the purge step is ``start``); a :class:`SilentMonitor` elsewhere."""
    if rank != 0:
        return SilentMonitor()
    return Monitor(trackers.open_training(workdir, purge_step=start, **tracking), start, total, report)
