"""Features of a data set, computed once and read back by every evaluation that needs them again.

Every FID evaluation's memorisation check compares its samples with the features of the whole
training set, which are the same for every trial of a sweep and every checkpoint of a run: 2.5 s
of digit features per mnist5k evaluation here, and 50,000 Inception passes per CIFAR-10 one.

A file is named by a hash of everything its values depend on (``key``: the images' fingerprint,
the metric and mode, the extractor's weights, the batch and chunk sizes, torch and clean-fid
versions, the device) and holds that description beside the features; both are checked when it
is read. A file that cannot be read or does not match is computed again and replaced, with one
warning. Files are written atomically, so trials that compute the same features at once each
leave a whole file. The folder is ``$LINTRANS_CACHE_DIR``, else ``$XDG_CACHE_HOME/lintrans``, else
``~/.cache/lintrans``: on a cluster a home folder is usually shared by the nodes, so one node's
features serve the others. Delete the folder to start over; nothing else refers to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from lintrans.atomic import write_atomic

CACHE_ENV = "LINTRANS_CACHE_DIR"


def cache_dir() -> Path:
    """``$LINTRANS_CACHE_DIR``, else ``$XDG_CACHE_HOME/lintrans``, else ``~/.cache/lintrans``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lintrans"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def features(key: dict, rows: int, compute: Callable[[], Tensor]) -> tuple[Tensor, Path, bool]:
    """``(features, file, read)``: the ``(rows, D)`` features that ``key`` describes, read from ``file`` or
    computed by ``compute()`` and written there.

    A file that was read is memory-mapped: its rows are paged in as the caller reads them.
    """
    text = json.dumps(key, sort_keys=True)
    path = cache_dir() / "features" / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            found = saved["features"]
            if saved["key"] == text and found.dim() == 2 and len(found) == rows:
                return found, path, True
            problem = "it holds other features"
        except Exception as exc:  # noqa: BLE001 - any unreadable file is recomputed, and said so
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}"
        warnings.warn(f"feature cache {path} is unusable ({problem}); computing the features again", stacklevel=2)
    values = compute().cpu().contiguous()
    try:
        write_atomic(path, lambda f: torch.save({"key": text, "features": values}, f))
    except OSError as exc:
        warnings.warn(
            f"cannot write the feature cache {path} ({exc.strerror or exc}); every evaluation computes the "
            f"features again; set {CACHE_ENV} to a writable folder",
            stacklevel=2,
        )
    return values, path, False
