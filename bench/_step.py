"""The real training step of :func:`lintrans.training_loop._train`, built from the real components.

``TrainStep`` holds what ``_train`` builds (forward process from the registry, ``UNet`` via
``build_model``, ``EMA``, DDP wrapper with ``gradient_as_bucket_view``, ``make_optimizer``,
``GlobalBatchSampler`` + ``datasets.batches``) and ``step()`` runs the body of ``_train``'s loop
statement for statement (randomness, augmentation, autocast, ``per_sample_loss``, backward,
loss all-reduce, warm-up lr, grad clipping, ``opt.step``, ``ema.update``, per-level statistics),
minus logging, evaluation, sampling and checkpointing. ``_train`` has no step function to call,
so this mirrors it; ``bench/train_throughput.py`` cross-checks the figure against the real
trainer's own ``train/img_per_s``.

With ``instrument=True`` each step also records (device-synchronised) wall time of the forward
process (``process.pair``), the optimizer (lr + clip + ``opt.step``) and the EMA update.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from _common import sync
from torch.nn.parallel import DistributedDataParallel as DDP

from lintrans import datasets, distributed
from lintrans.ema import EMA
from lintrans.forward import create_forward
from lintrans.loss import per_sample_loss
from lintrans.training_loop import augment, build_model, learning_rate, make_optimizer, step_randomness


def synthetic_images(n: int, shape: tuple[int, int, int], seed: int = 0) -> datasets.TensorImages:
    gen = torch.Generator().manual_seed(seed)
    return datasets.TensorImages(torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8))


def train_images(config, data: str) -> tuple[datasets.TensorImages, str]:
    """The configured data set, mnist5k for a 1x28x28 config, or synthetic uint8 images of the shape."""
    shape = (config.data.num_channels, config.data.image_size, config.data.image_size)
    if data == "auto":
        data = "mnist5k" if shape == (1, 28, 28) else "synthetic"
    if data == "synthetic":
        return synthetic_images(max(4 * config.training.batch_size, 512), shape), "synthetic uint8 images"
    config.data.dataset = data
    train, _ = datasets.load(config)
    return train, data


class TrainStep:
    def __init__(
        self, config, device: torch.device, train_set, precision: str = "no", variant: dict | None = None
    ) -> None:
        """``variant`` (what-if changes, default none): ``channels_last`` (model and input in NHWC),
        ``fused_adam`` (``torch.optim.Adam(fused=True)`` instead of ``foreach=True``)."""
        self.variant = variant = dict(variant or {})
        if not torch.distributed.is_initialized():
            distributed.init()  # world size 1 (gloo on CPU, NCCL on CUDA), as the trainer does
        self.config, self.device = config, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.gb = config.training.batch_size
        self.process = create_forward(config).to(device)
        self.model = build_model(config, device)
        if variant.get("channels_last"):
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model, config.model.ema_rate)
        self.ddp = DDP(
            self.model,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
        self.opt = make_optimizer(config, self.model)
        if variant.get("fused_adam") and config.optim.optimizer == "Adam":
            o = config.optim
            self.opt = torch.optim.Adam(
                self.model.parameters(),
                lr=o.lr,
                betas=(o.beta1, 0.999),
                eps=o.eps,
                weight_decay=o.weight_decay,
                fused=True,
            )
        torch.manual_seed(int(config.seed) * 1000 + self.rank)
        self.sampler = datasets.GlobalBatchSampler(len(train_set), self.gb, self.rank, self.world, int(config.seed))
        self.batches = datasets.batches(train_set, self.sampler, 0)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        self.per_level = torch.zeros(2, config.model.K + 1, dtype=torch.float64)
        self.lo, self.hi = self.rank * (self.gb // self.world), (self.rank + 1) * (self.gb // self.world)
        self.step_index = 0
        self.timers: dict[str, float] = {"forward_process": 0.0, "optimizer": 0.0, "ema": 0.0}
        self.instrument = False
        real_pair = self.process.pair

        def timed_pair(x, k):
            if not self.instrument:
                return real_pair(x, k)
            sync(device)
            t0 = time.perf_counter()
            out = real_pair(x, k)
            sync(device)
            self.timers["forward_process"] += time.perf_counter() - t0
            return out

        self.process.pair = timed_pair  # instance attribute: per_sample_loss calls it as before
        self.model.train()

    def _t(self) -> float:
        if self.instrument:
            sync(self.device)
        return time.perf_counter()

    def forward_backward(self) -> torch.Tensor:
        config, device = self.config, self.device
        rnd = {
            key: v[self.lo : self.hi]
            for key, v in step_randomness(config, self.step_index, self.gb, self.process.shape).items()
        }
        x0 = augment(next(self.batches), rnd).to(device, non_blocking=True)
        if self.variant.get("channels_last"):
            x0 = x0.contiguous(memory_format=torch.channels_last)
        k = rnd["k"].to(device)
        with self.autocast:
            per = per_sample_loss(self.ddp, self.process, x0, k, rnd["noise"].to(device), config.model.sigma)
        loss = per.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss, per, k

    def step(self) -> float:
        config, device = self.config, self.device
        loss, per, k = self.forward_backward()
        stats = torch.stack([loss.detach().double(), torch.tensor(0.0, dtype=torch.float64, device=device)])
        dist.all_reduce(stats)
        global_loss = stats[0].item() / self.world
        t0 = self._t()
        lr = learning_rate(config, self.step_index)
        for group in self.opt.param_groups:
            group["lr"] = lr
        if config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.optim.grad_clip, foreach=True)
        self.opt.step()
        t1 = self._t()
        self.ema.update(self.model)
        t2 = self._t()
        if self.instrument:
            self.timers["optimizer"] += t1 - t0
            self.timers["ema"] += t2 - t1
        self.per_level[0].index_add_(0, k.cpu(), per.detach().double().cpu())
        self.per_level[1].index_add_(0, k.cpu(), torch.ones(len(k), dtype=torch.float64))
        self.step_index += 1
        return global_loss
