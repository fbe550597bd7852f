"""Training: :func:`train` validates a config once; :func:`training_loop` runs on plain values.

One readable DDP loop for 1 or N processes (``python``, ``torchrun``, ``mpirun``, ``srun``): the
step itself is :class:`lintrans.step.TrainStep`; this module orchestrates resume, logging,
held-out evaluation, samples, checkpoints and preemption.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import ml_collections
import torch
import torch.distributed as dist

from lintrans import config as cfg
from lintrans import datasets, distributed, images, monitor, sampling
from lintrans.device import use_bf16
from lintrans.ema import EMA
from lintrans.errors import NonFiniteLossError
from lintrans.forward import ForwardProcess, create_forward
from lintrans.loss import per_sample_loss, sample_levels
from lintrans.model import build_model, load_weights, make_optimizer
from lintrans.procenv import EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED
from lintrans.run import Run
from lintrans.step import TrainStep

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
Report = Callable[[int, dict], None]


class Preemption:
    """While active, SIGUSR1/SIGUSR2/SIGTERM only set a flag: the loop finishes its step, checkpoints, exits 75.

    The previous handlers come back on exit, so a signal during a trial's evaluations is not
    swallowed by a loop that has already ended.
    """

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # Ray may run trainables in threads
            self.previous = {sig: signal.signal(sig, self._handle) for sig in PREEMPT_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.requested = True


@torch.no_grad()
def held_out_loss(
    model, process: ForwardProcess, eval_set, *, seed: int, sigma: float, batch_size: int, num_batches: int,
    device: torch.device,
) -> float:  # fmt: skip
    """Mean per-sample loss over the first ``num_batches`` held-out batches, with fixed randomness.

    Levels, noise and (for a stochastic process) ``theta`` are drawn for all ``n`` images at once,
    so the figure does not depend on the world size.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    n = min(len(eval_set), batch_size * num_batches)
    gen = torch.Generator().manual_seed(seed + 12345)
    k_all = sample_levels(n, process.K, gen)
    noise_all = torch.randn((n, *process.shape), generator=gen)
    theta_all = process.sample_theta(n, gen)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for start in range(rank * batch_size, n, world * batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        x0 = eval_set.batch(idx).to(device)
        theta = None if theta_all is None else theta_all[idx].to(device)
        per = per_sample_loss(model, process, x0, k_all[idx].to(device), noise_all[idx].to(device), sigma, theta)
        total += torch.stack([per.sum().double(), torch.tensor(float(len(idx)), device=device, dtype=torch.float64)])
    model.train(was_training)
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def write_samples(
    ema_model, process: ForwardProcess, train_set, folder: Path, *, n: int, delta: float, seed: int,
    device: torch.device,
) -> torch.Tensor:  # fmt: skip
    """Sample grid, prior grid and reverse-process GIF from the EMA model; returns the samples."""
    gen = torch.Generator(device=device).manual_seed(seed + 777)
    idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed + 778))[:n]
    theta = sampling.draw_theta(process, len(idx), gen)
    u_K = sampling.prior(process, train_set.batch(idx).to(device), delta, gen, theta)
    final, frames = sampling.reverse(ema_model, u_K, process.K, delta, gen, num_frames=40, theta=theta)
    images.save_grid(folder / "samples.png", final.cpu())
    images.save_grid(folder / "prior.png", u_K.cpu())
    images.save_gif(folder / "process.gif", frames)
    return final.cpu()


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    config_file: str | Path,
    overrides: dict,
    report: Report | None = None,
) -> int:
    """Train (or resume) in ``workdir``; returns an exit code (see :mod:`lintrans.errors`).

    This is the edge: the config is validated here, once, and the loop gets plain values.
    ``report(step, metrics)`` is called on rank 0 at every log step, evaluation and checkpoint;
    ``metrics`` always holds the latest ``eval_loss`` and the ``n_iters`` to reach.
    """
    cfg.validate(config)
    run = Run(Path(workdir))
    run.check_writable()
    if run.meta.is_file():
        run.check_matches(config)
    process = create_forward(**cfg.forward_args(config))  # bad input fails before any process group exists
    train_set, eval_set = datasets.load(config)
    info, device = distributed.init(config.device)
    if info.rank == 0:
        run.remove_temp_files()
        run.write_config(config, config_file, overrides)
    t, m = config.training, config.model
    try:
        return training_loop(
            run=run,
            process=process.to(device),
            train_set=train_set,
            eval_set=eval_set,
            model_args=cfg.model_args(config),
            optim_args=cfg.optim_args(config),
            config_json=cfg.to_json(config),
            seed=config.seed,
            sigma=m.sigma,
            delta=cfg.sampling_delta(config),
            ema_rate=m.ema_rate,
            batch_size=t.batch_size,
            n_iters=t.n_iters,
            warmup=config.optim.warmup,
            grad_clip=config.optim.grad_clip,
            random_flip=config.data.random_flip,
            dequantization=config.data.uniform_dequantization,
            bf16=use_bf16(t.mixed_precision, device),
            num_workers=config.data.num_workers,
            log_freq=t.log_freq,
            eval_freq=t.eval_freq,
            eval_batch_size=config.eval.batch_size,
            eval_num_batches=config.eval.num_batches,
            sampling_freq=t.sampling_freq,
            num_samples=t.num_samples,
            snapshot_freq=t.snapshot_freq,
            snapshot_freq_for_preemption=t.snapshot_freq_for_preemption,
            rank=info.rank,
            world=info.world_size,
            device=device,
            report=report,
        )
    finally:
        distributed.cleanup()


