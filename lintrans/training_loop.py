"""The training loop: one readable DDP loop for 1 or N processes.

Every per-sample random choice (data order, levels, noise, flips, dequantisation) is drawn for
the *global* batch from a generator seeded by ``(seed, step)``, and each rank takes its slice.
Hence 2 ranks at batch ``b`` and 1 rank at batch ``2b`` compute the same update, and a resume
at step ``s`` needs only ``s`` plus the saved model, EMA, optimizer and (dropout) RNG states.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lintrans import checkpoint, datasets, distributed, images, sampling
from lintrans.atomic import write_text
from lintrans.config import check_matches_run, sampling_delta, to_json, validate
from lintrans.ema import EMA
from lintrans.errors import EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED, NonFiniteLossError, UsageError
from lintrans.forward import create_forward
from lintrans.loss import per_sample_loss, sample_levels
from lintrans.unet import UNet

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class Preemption:
    """Records that SIGUSR1/SIGUSR2/SIGTERM arrived; the loop finishes its step, then checkpoints."""

    def __init__(self) -> None:
        self.requested = False
        if threading.current_thread() is threading.main_thread():  # Ray runs trainables in threads
            for sig in PREEMPT_SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def step_randomness(config, step: int, global_batch: int, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Levels, noise, flips and dequantisation noise for the whole global batch of ``step``."""
    gen = torch.Generator().manual_seed(int(config.seed) * 1_000_003 + step)
    out = {
        "k": sample_levels(global_batch, config.model.K, gen),
        "noise": torch.randn((global_batch, *shape), generator=gen),
    }
    if config.data.random_flip:
        out["flip"] = torch.rand(global_batch, generator=gen) < 0.5
    if config.data.uniform_dequantization:
        out["dequant"] = torch.rand((global_batch, *shape), generator=gen)
    return out


def augment(x: torch.Tensor, rnd: dict[str, torch.Tensor]) -> torch.Tensor:
    """Random horizontal flip and uniform dequantisation (``(255 x + U) / 256``), as configured."""
    if "flip" in rnd:
        x = torch.where(rnd["flip"].view(-1, 1, 1, 1), x.flip(-1), x)
    if "dequant" in rnd:
        x = (x * 255.0 + rnd["dequant"]) / 256.0
    return x


