"""Devices and precision, checked rather than assumed.

A run that asks for CUDA (``config.device=cuda``, or a sweep trial with ``resources.gpus > 0``)
where CUDA is unavailable, or with fewer visible devices than processes on the node, fails at
once with one line instead of training on the CPU. ``training.mixed_precision: auto`` picks bf16
where the hardware has it (CUDA devices with bf16; CPUs with AVX512-BF16 or AMX) and fp32
otherwise: on a CPU without those instructions bf16 autocast is about 2x slower than fp32.

``LINTRANS_CPU_BF16=0`` hides the CPU's bf16 instructions from ``auto`` and ``=1`` shows them, so
that one machine can run both paths (the test suite does; so can a user who wants fp32 numbers
from a bf16 machine without editing configs).
"""

from __future__ import annotations

import os
import warnings
from functools import cache
from pathlib import Path

import torch

from lintrans.errors import UsageError


def select(request: str, local_rank: int = 0, local_world_size: int = 1) -> torch.device:
    """The device of the process with ``local_rank`` among ``local_world_size`` on this node."""
    if request == "cpu" or (request == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"CUDA unavailable: {cuda_problem()} (asked for by config.device={request} or resources.gpus)")
    count = torch.cuda.device_count()
    if local_world_size > count:
        raise UsageError(
            f"CUDA: {local_world_size} processes on this node but only {count} visible device(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def cuda_problem() -> str:
    """Why ``torch.cuda.is_available()`` is False, as far as can be told without a traceback."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return "CUDA_VISIBLE_DEVICES is empty"
    if not Path("/proc/driver/nvidia/version").exists():
        return f"no NVIDIA driver on {os.uname().nodename} (wrong partition, or no --gpus/--gres given?)"
    return f"the driver is older than this torch build's CUDA {torch.version.cuda}, or no device is visible"


CPU_BF16_VARIABLE = "LINTRANS_CPU_BF16"
CPU_BF16_CHOICES = {"0": False, "1": True}


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: the instructions that make bf16 autocast faster than fp32 on a CPU.

    ``LINTRANS_CPU_BF16`` (``0`` or ``1``), when set, answers instead of the hardware.
    """
    forced = os.environ.get(CPU_BF16_VARIABLE)
    if forced is None:
        return cpu_flags_have_bf16()
    if forced not in CPU_BF16_CHOICES:
        raise UsageError(f"unknown {CPU_BF16_VARIABLE}={forced!r}; valid: {', '.join(CPU_BF16_CHOICES)} (or unset)")
    return CPU_BF16_CHOICES[forced]


def cpu_flags_have_bf16() -> bool:
    """What the hardware says: ``avx512_bf16`` or ``amx_bf16`` among the CPU flags."""
    return bool(cpu_bf16_flags())


@cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU's bf16 instructions by their ``/proc/cpuinfo`` names (torch's own check where there is none)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        found = (
            ("amx_bf16", torch.cpu._is_amx_tile_supported()),
            ("avx512_bf16", torch.cpu._is_avx512_bf16_supported()),
        )
        return tuple(name for name, present in found if present)
    return tuple(name for name in ("amx_bf16", "avx512_bf16") if f" {name}" in flags)


def has_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def use_bf16(request: str, device: torch.device) -> bool:
    """Resolve ``training.mixed_precision``; an explicit ``bf16`` on hardware without it trains, with one warning."""
    if request == "auto":
        return has_bf16(device)
    if request == "bf16" and not has_bf16(device):
        warnings.warn(
            f"training.mixed_precision=bf16 on {device} without bf16 support (CUDA bf16, AVX512-BF16 or AMX): "
            "expect about half the fp32 speed; 'auto' would pick fp32",
            stacklevel=2,
        )
    return request == "bf16"
