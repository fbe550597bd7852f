"""Checkpoints: atomic writes, ``weights_only=True`` loads, strict key matching.

Layout (seed-compatible): ``checkpoints-meta/checkpoint.pth`` is the latest state, rewritten for
preemption; ``checkpoints/checkpoint_N.pth`` are numbered snapshots. A checkpoint holds model,
EMA, optimizer, step, the config (as JSON), the data position and every rank's RNG states, which
is all an exact resume needs.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lintrans.atomic import write_atomic
from lintrans.errors import UsageError

META = Path("checkpoints-meta") / "checkpoint.pth"
NUMBERED = "checkpoints"


def meta_path(workdir: str | Path) -> Path:
    return Path(workdir) / META


def numbered_path(workdir: str | Path, n: int) -> Path:
    return Path(workdir) / NUMBERED / f"checkpoint_{n}.pth"


def numbered(workdir: str | Path) -> list[int]:
    folder = Path(workdir) / NUMBERED
    found = (re.fullmatch(r"checkpoint_(\d+)\.pth", p.name) for p in folder.glob("checkpoint_*.pth"))
    return sorted(int(m.group(1)) for m in found if m)


def save(path: str | Path, state: dict) -> Path:
    return write_atomic(path, lambda f: torch.save(state, f))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def resolve(workdir: str | Path, checkpoint: int) -> Path:
    """The seed's numbering: 0 is the latest (``checkpoints-meta``), N is ``checkpoint_N.pth``."""
    if checkpoint == 0:
        path = meta_path(workdir)
    else:
        path = numbered_path(workdir, checkpoint)
    if not path.is_file():
        have = numbered(workdir)
        valid = ("0 (latest)" if meta_path(workdir).is_file() else "") + (
            ", " + ", ".join(map(str, have)) if have else ""
        )
        raise UsageError(
            f"checkpoint {checkpoint} not found: {path} does not exist; valid: "
            f"{valid.strip(', ') or 'none (train first)'}"
        )
    return path
