"""What a process can learn from its environment, without torch: rank, exit codes, ports, parents.

Every launcher lintrans runs under (``torchrun``, ``mpirun``, ``srun``, a Ray worker given a
torchrun environment, or a plain ``python``) announces a process's rank in its own variables. The
rest of the code asks here, once, instead of each module reading ``RANK`` its own way, so a
message printed "from rank 0 only" means the same under every launcher. Rendezvous (addresses,
MPI broadcasts, the process group) stays in :mod:`lintrans.distributed`, which needs torch.

The exit codes are the contract between a trial and whatever started it (the SLURM task wrapper
requeues on ``EXIT_PREEMPTED``; the local and Ray backends retry on ``EXIT_BUSY``); README lists
them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from collections.abc import Mapping
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1  # the work failed (a trial, an evaluation); the reason is in its status
EXIT_USAGE = 2  # bad input: unknown forward process, impossible K or sigma, missing files
EXIT_NONFINITE = 3  # training stopped on a non-finite loss; the last checkpoint is intact
EXIT_BUSY = 73  # another process holds the trial's lock: nothing was done, try again later
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written after SIGUSR1/SIGUSR2/SIGTERM, requeue me

# (rank, world size) variables of each launcher, most specific first. SLURM's count only when a
# job step has several tasks: a one-task batch script exports SLURM_PROCID=0 to everything it runs.
_RANK_VARIABLES = (
    ("RANK", "WORLD_SIZE"),  # torchrun, or env:// set by hand (lintrans's Ray workers)
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),  # Open MPI's mpirun
    ("PMI_RANK", "PMI_SIZE"),  # MPICH / Intel MPI / srun --mpi=pmi2
    ("PMIX_RANK", "PMIX_SIZE"),  # srun --mpi=pmix without an MPI-specific variable
    ("SLURM_PROCID", "SLURM_NTASKS"),  # srun
)


def rank_and_world(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """This process's global rank and the world size its launcher announced (``(0, 1)`` when alone)."""
    env = os.environ if env is None else env
    for rank_key, size_key in _RANK_VARIABLES:
        if rank_key not in env or size_key not in env:  # a launcher sets both (PMIx may give the rank alone)
            continue
        size = int(env[size_key] or "1")
        if rank_key == "SLURM_PROCID" and size <= 1:
            continue
        return int(env[rank_key]), size
    return 0, 1


def rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank (0 when it was started alone)."""
    return rank_and_world(env)[0]


def is_rank0(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process speaks for its run: prints, writes records, owns the trial's state."""
    return rank(env) == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (another process may take it before it is bound: callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/PID/stat`` field 22); None if it is gone.

    A pid and its start time name one process for the machine's uptime: a pid alone may since
    belong to another process.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # the fields after the command name, which may hold spaces


def same_process(host: str | None, pid: int | None, start: int | None) -> bool:
    """Whether ``pid`` on ``host``, started at ``start``, is still that process, and runs on this machine.

    ``start`` None (a record written before start times were kept): the pid's being alive here.
    """
    if not pid or host != socket.gethostname():
        return False
    now = process_start(pid)
    return now is not None and (start is None or now == start)


_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``signum`` to this process when its parent dies (``PR_SET_PDEATHSIG``).

    Use as ``subprocess.Popen(..., preexec_fn=die_with_parent)`` (or a ``functools.partial`` for
    another signal): a trial started by a launcher that is killed with ``kill -9`` then stops too,
    instead of training on as an orphan that still holds the trial's lock.
    """
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)


# glibc's mallopt parameters (malloc.h) and its largest M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Keep the memory of freed tensors in this process for the next ones, instead of handing it back.

    glibc gives large freed blocks back to the kernel (``munmap``, or trimming the heap's top), so a
    training step or network call that allocates its activations again page-faults on every 4 KiB
    page: here about 1.7 µs a page, 4.4 ms to allocate and fill 10 MB that take 0.3 ms to fill once
    held. With blocks up to 32 MiB served from a heap that is never trimmed, fp32 sampling with the
    mnist5k U-Net ran 1.16x as fast; bf16 and training steps, which fault little, did not change
    (``bench/malloc.py``). The process then holds the peak of its tensors until it exits, as
    PyTorch's CUDA caching allocator does on a GPU.
    Returns whether the C library took the settings (not on musl or macOS, which lack ``mallopt``).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mmap_set = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)  # each set on its own: one refused leaves the other
    trim_set = mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    return bool(mmap_set and trim_set)
