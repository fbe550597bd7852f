"""What produced a run's numbers: precision, device, library versions, code version, world size.

The same config gives other digits on another CPU (bf16 autocast where the CPU has AVX512-BF16 or
AMX, fp32 elsewhere), another torch or another commit, so a table that mixes them must be able to
say so. The trainer writes this record into the run directory (``provenance.json``) when it
starts or resumes, from the values it actually uses (what ``auto`` resolved to, not ``auto``).
"""

from __future__ import annotations

import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from lintrans.device import cpu_flags_have_bf16

FILE = "provenance.json"
FIELDS = ("precision", "device", "torch", "cuda", "lintrans", "commit", "world_size", "compile")


def collect(device: torch.device, bf16: bool, world_size: int) -> dict:
    """The record of one run on ``device`` (bf16 autocast or fp32) with ``world_size`` processes."""
    commit, dirty = code_version()
    return {
        "precision": "bf16" if bf16 else "fp32",
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lintrans": _package_version(),
        "commit": f"{commit}{'+dirty' if dirty else ''}" if commit else None,
        "world_size": world_size,
        "compile": False,  # the trainer runs eager; torch.compile is not used
    }


def device_name(device: torch.device) -> str:
    """``cuda: NVIDIA H100 (sm_90)`` or ``cpu: AMD EPYC (avx512_bf16)``: the chip and what bf16 runs on."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda: {torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"cpu: {_cpu_model()} ({_cpu_bf16_isa()})"


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


def _package_version() -> str | None:
    try:
        return version("lintrans")
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _cpu_bf16_isa() -> str:
    """The CPU's bf16 instructions, as ``auto`` sees the hardware (not ``LINTRANS_CPU_BF16``)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "bf16 unknown" if cpu_flags_have_bf16() else "no bf16"
    found = [name for flag, name in ((" amx_bf16", "amx_bf16"), (" avx512_bf16", "avx512_bf16")) if flag in flags]
    return "+".join(found) or "no bf16"
