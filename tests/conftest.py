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


def assert_one_line(code: int, err: str, needle: str) -> None:
    """Bad input: exit code 2 and exactly one line on stderr that says ``needle``, no traceback."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def assert_usage_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert_one_line(result.returncode, result.stderr, needle)


def weights(workdir: Path, key: str = "model") -> dict[str, torch.Tensor]:
    state = torch.load(workdir / "checkpoints-meta" / "checkpoint.pth", weights_only=True)
    return state[key]


PROCESS_PARAMS = {
    "blur_sigma_min": 0.5,
    "blur_sigma_max": 4.0,
    "forward_seed": 3,
    "product_step": 0.1,
    "blur_scale_min": 0.5,
    "blur_scale_max": 1.5,
    "num_choices": 3,
}


def make_process(name: str, shape: tuple[int, int, int] = (1, 6, 6), K: int = 7, max_bytes: int = 2**31, **params):
    """A forward process from plain values, with test defaults for whatever parameters its class reads."""
    from lintrans.forward import create_forward, process_class

    given = {**PROCESS_PARAMS, **params}
    return create_forward(name, K, shape, max_bytes, **{k: given[k] for k in process_class(name).config_keys})


def require(tool: str) -> str:
    """Path of an external tool; missing is a failure under CI=true, a skip elsewhere."""
    path = shutil.which(tool)
    if path is None:
        if IN_CI:
            pytest.fail(f"{tool} is not installed (CI=true: .ci/run must install it)")
        pytest.skip(f"{tool} not installed")
    return path
