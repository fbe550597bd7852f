"""Features of a data set, computed once and read back by every evaluation that needs them again.

Every FID evaluation's memorisation check compares its samples with the features of the whole
training set, which are the same for every trial of a sweep and every checkpoint of a run: 3 s of
digit features per mnist5k evaluation on one CPU thread, 50,000 Inception passes per CIFAR-10 one.

A file is named by a hash of ``key``, everything its values depend on (the caller's: images,
extractor, sizes, code, versions, device), and holds the key's text beside the features; both are
checked when it is read. A file that cannot be read or holds other features is said so once and
ignored; the features are computed again and replace it. A usable file that another process wrote
in the meantime is kept as it is, and files are written atomically, so trials that finish the same
features at once leave one whole file. Each file is read whole (CIFAR-10's Inception features:
410 MB). The folder is ``$LINTRANS_CACHE_DIR``, else ``$XDG_CACHE_HOME/lintrans``, else
``~/.cache/lintrans``; nothing else refers to it, so deleting it only costs the recomputation.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from lintrans.atomic import write_atomic

CACHE_ENV = "LINTRANS_CACHE_DIR"


def cache_dir() -> Path:
    """``$LINTRANS_CACHE_DIR``, else ``$XDG_CACHE_HOME/lintrans``, else ``~/.cache/lintrans``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "lintrans"


def file_sha256(path: Path) -> str:
    """A file's SHA-256, read in 1 MiB blocks (Inception's weights are 95 MB)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def path_for(key: dict) -> Path:
    return cache_dir() / "features" / f"{hashlib.sha256(_text(key).encode()).hexdigest()[:32]}.pt"


def _text(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def _load(key: dict, rows: int) -> tuple[Tensor | None, str | None]:
    """``(features, None)``, ``(None, None)`` where there is no file, or ``(None, what is wrong with it)``."""
    path = path_for(key)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, NotADirectoryError):  # no file (a file where a folder goes holds none either)
        return None, None
    except Exception as exc:  # noqa: BLE001 - a file that cannot be read is recomputed, and said so
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}"
    if not isinstance(saved, dict) or saved.get("key") != _text(key):
        return None, "it was written for other features"
    found = saved.get("features")
    if not isinstance(found, Tensor) or found.dim() != 2 or len(found) != rows:
        return None, f"it does not hold {rows} rows of features"
    return found, None


def read(key: dict, rows: int) -> Tensor | None:
    """The ``(rows, D)`` features ``key`` describes, or ``None`` where no usable file holds them."""
    found, problem = _load(key, rows)
    if problem:
        warnings.warn(f"feature cache {path_for(key)} is unusable ({problem}); computing the features again",
                      stacklevel=2)  # fmt: skip
    return found


def write(key: dict, values: Tensor) -> Path | None:
    """Keep ``values`` for the next evaluation; ``None``, with a warning, where the cache cannot be written."""
    path = path_for(key)
    if _load(key, len(values))[0] is not None:  # another process finished the same features first
        return path
    try:
        return write_atomic(path, lambda f: torch.save({"key": _text(key), "features": values.contiguous()}, f))
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
        warnings.warn(
            f"cannot write the feature cache {path} ({getattr(exc, 'strerror', None) or exc}); every evaluation "
            f"computes the features again; set {CACHE_ENV} to a writable folder",
            stacklevel=2,
        )
        return None
