"""Shared helpers: run the project's entry points as a user would, from the repository root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = "tests/configs/tiny.py"
IN_CI = os.environ.get("CI", "").lower() == "true"


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **extra)
    return e


def run(args: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run ``python <args>`` in the repository root and capture its output."""
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout, **kw
    )


def train_args(workdir: Path, *overrides: str, config: str = TINY) -> list[str]:
    return ["train.py", f"--config={config}", f"--workdir={workdir}", *overrides]


def weights(workdir: Path, key: str = "model") -> dict[str, torch.Tensor]:
    state = torch.load(workdir / "checkpoints-meta" / "checkpoint.pth", weights_only=True)
    return state[key]


def require(tool: str) -> str:
    """Path of an external tool; missing is a failure under CI=true, a skip elsewhere."""
    path = shutil.which(tool)
    if path is None:
        if IN_CI:
            pytest.fail(f"{tool} is not installed (CI=true: .ci/run must install it)")
        pytest.skip(f"{tool} not installed")
    return path
