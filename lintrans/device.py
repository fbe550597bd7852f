"""Devices and precision, checked rather than assumed.

A run that asks for CUDA (``config.device=cuda``, or a sweep trial with ``resources.gpus > 0``)
where CUDA is unavailable, or with fewer visible devices than processes on the node, fails at
once with one line instead of training on the CPU. ``training.mixed_precision: auto`` picks bf16
where the hardware has it (CUDA devices with bf16; CPUs with AVX512-BF16 or AMX) and fp32
otherwise: on a CPU without those instructions bf16 autocast is about 2x slower than fp32.

``LINTRANS_CPU_BF16=0`` hides the CPU's bf16 instructions from ``auto`` and ``=1`` shows them, so
that one machine can run both paths (the test suite does; so can a user who wants fp32 numbers
from a bf16 machine without editing configs).

``training.compile`` says where the network is compiled (``torch.compile``): ``auto`` compiles it for
the evaluations (FID's sample generation, the ELBO) on CUDA and nowhere else, as measured (``bench/gpu.sh`` on an H100:
sampling 1.65-1.81x faster compiled, a training step 0.93x after 86 s of compiling; on 2 CPU cores
compiling takes minutes); ``on`` compiles training and evaluations on any device; ``off`` never.
``sample.py`` and the trainer's sample grids stay eager: a few batches do not pay for the compile. Where
the device's compiler is missing, it runs eager with one warning.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
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
    """Resolve a precision (``training.mixed_precision``, an evaluation's ``precision``): ``auto``, ``no`` or ``bf16``.

    An explicit ``bf16`` on hardware without it runs, with one warning.
    """
    if request == "auto":
        return has_bf16(device)
    if request == "bf16" and not has_bf16(device):
        warnings.warn(
            f"bf16 asked for on {device} without bf16 support (CUDA bf16, AVX512-BF16 or AMX): "
            "expect about half the fp32 speed; 'auto' would pick fp32",
            stacklevel=2,
        )
    return request == "bf16"


def compiler_missing(device: torch.device) -> str | None:
    """What ``torch.compile`` lacks on ``device`` (Triton on CUDA, a C++ compiler on a CPU); None if nothing."""
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton is not installed (torch.compile's CUDA backend)"
    cxx = os.environ.get("CXX", "g++")
    return None if shutil.which(cxx) else f"no C++ compiler '{cxx}' on PATH (torch.compile's CPU backend; set CXX)"


def use_compile(request: str, device: torch.device, training: bool) -> bool:
    """Resolve ``training.compile`` for the training step (``training``) or for the evaluations.

    ``auto`` compiles the evaluations on CUDA only; a missing compiler runs eager, with one warning.
    """
    if request == "off" or (request == "auto" and (training or device.type != "cuda")):
        return False
    missing = compiler_missing(device)
    if missing:
        warnings.warn(f"training.compile={request} on {device}: {missing}; running eager", stacklevel=2)
        return False
    return True


def use_bf16_for_run(request: str, trained: str, device: torch.device) -> bool:
    """Resolve an evaluation's or ``sample.py``'s precision, where ``train`` means the run's ``trained``
    (its ``training.mixed_precision``)."""
    return use_bf16(trained if request == "train" else request, device)


class BF16Network(torch.nn.Module):
    """A network that runs under bf16 autocast and answers in fp32, for sampling and evaluations.

    Only the network's matmuls and convolutions drop to bf16: the residual it returns is cast back,
    so the reverse process, the squared errors and the log-densities around it stay in their own
    dtype (fp32 states, fp64 sums). Train mode, ``eval()`` and parameters pass through to the network.
    """

    def __init__(self, net: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.net, self.device_type = net, device.type

    def forward(self, u: torch.Tensor, k: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            out = self.net(u, k, theta)
        return out.float()


class ChunkedNetwork(torch.nn.Module):
    """A network called on at most ``chunk`` samples at a time (``eval.max_batch_bytes``), answering for the
    whole batch: the caller's states, noise and sums stay whole-batch, so only the peak memory changes."""

    def __init__(self, net: torch.nn.Module, chunk: int) -> None:
        super().__init__()
        self.net, self.chunk = net, chunk

    def forward(self, u: torch.Tensor, k: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
        if len(u) <= self.chunk:
            return self.net(u, k, theta)
        parts = [
            self.net(u[i : i + self.chunk], k[i : i + self.chunk], None if theta is None else theta[i : i + self.chunk])
            for i in range(0, len(u), self.chunk)
        ]
        return torch.cat(parts)


def inference_network(
    net: torch.nn.Module, bf16: bool, device: torch.device, compile: bool = False, max_bytes: int = 0, process=None
):
    """``net`` as sampling and the evaluations call it: in :class:`BF16Network` when ``bf16``, then compiled
    (``torch.compile``, one graph per batch shape) when ``compile``, then in :class:`ChunkedNetwork` when
    ``max_bytes`` (``eval.max_batch_bytes``) is set, its chunk measured on ``process``'s images with the eager
    network (measuring the compiled one would compile it twice more)."""
    from lintrans.memory import largest_batch

    out = BF16Network(net, device) if bf16 else net
    chunk = largest_batch(out, process, device, max_bytes) if max_bytes else None
    out = torch.compile(out) if compile else out
    return ChunkedNetwork(out, chunk) if chunk else out


def precision_name(bf16: bool) -> str:
    """How records and logs name a precision."""
    return "bf16" if bf16 else "fp32"
