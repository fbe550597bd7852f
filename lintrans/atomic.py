"""Atomic file writes: temp file in the same folder, fsync, rename, fsync the folder.

A reader (or a kill at any instant) sees either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(fileobj)`` on a temp file next to ``path`` and move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide results from the rest of a shared group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)  # no partial file; the previous ``path`` is untouched
        if disk_full(exc):  # torch.save reports a failed write as a RuntimeError: say which file, and why
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from exc
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it arose from, is ``ENOSPC`` (a full disk or quota: ``EDQUOT``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_json(path: str | os.PathLike, data: Any) -> Path:
    payload = (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode()
    return write_atomic(path, lambda f: f.write(payload))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode()))
