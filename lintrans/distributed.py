"""One DDP set-up for every way a run can be started.

``python train.py`` (one process), ``torchrun`` (``env://``), ``mpirun`` (rank and size from
MPI; rank 0's address and a free port are broadcast over MPI) and ``srun`` (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``, first host of the node list) all end in
``torch.distributed.init_process_group``: world size 1 is the degenerate case, not a separate
code path. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass

import hostlist
import torch
import torch.distributed as dist

from lintrans.errors import UsageError
from lintrans.procenv import free_port, rank_and_world


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    local_world_size: int = 1


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list (rank 0's node): ``"rack[1-2]-node[01-04]"`` -> ``"rack1-node01"``.

    Parsed by python-hostlist, which reads every form SLURM writes (several bracket groups in one
    name, zero-padded ranges, lists of ranges); a list it cannot read is bad input, not a guess.
    """
    try:
        hosts = hostlist.expand_hostlist(nodelist.strip())
    except hostlist.BadHostlist as exc:
        raise UsageError(f"cannot read the SLURM node list {nodelist!r}: {exc}") from None
    if not hosts:
        raise UsageError(f"the SLURM node list {nodelist!r} names no host")
    return hosts[0]


def detect(env: dict[str, str] | None = None) -> DistInfo:
    """Work out rank, world size and rendezvous from the launcher's environment.

    Rank and world size are read by :func:`lintrans.procenv.rank_and_world`, except under MPI,
    where mpi4py gives them along with rank 0's address.
    """
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or a user who set env:// by hand
        rank, world = rank_and_world(env)
        return DistInfo(
            rank,
            world,
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
            "torchrun",
            int(env.get("LOCAL_WORLD_SIZE", world)),
        )
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env or "MPI_LOCALNRANKS" in env:
        return _from_mpi(env)
    # srun with several tasks (SLURM's own variables: srun --mpi=pmix may also set PMIX_RANK)
    rank, world = rank_and_world({k: env[k] for k in ("SLURM_PROCID", "SLURM_NTASKS") if k in env})
    if world > 1:
        job = int(env.get("SLURM_JOB_ID", "0"))
        return DistInfo(
            rank,
            world,
            int(env.get("SLURM_LOCALID", 0)),
            env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            int(env.get("MASTER_PORT") or 20000 + job % 20000),
            "srun",
            _tasks_on_this_node(env),
        )
    # World size 1 coordinates with nobody: no port at all (an in-process store, see init), so a
    # MASTER_PORT inherited from elsewhere (an sbatch job exports the submitting shell's environment)
    # cannot make a lone run fight for one.
    return DistInfo(0, 1, 0, "127.0.0.1", 0, "single")


def _tasks_on_this_node(env: dict[str, str]) -> int:
    """``SLURM_TASKS_PER_NODE`` (``"2(x3),1"``) for this node, else ``SLURM_NTASKS_PER_NODE``, else 1."""
    per_node = env.get("SLURM_NTASKS_PER_NODE")
    if per_node and per_node.isdigit():
        return int(per_node)
    counts = []
    for part in env.get("SLURM_TASKS_PER_NODE", "1").split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else 1


def _from_mpi(env: dict[str, str]) -> DistInfo:
    from mpi4py import MPI  # imported only under mpirun: it initialises MPI on import

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", 0)))
    addr, port = (socket.gethostname(), free_port()) if rank == 0 else (None, None)
    addr, port = comm.bcast((addr, port), root=0)
    if size > 1 and addr == socket.gethostname():
        addr = "127.0.0.1"
    local_size = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", env.get("MPI_LOCALNRANKS", size)))
    return DistInfo(rank, size, local, addr, port, "mpirun", local_size)


def init(device_request: str = "auto", backend: str | None = None) -> tuple[DistInfo, torch.device]:
    """Pick this rank's device (:func:`lintrans.device.select`), then initialise the process group."""
    from lintrans.device import select

    info = detect()
    device = select(device_request, info.local_rank, info.local_world_size)
    if not dist.is_initialized():
        # torchrun's workers join its agent's store (env://); the others meet at rank 0's address,
        # given explicitly rather than through os.environ, which every child process would inherit.
        # A single process meets nobody: an in-process store, where a TCP store would listen on every
        # interface for as long as it trains.
        if info.launcher == "torchrun":
            meet: dict = {"init_method": "env://"}
        elif info.world_size == 1:
            meet = {"store": dist.HashStore()}
        else:
            meet = {"init_method": f"tcp://{info.master_addr}:{info.master_port}"}
        dist.init_process_group(
            backend or ("nccl" if device.type == "cuda" else "gloo"),
            **meet,
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(minutes=30),
        )
    return info, device


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_gather_object(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
