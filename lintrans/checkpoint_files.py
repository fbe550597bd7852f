"""Where a run directory keeps its checkpoints (IHDM's names), without torch.

:class:`lintrans.run.Run` reads and writes them; ``lintrans clean`` and ``status`` (which never
import torch) find them here too.
"""

from __future__ import annotations

import re
from pathlib import Path

META = Path("checkpoints-meta") / "checkpoint.pth"  # the latest state, rewritten for preemption ("checkpoint 0")
NUMBERED = "checkpoints"  # checkpoints/checkpoint_N.pth: numbered snapshots
_NUMBERED_NAME = re.compile(r"checkpoint_(\d+)\.pth")


def numbered_path(workdir: Path, n: int) -> Path:
    return Path(workdir) / NUMBERED / f"checkpoint_{n}.pth"


def numbered(workdir: Path) -> list[int]:
    """The steps of the numbered snapshots in ``workdir``, oldest first."""
    found = (_NUMBERED_NAME.fullmatch(p.name) for p in (Path(workdir) / NUMBERED).glob("*.pth"))
    return sorted(int(m.group(1)) for m in found if m)
