"""How much memory a network call takes, and the largest batch that fits a budget (``eval.max_batch_bytes``).

Sampling and the evaluations call the network on whole batches of images: FID generation at
``batch_size`` (500 for CIFAR-10, say), the ELBO at its batch size, ``sample.py`` on all of its
samples at once. On a GPU smaller than the one a sweep file was written for, or on a shared node,
that batch may not fit. With ``eval.max_batch_bytes`` set, :func:`largest_batch` measures the peak
memory of one no-grad network call at batch 1 and 2 on the device itself (CUDA: the caching
allocator's peak; CPU: every tensor the call creates, alive from its first op to its last
reference), and the network is then called on at most that many samples at a time
(:class:`lintrans.device.ChunkedNetwork`). The states, noise and sums of the reverse process stay
whole-batch, so the results do not depend on the budget.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lintrans.errors import UsageError


class _LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors created under it (each storage counted once, until freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.alive: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(storage := t.untyped_storage()) not in self.alive:
                self.alive.add(id(storage))
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, id(storage), storage.nbytes())
        return out

    def _freed(self, key: int, nbytes: int) -> None:
        self.alive.discard(key)
        self.live -= nbytes


@torch.no_grad()
def call_peak_bytes(net, process, batch: int, device: torch.device) -> int:
    """Peak bytes that one call of ``net`` on ``batch`` of ``process``'s images at level K adds on ``device``."""
    u = torch.rand(batch, *process.shape, device=device)
    k = torch.full((batch,), process.K, dtype=torch.long, device=device)
    theta = process.sample_theta(batch, torch.Generator().manual_seed(0))
    theta = None if theta is None else theta.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        net(u, k, theta)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with _LiveBytes() as counter:
        net(u, k, theta)
    return counter.peak


def largest_batch(net, process, device: torch.device, max_bytes: int) -> int:
    """The most samples one call of ``net`` may take within ``max_bytes``: ``(max_bytes - fixed) // per_sample``,
    with the fixed and per-sample costs measured at batch 1 and 2; :class:`UsageError` if not even one fits."""
    one, two = (call_peak_bytes(net, process, b, device) for b in (1, 2))
    per_sample = max(two - one, 1)
    fixed = max(one - per_sample, 0)
    if fixed + per_sample > max_bytes:
        raise UsageError(f"eval.max_batch_bytes={max_bytes} is below what one sample's network call needs here "
                         f"({fixed + per_sample} bytes on {device.type}); raise it, or 0 for no limit")  # fmt: skip
    return (max_bytes - fixed) // per_sample
