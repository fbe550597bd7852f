"""What produced a run's numbers: precision, device, library versions, code version, world size.

The same config gives other digits on another CPU (bf16 autocast where the CPU has AVX512-BF16 or
AMX, fp32 elsewhere), another torch or another commit, so a table that mixes them must be able to
say so. The trainer writes this record into the run directory (``provenance.json``) when it
starts or resumes, from the values it actually uses (what ``auto`` resolved to, not ``auto``).

Importing it needs no torch (``status``, ``table`` and the benchmarks read its names and helpers);
:func:`collect` and :func:`device_name` import torch when a run calls them.
"""

from __future__ import annotations

import platform
import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FILE = "provenance.json"
FIELDS = ("precision", "device", "torch", "cuda", "lintrans", "commit", "world_size", "compile")
# The fields whose difference changes the digits of the same config: a table mixing them says so.
DIGITS = ("precision", "commit", "torch")


def mixed(made_by: list[dict]) -> str | None:
    """One line when these runs' numbers come from different precisions or code versions, else None.

    ``made_by``: one dict per run holding (some of) :data:`FIELDS`, a provenance record or a table row.
    """
    differ = {k: sorted({str(r[k]) for r in made_by if r.get(k)}) for k in DIGITS}
    said = "; ".join(f"{k} {', '.join(v)}" for k, v in differ.items() if len(v) > 1)
    return f"note: these trials' numbers come from different set-ups ({said}): compare within one" if said else None


def collect(device: torch.device, bf16: bool, world_size: int, compiled: bool) -> dict:
    """The record of one run on ``device`` (bf16 autocast or fp32, compiled or eager) with ``world_size`` processes."""
    import torch

    from lintrans.device import precision_name

    return {
        "precision": precision_name(bf16),
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lintrans": package_version(),
        "commit": commit(),
        "world_size": world_size,
        "compile": compiled,
    }


def device_name(device: torch.device) -> str:
    """``cuda: NVIDIA H100 (sm_90)`` or ``cpu: AMD EPYC (avx512_bf16)``: the chip and what bf16 runs on."""
    import torch

    from lintrans.device import cpu_bf16_flags

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda: {torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"cpu: {cpu_model()} ({'+'.join(cpu_bf16_flags()) or 'no bf16'})"


@cache
def code_version() -> tuple[str | None, bool]:
    """The git commit lintrans runs from and whether its tree has changes; (None, False) outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10)  # fmt: skip
        if commit.returncode != 0:
            return None, False
        changes = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None, False
    return commit.stdout.strip(), bool(changes.stdout.strip())


def commit() -> str | None:
    """``code_version`` as one label: ``abc123def456`` or ``abc123def456+dirty``; None outside a checkout."""
    sha, dirty = code_version()
    return f"{sha}{'+dirty' if dirty else ''}" if sha else None


def package_version() -> str | None:
    """The installed lintrans release (None when it runs from a checkout that was never installed)."""
    try:
        return version("lintrans")
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
