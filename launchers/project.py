"""``lintrans init DIR``: a minimal project of one's own, outside the repository, that runs as is.

It holds a config that imports lintrans's defaults (``config.py``), a forward process registered
from the project's own module (``my_processes.py``), and a sweep over lintrans's heat process and
that one (``sweep.yaml``), small enough to finish in about a minute on 2 CPU cores. The files are
copies of ``launchers/project_template/``, the sweep named after the folder (so that two projects
sharing one ``$LINTRANS_RUNS_DIR`` keep their runs apart).
"""

from __future__ import annotations

import re
import shutil
import string
from pathlib import Path

from launchers.schema import SWEEP_NAME
from lintrans.errors import UsageError

TEMPLATE = Path(__file__).resolve().parent / "project_template"


def init(folder: Path) -> Path:
    """Write the project into ``folder`` (new, or an empty folder); returns its sweep file."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} exists and is not a folder; give a new or empty folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise UsageError(f"{folder} is not empty; give a new or empty folder")
    name = folder.resolve().name
    sweep = folder / "sweep.yaml"
    text = string.Template((TEMPLATE / sweep.name).read_text())
    text = text.substitute(name=name if re.fullmatch(SWEEP_NAME, name) else "myproject")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for file in ("config.py", "my_processes.py"):
            shutil.copyfile(TEMPLATE / file, folder / file)
        sweep.write_text(text)
    except OSError as exc:
        raise UsageError(f"cannot write the project into {folder}: {exc.strerror or exc}") from None
    return sweep