def build_model(config, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(int(config.seed))  # identical initial weights on every rank
    return UNet(config).to(device)


def model_state(path: Path, config, device: torch.device, ema: bool = True) -> torch.nn.Module:
    """A model with the (EMA) weights of a checkpoint, for sampling and evaluation."""
    state = checkpoint.load(path, device)
    model = build_model(config, device)
    try:
        model.load_state_dict(state["ema"] if ema else state["model"], strict=True)
    except RuntimeError as exc:
        raise UsageError(f"checkpoint {path} does not match this config's model: {str(exc).splitlines()[0]}") from None
    return model.eval()


OPTIMIZERS = ("Adam", "SGD")


def make_optimizer(config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """IHDM's Adam, or plain SGD (whose updates are linear in the gradient: the DDP test uses it)."""
    o = config.optim
    if o.optimizer == "Adam":
        return torch.optim.Adam(
            model.parameters(), lr=o.lr, betas=(o.beta1, 0.999), eps=o.eps, weight_decay=o.weight_decay, foreach=True
        )
    if o.optimizer == "SGD":
        return torch.optim.SGD(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, foreach=True)
    raise UsageError(f"unknown config.optim.optimizer '{o.optimizer}'; valid: {', '.join(OPTIMIZERS)}")


def learning_rate(config, step: int) -> float:
    """Linear warm-up to ``optim.lr`` over ``optim.warmup`` steps."""
    warm = config.optim.warmup
    return config.optim.lr * (min(1.0, (step + 1) / warm) if warm > 0 else 1.0)


@torch.no_grad()
def eval_loss(config, model, process, eval_set, rank: int, world: int, device: torch.device) -> float:
    """Mean per-sample loss over the first ``eval.num_batches`` held-out batches (fixed randomness)."""
    bs = config.eval.batch_size
    n = min(len(eval_set), bs * config.eval.num_batches)
    gen = torch.Generator().manual_seed(int(config.seed) + 12345)
    k_all = sample_levels(n, config.model.K, gen)
    noise_all = torch.randn((n, *process.shape), generator=gen)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for start in range(rank * bs, n, world * bs):
        idx = torch.arange(start, min(start + bs, n))
        x0 = datasets.batches(eval_set, [idx]).__next__().to(device)
        per = per_sample_loss(model, process, x0, k_all[idx].to(device), noise_all[idx].to(device), config.model.sigma)
        total += torch.stack([per.sum().double(), torch.tensor(float(len(idx)), device=device, dtype=torch.float64)])
    model.train(was_training)
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def write_samples(config, ema_model, process, train_set, folder: Path, device: torch.device, writer, step: int) -> None:
    """Sample grid, prior grid and reverse-process GIF from the EMA model (rank 0 only)."""
    n = config.training.get("num_samples", 36)
    gen = torch.Generator(device=device).manual_seed(int(config.seed) + 777)
    idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(int(config.seed) + 778))[:n]
    x0 = datasets.batches(train_set, [idx]).__next__().to(device)
    delta = sampling_delta(config)
    u_K = sampling.prior(process, x0, delta, gen)
    final, frames = sampling.reverse(ema_model, u_K, process.K, delta, gen, num_frames=40)
    images.save_grid(folder / "samples.png", final.cpu())
    images.save_grid(folder / "prior.png", u_K.cpu())
    images.save_gif(folder / "process.gif", frames)
    if writer is not None:
        writer.add_image("samples", images.to_tensorboard(final.cpu()), step)


Report = Callable[[int, dict], None]


def train(config, workdir: str | Path, report: Report | None = None) -> int:
    """Train (or resume) in ``workdir``; returns an exit code (see :mod:`lintrans.errors`).

    ``report(step, metrics)`` is called on rank 0 after every evaluation and checkpoint (the
    Ray Tune backend forwards it to ``tune.report``; metrics hold ``eval_loss`` and
    ``checkpoint_dir`` where one was just written).
    """
    validate(config)
    workdir = Path(workdir)
    process = create_forward(config)  # fails fast on bad input, before any process group exists
    train_set, eval_set = datasets.load(config)
    info, device = distributed.init()
    try:
        return _train(config, workdir, process.to(device), train_set, eval_set, info, device, report)
    finally:
        distributed.cleanup()


def _train(config, workdir, process, train_set, eval_set, info, device, report: Report | None) -> int:
    rank, world, main = info.rank, info.world_size, info.rank == 0
    gb = config.training.batch_size
    sampler = datasets.GlobalBatchSampler(len(train_set), gb, rank, world, int(config.seed))
    model = build_model(config, device)
    ema = EMA(model, config.model.ema_rate)
    ddp = DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
    )
    opt = make_optimizer(config, model)
    torch.manual_seed(int(config.seed) * 1000 + rank)  # dropout stream, per rank
    start = 0
    meta = checkpoint.meta_path(workdir)
    if meta.is_file():
        check_matches_run(config, workdir)
        state = checkpoint.load(meta, device)
        try:
            model.load_state_dict(state["model"], strict=True)
            ema.load_state_dict(state["ema"])
        except RuntimeError as exc:
            raise UsageError(
                f"checkpoint {meta} does not match this config's model: {str(exc).splitlines()[0]}"
            ) from None
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        rng = state.get("rng", [])
        if len(rng) == world:
            torch.set_rng_state(rng[rank]["cpu"].cpu())
            if device.type == "cuda" and "cuda" in rng[rank]:
                torch.cuda.set_rng_state(rng[rank]["cuda"].cpu())
        if main:
            print(f"resuming from {meta} at step {start}", flush=True)
    sampler.step = start
    batches = datasets.batches(train_set, sampler, config.data.get("num_workers", 0))

    writer = None
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        write_text(workdir / "config.json", to_json(config))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=start)

    def save_checkpoints(step: int, numbered: bool) -> None:
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        all_rng = distributed.all_gather_object(rng)
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise NonFiniteLossError(f"non-finite weights at step {step}; kept the last good checkpoint {meta}")
        if not main:
            return
        state = {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "epoch": step // sampler.steps_per_epoch,
            "data_position": step % sampler.steps_per_epoch,
            "world_size": world,
            "rng": all_rng,
            "config": to_json(config),
        }
        checkpoint.save(meta, state)
        if numbered:
            checkpoint.save(checkpoint.numbered_path(workdir, step), state)

    t = config.training
    precision = t.get("mixed_precision", "no")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    if start == 0:
        loss0 = eval_loss(config, model, process, eval_set, rank, world, device)
        if main:
            writer.add_scalar("eval/loss", loss0, 0)
            print(f"step 0: eval loss {loss0:.4f}", flush=True)

    preempt = Preemption()
    K = config.model.K
    per_level = torch.zeros(2, K + 1, dtype=torch.float64)
    lo, hi = rank * (gb // world), (rank + 1) * (gb // world)
    bar = None
    if main:
        from tqdm import tqdm

        bar = tqdm(total=t.n_iters, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)
    tick, tick_step = time.perf_counter(), start
    model.train()
    for step in range(start, t.n_iters):
        rnd = {key: v[lo:hi] for key, v in step_randomness(config, step, gb, process.shape).items()}
        x0 = augment(next(batches), rnd).to(device, non_blocking=True)
        k = rnd["k"].to(device)
        with autocast:
            per = per_sample_loss(ddp, process, x0, k, rnd["noise"].to(device), config.model.sigma)
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        stats = torch.stack(
            [loss.detach().double(), torch.tensor(float(preempt.requested), dtype=torch.float64, device=device)]
        )
        dist.all_reduce(stats)
        global_loss = stats[0].item() / world
        if not math.isfinite(global_loss):
            raise NonFiniteLossError(
                f"non-finite loss ({global_loss}) at step {step}; stopped without updating the "
                f"weights, last good checkpoint: {meta if meta.is_file() else 'none'}"
            )
        lr = learning_rate(config, step)
        for group in opt.param_groups:
            group["lr"] = lr
        if config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip, foreach=True)
        opt.step()
        ema.update(model)
        done = step + 1
        per_level[0].index_add_(0, k.cpu(), per.detach().double().cpu())
        per_level[1].index_add_(0, k.cpu(), torch.ones(len(k), dtype=torch.float64))

        if main:
            bar.update(1)
            if done % t.log_freq == 0 or done == t.n_iters:
                now = time.perf_counter()
                ips = gb * (done - tick_step) / max(now - tick, 1e-9)
                tick, tick_step = now, done
                writer.add_scalar("train/loss", global_loss, done)
                writer.add_scalar("train/lr", lr, done)
                writer.add_scalar("train/img_per_s", ips, done)
                seen = per_level[1] > 0
                for level in seen.nonzero().flatten().tolist():
                    writer.add_scalar(
                        f"loss_per_level/k{level:04d}", (per_level[0, level] / per_level[1, level]).item(), done
                    )
                per_level.zero_()
                bar.set_postfix(loss=f"{global_loss:.4f}", img_s=f"{ips:.1f}", refresh=False)
        metrics = {}
        if done % t.eval_freq == 0 or done == t.n_iters:
            metrics["eval_loss"] = eval_loss(config, model, process, eval_set, rank, world, device)
            if main:
                writer.add_scalar("eval/loss", metrics["eval_loss"], done)
                bar.write(f"step {done}: eval loss {metrics['eval_loss']:.4f}")
        if main and t.sampling_freq > 0 and (done % t.sampling_freq == 0 or done == t.n_iters):
            write_samples(
                config, ema.model, process, train_set, workdir / "samples" / f"iter_{done}", device, writer, done
            )
        preempted = stats[1].item() > 0
        if preempted or done % t.snapshot_freq_for_preemption == 0 or done % t.snapshot_freq == 0 or done == t.n_iters:
            save_checkpoints(done, numbered=done % t.snapshot_freq == 0)
            metrics["checkpoint_dir"] = str(meta.parent)
        if main and report is not None and metrics:
            report(done, {"train_loss": global_loss, **metrics})
        if preempted:
            if main:
                bar.write(f"preemption signal: checkpoint written at step {done}, exiting with {EXIT_PREEMPTED}")
                bar.close()
                writer.close()
            return EXIT_PREEMPTED
    if main:
        bar.close()
        writer.close()
    return EXIT_OK


def run(config, workdir: str | Path) -> int:
    """:func:`train` with a non-finite loss turned into its exit code (message on stderr)."""
    import sys

    try:
        return train(config, workdir)
    except NonFiniteLossError as exc:
        if distributed.is_main():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
