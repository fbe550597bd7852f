"""One training step, callable: randomness, augmentation, loss, all-reduce, update, EMA.

Every per-sample random choice (levels, noise, flips, dequantisation, and the ``theta`` of a
stochastic forward process) is drawn for the *global* batch from a generator seeded by
``(seed, step)``, and each rank takes its slice
(:func:`step_randomness`). Hence 2 ranks at batch ``b`` and 1 rank at batch ``2b`` compute the
same update, and a resume at step ``s`` needs only ``s`` plus the saved model, EMA, optimizer and
(dropout) RNG states. :class:`TrainStep` is what the training loop calls each step and what the
benchmarks time: there is no second copy of the step anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lintrans.datasets import dequantize
from lintrans.ema import EMA
from lintrans.errors import NonFiniteLossError
from lintrans.forward import ForwardProcess
from lintrans.loss import denoising_loss, sample_levels
from lintrans.model import learning_rate

Timer = Callable[[str], AbstractContextManager]


def step_randomness(
    seed: int,
    step: int,
    global_batch: int,
    shape: tuple[int, ...],
    K: int,
    random_flip: bool,
    dequantization: bool,
    sample_theta: Callable[[int, torch.Generator], Tensor | None] | None = None,
) -> dict[str, Tensor]:
    """Levels, noise, flips, dequantisation noise and ``theta`` for the whole global batch of ``step``.

    ``sample_theta`` is the forward process's; ``theta`` is drawn last and only where it exists,
    so a deterministic process sees exactly the draws it saw before stochastic processes existed.
    """
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + step)
    out = {"k": sample_levels(global_batch, K, gen), "noise": torch.randn((global_batch, *shape), generator=gen)}
    if random_flip:
        out["flip"] = torch.rand(global_batch, generator=gen) < 0.5
    if dequantization:
        out["dequant"] = torch.rand((global_batch, *shape), generator=gen)
    theta = sample_theta(global_batch, gen) if sample_theta is not None else None
    if theta is not None:
        out["theta"] = theta
    return out


def augment(x: Tensor, rnd: dict[str, Tensor]) -> Tensor:
    """Random horizontal flip and uniform dequantisation (:func:`lintrans.datasets.dequantize`), as drawn."""
    if "flip" in rnd:
        x = torch.where(rnd["flip"].view(-1, 1, 1, 1), x.flip(-1), x)
    if "dequant" in rnd:
        x = dequantize(x, rnd["dequant"])
    return x


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over the global batch
    per_sample: Tensor  # this rank's per-sample losses (detached)
    k: Tensor  # this rank's levels
    lr: float
    stop: bool  # some rank asked to stop (preemption signal): all ranks agree


class TrainStep:
    """``step(i, x0, stop_requested)``: one DDP update from this rank's share ``x0`` of global batch ``i``."""

    def __init__(
        self,
        *,
        model: nn.Module,
        ema: EMA,
        optimizer: torch.optim.Optimizer,
        process: ForwardProcess,
        sigma: float,
        seed: int,
        global_batch: int,
        lr: float,
        warmup: int,
        grad_clip: float,
        random_flip: bool,
        dequantization: bool,
        bf16: bool,
        device: torch.device,
        compile: bool = False,
        timer: Timer | None = None,
    ) -> None:
        self.model, self.ema, self.opt, self.process = model, ema, optimizer, process
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
        # Compiled as PyTorch recommends for DDP: the wrapper, so that its optimizer splits graphs at gradient
        # buckets. Parameters, checkpoints and the EMA stay the plain ``model``'s.
        self.ddp = torch.compile(ddp) if compile else ddp
        self.sigma, self.seed, self.global_batch = sigma, seed, global_batch
        self.lr, self.warmup, self.grad_clip = lr, warmup, grad_clip
        self.random_flip, self.dequantization = random_flip, dequantization
        self.device = device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.timer = timer or (lambda name: nullcontext())
        rank, world = dist.get_rank(), dist.get_world_size()
        self.world = world
        self.rows = slice(rank * (global_batch // world), (rank + 1) * (global_batch // world))

    def __call__(self, step: int, x0: Tensor, stop_requested: bool = False) -> StepResult:
        shape = self.process.shape
        rnd = step_randomness(self.seed, step, self.global_batch, shape, self.process.K, self.random_flip,
                              self.dequantization, self.process.sample_theta)  # fmt: skip
        rnd = {key: value[self.rows] for key, value in rnd.items()}
        x0 = augment(x0, rnd).to(self.device, non_blocking=True)
        k, noise = rnd["k"].to(self.device), rnd["noise"].to(self.device)
        theta = rnd["theta"].to(self.device) if "theta" in rnd else None

        # Loss and gradient (DDP averages the gradients over ranks during backward).
        with self.timer("forward_process"):
            target_k, target_prev = self.process.pair(x0, k, theta)
        with self.autocast:
            per = denoising_loss(self.ddp, target_k, target_prev, k, noise, self.sigma, theta)
        loss = per.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()

        # Global loss and the stop flag, in one all-reduce.
        stats = torch.stack([loss.detach().double(), torch.tensor(float(stop_requested), dtype=torch.float64,
                                                                  device=self.device)])  # fmt: skip
        dist.all_reduce(stats)
        global_loss = stats[0].item() / self.world
        if not math.isfinite(global_loss):
            raise NonFiniteLossError(
                f"non-finite loss ({global_loss}) at step {step}; stopped without updating the weights"
            )

        # Update: warm-up learning rate, gradient clipping, optimizer, EMA.
        with self.timer("optimizer"):
            lr = learning_rate(step, self.lr, self.warmup)
            for group in self.opt.param_groups:
                group["lr"] = lr
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
            self.opt.step()
        with self.timer("ema"):
            self.ema.update(self.model)
        return StepResult(global_loss, per.detach(), k, lr, stats[1].item() > 0)
