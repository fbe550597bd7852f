"""Training: :func:`train` validates a config once; :func:`training_loop` runs on plain values.

One readable DDP loop for 1 or N processes (``python``, ``torchrun``, ``mpirun``, ``srun``): the
step itself is :class:`lintrans.step.TrainStep`; this module orchestrates resume, logging,
held-out evaluation, samples, checkpoints and preemption.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ml_collections
import torch
import torch.distributed as dist
from torch import nn

from lintrans import config as cfg
from lintrans import datasets, distributed, images, monitor, provenance, sampling, trackers
from lintrans.atomic import write_json
from lintrans.device import inference_network, use_bf16, use_compile
from lintrans.ema import EMA
from lintrans.errors import NonFiniteLossError
from lintrans.forward import ForwardProcess, create_forward
from lintrans.gaussian_prior import GaussianFit, fit_limit
from lintrans.loss import per_sample_loss, sample_levels
from lintrans.model import build_model, load_weights, make_optimizer
from lintrans.monitor import Report
from lintrans.procenv import EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED
from lintrans.run import Run
from lintrans.step import TrainStep

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
FIT_BATCH = 256  # images per batch of the one-pass fits before training


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
    so the figure does not depend on the world size. ``model`` is called as given: the trainer passes
    the network in the training's precision (:func:`lintrans.device.inference_network`), so a bf16 run's
    held-out loss is a bf16 network's, with fp32 states and fp64 sums.
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
    device: torch.device, log: monitor.Monitor, step: int, gaussian: GaussianFit | None,
) -> None:  # fmt: skip
    """Sample grid, prior grid and reverse-process GIF from the EMA model (in the training's precision); the grid
    goes to the trackers too.

    The prior is ``gaussian`` where given, else IHDM's over ``train_set``.
    """
    gen = torch.Generator(device=device).manual_seed(seed + 777)
    prior = sampling.prior_for(process, delta, device, fit=gaussian, train_set=train_set, seed=seed + 778)
    n = min(n, len(train_set))  # a grid of at most one sample per training image, as IHDM's
    theta = sampling.draw_theta(process, n, gen)
    u_K = prior.draw(n, gen, theta)
    final, frames = sampling.reverse(ema_model, u_K, process.K, delta, gen, num_frames=40, theta=theta)
    images.save_grid(folder / "samples.png", final.cpu())
    images.save_grid(folder / "prior.png", u_K.cpu())
    images.save_gif(folder / "process.gif", frames)
    log.image("samples", images.grid(final.cpu()), step)


@dataclass(frozen=True)
class Schedule:
    """Which phases follow step ``done`` (counted from 1): each every ``*_freq`` steps, and all of them at the end."""

    n_iters: int
    log_freq: int
    eval_freq: int
    sampling_freq: int  # 0: never
    snapshot_freq: int  # numbered snapshots, all kept
    snapshot_freq_for_preemption: int  # checkpoints-meta only, overwritten

    def _every(self, done: int, freq: int) -> bool:
        return done % freq == 0 or done == self.n_iters

    def log(self, done: int) -> bool:
        return self._every(done, self.log_freq)

    def evaluate(self, done: int) -> bool:
        return self._every(done, self.eval_freq)

    def sample(self, done: int) -> bool:
        return self.sampling_freq > 0 and self._every(done, self.sampling_freq)

    def checkpoint(self, done: int) -> bool:
        return self._every(done, self.snapshot_freq_for_preemption) or self.numbered(done)

    def numbered(self, done: int) -> bool:
        return done % self.snapshot_freq == 0


@dataclass
class TrainState:
    """What training changes and a checkpoint keeps (with the step and the RNG states): network, EMA, optimizer."""

    model: nn.Module
    ema: EMA
    opt: torch.optim.Optimizer


def resume(run: Run, net: TrainState, *, rank: int, world: int, device: torch.device) -> int:
    """Load ``checkpoints-meta`` into ``net`` and this rank's RNG state; returns its step (0: no checkpoint yet).

    The RNG state (the dropout stream) comes back only under the world size that saved it.
    """
    if not run.meta.is_file():
        return 0
    state = run.load(run.meta, device)
    load_weights(net.model, state["model"], run.meta)
    load_weights(net.ema.model, state["ema"], run.meta)
    net.ema.num_updates = int(state.get("ema_num_updates", state["step"]))
    net.opt.load_state_dict(state["optimizer"])
    if len(state.get("rng", [])) == world:
        torch.set_rng_state(state["rng"][rank]["cpu"].cpu())
        if device.type == "cuda" and "cuda" in state["rng"][rank]:
            torch.cuda.set_rng_state(state["rng"][rank]["cuda"].cpu())
    return int(state["step"])


def save_checkpoint(
    run: Run, net: TrainState, step: int, *, numbered: bool, steps_per_epoch: int, world: int, device: torch.device,
    config_json: str, log: monitor.Monitor,
) -> None:  # fmt: skip
    """Collective: every rank's RNG state is gathered, rank 0 writes ``checkpoints-meta`` (and snapshot ``step``).

    Non-finite weights raise :class:`NonFiniteLossError` on every rank and write nothing.
    """
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if device.type == "cuda" else {})}
    all_rng = distributed.all_gather_object(rng)
    if not all(torch.isfinite(p).all() for p in net.model.parameters()):
        raise NonFiniteLossError(f"non-finite weights at step {step}; kept the last good checkpoint {run.meta}")
    state = {
        "model": net.model.state_dict(), "ema": net.ema.state_dict(), "ema_num_updates": net.ema.num_updates,
        "optimizer": net.opt.state_dict(), "step": step, "epoch": step // steps_per_epoch,
        "data_position": step % steps_per_epoch, "world_size": world, "rng": all_rng, "config": config_json,
    }  # fmt: skip
    log.write(run.save, state, numbered_step=step if numbered else None)


class LevelLoss:
    """Sum and count of the per-sample loss at each level ``0..K`` since the last log line."""

    def __init__(self, K: int) -> None:
        self.sums = torch.zeros(2, K + 1, dtype=torch.float64)

    def add(self, k: torch.Tensor, per_sample: torch.Tensor) -> None:
        self.sums[0].index_add_(0, k.cpu(), per_sample.double().cpu())
        self.sums[1].index_add_(0, k.cpu(), torch.ones(len(k), dtype=torch.float64))

    def pop(self) -> dict[str, float]:
        """``loss_per_level/kNNNN`` for each level seen, then start over."""
        seen = (self.sums[1] > 0).nonzero().flatten().tolist()
        means = {f"loss_per_level/k{k:04d}": (self.sums[0, k] / self.sums[1, k]).item() for k in seen}
        self.sums.zero_()
        return means


class Throughput:
    """Images per second since the last call (``batch_size`` images per step)."""

    def __init__(self, batch_size: int, step: int) -> None:
        self.batch_size, self.step, self.time = batch_size, step, time.perf_counter()

    def __call__(self, step: int) -> float:
        now = time.perf_counter()
        ips = self.batch_size * (step - self.step) / max(now - self.time, 1e-9)
        self.step, self.time = step, now
        return ips


def loop_settings(config: ml_collections.ConfigDict, device: torch.device, label: trackers.Label) -> dict:
    """The plain values :func:`training_loop` takes from a validated config (and the trackers' ``label``)."""
    t, m, d = config.training, config.model, config.data
    resolved = json.loads(cfg.to_json(config))
    return {
        "tracking": {**cfg.logging_args(config), "label": label, "params": cfg.flatten(resolved)},
        "model_args": cfg.model_args(config), "optim_args": cfg.optim_args(config), "config_json": cfg.to_json(config),
        "seed": config.seed, "ema_rate": m.ema_rate, "sigma": m.sigma, "batch_size": t.batch_size,
        "warmup": config.optim.warmup, "grad_clip": config.optim.grad_clip, "bf16": use_bf16(t.mixed_precision, device),
        "compile": use_compile(t.get("compile", "auto"), device, training=True),
        "random_flip": d.random_flip, "dequantization": d.uniform_dequantization, "num_workers": d.num_workers,
        "n_iters": t.n_iters, "log_freq": t.log_freq, "eval_freq": t.eval_freq, "sampling_freq": t.sampling_freq,
        "snapshot_freq": t.snapshot_freq, "snapshot_freq_for_preemption": t.snapshot_freq_for_preemption,
        "eval_batch_size": config.eval.batch_size, "eval_num_batches": config.eval.num_batches,
        "num_samples": t.num_samples, "delta": cfg.sampling_delta(config),
    }  # fmt: skip


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    config_file: str | Path,
    overrides: dict,
    report: Report | None = None,
    label: trackers.Label | None = None,
) -> int:
    """Train (or resume) in ``workdir``; returns an exit code (see :mod:`lintrans.procenv`).

    This is the edge: the config is validated here, once, and the loop gets plain values.
    ``report(step, metrics)`` is called on rank 0 at every log step, evaluation and checkpoint;
    ``metrics`` always holds the latest ``eval_loss`` and the ``n_iters`` to reach. ``label`` names
    the run in MLflow and W&B (a sweep's trial passes its sweep and id).
    """
    cfg.validate(config)
    run = Run(Path(workdir))
    run.check_writable()
    if run.meta.is_file():
        run.check_matches(config)
    process = create_forward(**cfg.forward_args(config))  # bad input fails before any process group exists
    train_set, eval_set = datasets.load(config)
    info, device = distributed.init(config.device)
    if process.fitted_to_data:
        fit_forward(run, process, train_set, info.rank)
    settings = loop_settings(config, device, label or trackers.Label())
    gaussian = None  # rank 0 draws the sample grids, so only it needs the prior
    if info.rank == 0:
        run.remove_temp_files()
        run.write_config(config, config_file, overrides)
        facts = provenance.collect(device, settings["bf16"], info.world_size, settings["compile"])
        write_json(run.workdir / provenance.FILE, facts)
        if cfg.sampling_prior(config) == "gaussian":
            gaussian = run.load_prior() or fit_and_save_prior(run, process.to(device), train_set, config, device)
    try:
        return training_loop(
            run=run, process=process.to(device), train_set=train_set, eval_set=eval_set, rank=info.rank,
            world=info.world_size, device=device, report=report, gaussian=gaussian, **settings,
        )  # fmt: skip
    finally:
        distributed.cleanup()


def fit_forward(run: Run, process: ForwardProcess, train_set, rank: int) -> None:
    """Give a process fitted to the data its state: the run's stored one, else rank 0 fits and stores it.

    Collective where it fits: every rank then takes rank 0's state, so all train the same ``T``
    even where their floating point would differ, and a resumed run never refits.
    """
    state = run.load_forward_state()
    if state is None:
        if rank == 0:
            process.fit_data(datasets.in_batches(train_set, FIT_BATCH))
            run.save_forward_state(process)
        state = distributed.all_gather_object(process.state_dict() if rank == 0 else None)[0]
    process.load_state_dict(state)


def fit_and_save_prior(
    run: Run, process: ForwardProcess, train_set, config: ml_collections.ConfigDict, device: torch.device
) -> GaussianFit:
    """Fit ``sampling.prior=gaussian``'s ``N(mu, Sigma)`` to ``T(K) u_0`` once, before training, and store it.

    Before: the fit depends only on the process and the data, and ``sample.py`` and the sample grids
    need it from the first checkpoint on. A resumed run loads the stored one instead.
    """
    fit = fit_limit(process, train_set, device=device, batch_size=FIT_BATCH, **cfg.prior_fit_args(config))
    run.save_prior(fit)
    return fit


def training_loop(
    *,
    run: Run, process: ForwardProcess, train_set, eval_set, config_json: str,  # what is trained, and where
    model_args: dict, optim_args: dict, ema_rate: float, seed: int,  # the network, its EMA and optimizer
    sigma: float, batch_size: int, warmup: int, grad_clip: float, bf16: bool, compile: bool,  # the step
    random_flip: bool, dequantization: bool, num_workers: int,  # the data
    n_iters: int, log_freq: int, eval_freq: int, sampling_freq: int, snapshot_freq: int,  # the schedule
    snapshot_freq_for_preemption: int,
    eval_batch_size: int, eval_num_batches: int, num_samples: int, delta: float,  # held-out loss, samples
    tracking: dict,  # the trackers: lintrans.trackers.open_training's keywords
    rank: int, world: int, device: torch.device, report: Report | None = None,  # this process
    gaussian: GaussianFit | None = None,  # the samples' prior (None: IHDM's over the training set)
) -> int:  # fmt: skip
    """Train ``run`` from its checkpoint (or from scratch) to ``n_iters``; returns EXIT_OK or EXIT_PREEMPTED.

    Every rank runs the same code; what only rank 0 does (log, write files, ``report``) goes through ``log``.
    """
    # Build: network (same initial weights on every rank), EMA, optimizer, the step, the data order.
    model = build_model(model_args, seed, device)
    net = TrainState(model, EMA(model, ema_rate), make_optimizer(model.parameters(), **optim_args))
    step_fn = TrainStep(
        model=model, ema=net.ema, optimizer=net.opt, process=process, sigma=sigma, seed=seed, global_batch=batch_size,
        lr=optim_args["lr"], warmup=warmup, grad_clip=grad_clip, random_flip=random_flip,
        dequantization=dequantization, bf16=bf16, compile=compile, device=device,
    )  # fmt: skip
    sampler = datasets.GlobalBatchSampler(len(train_set), batch_size, rank, world, seed)
    torch.manual_seed(seed * 1000 + rank)  # dropout stream, per rank

    # Resume from checkpoints-meta: weights, EMA, optimizer, step, every rank's RNG state.
    start = sampler.step = resume(run, net, rank=rank, world=world, device=device)
    batches = datasets.batches(train_set, sampler, num_workers)
    log = monitor.create(rank, run.workdir, start, n_iters, tracking, report)
    if start:
        log.info(f"resuming from {run.meta} at step {start}")

    # The phases that follow a step when the schedule says so.
    when = Schedule(n_iters, log_freq, eval_freq, sampling_freq, snapshot_freq, snapshot_freq_for_preemption)

    def evaluate(done: int) -> float:
        network = inference_network(model, bf16, device).train(model.training)  # the training's precision
        loss = held_out_loss(network, process, eval_set, seed=seed, sigma=sigma, batch_size=eval_batch_size,
                             num_batches=eval_num_batches, device=device)  # fmt: skip
        log.scalars({"eval/loss": loss}, done)
        log.info(f"step {done}: eval loss {loss:.4f}")
        return loss

    def sample(done: int) -> None:
        ema = inference_network(net.ema.model, bf16, device)
        log.write(write_samples, ema, process, train_set, run.workdir / "samples" / f"iter_{done}", n=num_samples,
                  delta=delta, seed=seed, device=device, log=log, step=done, gaussian=gaussian)  # fmt: skip

    def checkpoint(done: int) -> None:
        save_checkpoint(run, net, done, numbered=when.numbered(done), steps_per_epoch=sampler.steps_per_epoch,
                        world=world, device=device, config_json=config_json, log=log)  # fmt: skip

    try:
        last_eval = evaluate(0) if start == 0 else float("nan")  # the initial weights' held-out loss
        model.train()
        return train_steps(step_fn, batches, range(start, n_iters), when=when, levels=process.K,
                           batch_size=batch_size, run=run, log=log, last_eval=last_eval, evaluate=evaluate,
                           sample=sample, checkpoint=checkpoint)  # fmt: skip
    finally:
        log.close()


def train_steps(
    step_fn: TrainStep, batches, steps: range, *, when: Schedule, levels: int, batch_size: int, run: Run,
    log: monitor.Monitor, last_eval: float, evaluate: Callable[[int], float], sample: Callable[[int], None],
    checkpoint: Callable[[int], None],
) -> int:  # fmt: skip
    """Each step, then the phases due after it; :data:`EXIT_PREEMPTED` once a stop signal is checkpointed."""
    per_level, throughput = LevelLoss(levels), Throughput(batch_size, steps.start)
    with Preemption() as preempt:
        for step in steps:
            # One optimisation step (all ranks agree on whether a stop was requested).
            try:
                out = step_fn(step, next(batches), preempt.requested)
            except NonFiniteLossError as exc:
                last = run.meta if run.meta.is_file() else "none"
                raise NonFiniteLossError(f"{exc}; last good checkpoint: {last}") from None
            done = step + 1
            per_level.add(out.k, out.per_sample)
            metrics: dict = {}

            # Log: loss, lr, throughput, per-level loss.
            if when.log(done):
                metrics["img_per_s"] = ips = throughput(done)
                log.scalars(
                    {"train/loss": out.loss, "train/lr": out.lr, "train/img_per_s": ips, **per_level.pop()}, done
                )
            log.advance(loss=f"{out.loss:.4f}")

            # Held-out loss; samples from the EMA model (rank 0 draws them).
            if when.evaluate(done):
                last_eval, metrics["evaluated"] = evaluate(done), True
            if when.sample(done):
                sample(done)

            # Checkpoint: for preemption, numbered snapshots, the end, or because a stop was requested.
            if out.stop or when.checkpoint(done):
                checkpoint(done)
                metrics["checkpoint"] = str(run.meta)
            if metrics:
                log.report(done, {"train_loss": out.loss, "eval_loss": last_eval, "n_iters": when.n_iters, **metrics})
            if out.stop:
                log.info(f"preemption signal: checkpoint written at step {done}, exiting with {EXIT_PREEMPTED}")
                return EXIT_PREEMPTED
    return EXIT_OK


def run_cli(config: ml_collections.ConfigDict, workdir: str | Path, config_file: str | Path, overrides: dict) -> int:
    """:func:`train` with a non-finite loss turned into its exit code (message on stderr)."""
    try:
        return train(config, workdir, config_file=config_file, overrides=overrides)
    except NonFiniteLossError as exc:
        if distributed.is_main():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