def training_loop(
    *,
    run: Run,
    process: ForwardProcess,
    train_set,
    eval_set,
    model_args: dict,
    optim_args: dict,
    config_json: str,
    seed: int,
    sigma: float,
    delta: float,
    ema_rate: float,
    batch_size: int,
    n_iters: int,
    warmup: int,
    grad_clip: float,
    random_flip: bool,
    dequantization: bool,
    bf16: bool,
    num_workers: int,
    log_freq: int,
    eval_freq: int,
    eval_batch_size: int,
    eval_num_batches: int,
    sampling_freq: int,
    num_samples: int,
    snapshot_freq: int,
    snapshot_freq_for_preemption: int,
    rank: int,
    world: int,
    device: torch.device,
    report: Report | None = None,
) -> int:
    # Build: network (same initial weights on every rank), EMA, optimizer, the step, the data order.
    model = build_model(model_args, seed, device)
    ema = EMA(model, ema_rate)
    opt = make_optimizer(model.parameters(), **optim_args)
    step_fn = TrainStep(
        model=model, ema=ema, optimizer=opt, process=process, sigma=sigma, seed=seed, global_batch=batch_size,
        lr=optim_args["lr"], warmup=warmup, grad_clip=grad_clip, random_flip=random_flip,
        dequantization=dequantization, bf16=bf16, device=device,
    )  # fmt: skip
    sampler = datasets.GlobalBatchSampler(len(train_set), batch_size, rank, world, seed)
    torch.manual_seed(seed * 1000 + rank)  # dropout stream, per rank

    # Resume from checkpoints-meta: weights, EMA, optimizer, step, every rank's RNG state.
    start = 0
    if run.meta.is_file():
        state = run.load(run.meta, device)
        load_weights(model, state["model"], run.meta)
        load_weights(ema.model, state["ema"], run.meta)
        ema.num_updates = int(state.get("ema_num_updates", state["step"]))
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        if len(state.get("rng", [])) == world:
            torch.set_rng_state(state["rng"][rank]["cpu"].cpu())
            if device.type == "cuda" and "cuda" in state["rng"][rank]:
                torch.cuda.set_rng_state(state["rng"][rank]["cuda"].cpu())
    sampler.step = start
    batches = datasets.batches(train_set, sampler, num_workers)
    log = monitor.create(rank, run.workdir, start, n_iters)
    if start:
        log.info(f"resuming from {run.meta} at step {start}")

    def evaluate() -> float:
        return held_out_loss(model, process, eval_set, seed=seed, sigma=sigma, batch_size=eval_batch_size,
                             num_batches=eval_num_batches, device=device)  # fmt: skip

    def checkpoint(step: int) -> None:
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if device.type == "cuda" else {})}
        all_rng = distributed.all_gather_object(rng)
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise NonFiniteLossError(f"non-finite weights at step {step}; kept the last good checkpoint {run.meta}")
        if rank == 0:
            state = {
                "model": model.state_dict(), "ema": ema.state_dict(), "ema_num_updates": ema.num_updates,
                "optimizer": opt.state_dict(), "step": step, "epoch": step // sampler.steps_per_epoch,
                "data_position": step % sampler.steps_per_epoch, "world_size": world, "rng": all_rng,
                "config": config_json,
            }  # fmt: skip
            run.save(state, numbered_step=step if step % snapshot_freq == 0 else None)

    last_eval = evaluate() if start == 0 else float("nan")
    if start == 0:
        log.scalars({"eval/loss": last_eval}, 0)
        log.info(f"step 0: eval loss {last_eval:.4f}")
    per_level = torch.zeros(2, process.K + 1, dtype=torch.float64)
    tick, tick_step = time.perf_counter(), start
    model.train()
    with Preemption() as preempt:
        for step in range(start, n_iters):
            # One optimisation step (all ranks agree on whether a stop was requested).
            try:
                out = step_fn(step, next(batches), preempt.requested)
            except NonFiniteLossError as exc:
                last = run.meta if run.meta.is_file() else "none"
                raise NonFiniteLossError(f"{exc}; last good checkpoint: {last}") from None
            done = step + 1
            per_level[0].index_add_(0, out.k.cpu(), out.per_sample.double().cpu())
            per_level[1].index_add_(0, out.k.cpu(), torch.ones(len(out.k), dtype=torch.float64))
            metrics: dict = {}

            # Log: loss, lr, throughput, per-level loss.
            if done % log_freq == 0 or done == n_iters:
                now = time.perf_counter()
                ips = batch_size * (done - tick_step) / max(now - tick, 1e-9)
                tick, tick_step = now, done
                seen = (per_level[1] > 0).nonzero().flatten().tolist()
                levels = {f"loss_per_level/k{k:04d}": (per_level[0, k] / per_level[1, k]).item() for k in seen}
                log.scalars({"train/loss": out.loss, "train/lr": out.lr, "train/img_per_s": ips, **levels}, done)
                per_level.zero_()
                metrics["img_per_s"] = ips
            log.advance(loss=f"{out.loss:.4f}")

            # Held-out loss.
            if done % eval_freq == 0 or done == n_iters:
                last_eval = evaluate()
                log.scalars({"eval/loss": last_eval}, done)
                log.info(f"step {done}: eval loss {last_eval:.4f}")
                metrics["evaluated"] = True

            # Samples from the EMA model (rank 0 draws them).
            if log.enabled and sampling_freq > 0 and (done % sampling_freq == 0 or done == n_iters):
                final = write_samples(ema.model, process, train_set, run.workdir / "samples" / f"iter_{done}",
                                      n=num_samples, delta=delta, seed=seed, device=device)  # fmt: skip
                log.image("samples", images.to_tensorboard(final), done)

            # Checkpoint: for preemption, numbered snapshots, the end, or because a stop was requested.
            if out.stop or done % snapshot_freq_for_preemption == 0 or done % snapshot_freq == 0 or done == n_iters:
                checkpoint(done)
                metrics["checkpoint"] = str(run.meta)
            if report is not None and rank == 0 and metrics:
                report(done, {"train_loss": out.loss, "eval_loss": last_eval, "n_iters": n_iters, **metrics})

            if out.stop:
                log.info(f"preemption signal: checkpoint written at step {done}, exiting with {EXIT_PREEMPTED}")
                log.close()
                return EXIT_PREEMPTED
    log.close()
    return EXIT_OK


def run_cli(config: ml_collections.ConfigDict, workdir: str | Path, config_file: str | Path, overrides: dict) -> int:
    """:func:`train` with a non-finite loss turned into its exit code (message on stderr)."""
    try:
        return train(config, workdir, config_file=config_file, overrides=overrides)
    except NonFiniteLossError as exc:
        if distributed.is_main():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
