"""Shared helpers for the benchmarks: repository path, machine facts, timing, result files, the training step.

The training step is :class:`lintrans.step.TrainStep` itself, built by :func:`train_step` from the
components ``training_loop`` builds it from; its ``timer`` hook (:class:`PhaseTimer`) gives the
per-phase times. There is no copy of the step here.

Every benchmark writes ``bench/results/<name>.json`` (figures + machine + commit + command) and
``bench/results/<name>.md`` (a short human summary). Benchmarks are scripts, never timed tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("LINTRANS_BENCH_RESULTS", ROOT / "bench" / "results"))  # bench/gpu.sh --out sets it
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lintrans import provenance  # noqa: E402 - the repository goes on sys.path first


def machine(device: str = "cpu") -> dict:
    """Facts of this machine and process, for the result files; called before anything is timed.

    It also sets the process up as every lintrans entry point does (``keep_freed_memory``), so that a
    bench times what ``train.py``, ``sample.py`` and a sweep's trials run (``bench/malloc.py`` times
    the difference, in child processes that do not call this).
    """
    import torch

    from lintrans.procenv import keep_freed_memory

    info = {
        "host": platform.node(),
        "cpu": provenance.cpu_model(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": provenance.commit() or "unknown",
        "loadavg_at_start": os.getloadavg(),
        "keeps_freed_memory": keep_freed_memory(),
        "env": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "KMP_BLOCKTIME", "CUDA_VISIBLE_DEVICES")
            if k in os.environ
        },
    }
    try:
        flags = Path("/proc/cpuinfo").read_text()
        info["cpu_isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    except OSError:
        pass
    return info


def device(request: str):
    """This process's device and process group (world size 1 unless under ``torchrun``), as the trainer sets them up."""
    from lintrans import distributed

    return distributed.init(request)[1]


def sync(device) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], device, warmup: int, repeats: int, min_time: float = 0.0) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (device-synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    start_all = time.perf_counter()
    while len(out) < repeats or time.perf_counter() - start_all < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def compile_time(first_s: float, median_s: float, compiled: bool) -> float | None:
    """A compiled variant's compile time: its first call's excess over a steady one (None when eager)."""
    return max(first_s - median_s, 0.0) if compiled else None


def spread(values: list[float]) -> dict:
    """Median, min, max and count of per-round figures (ratios within a round, img/s)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def reverse_run(model, process, K: int, batch: int, shape, delta: float, device, bf16: bool, compiled: bool = False):
    """A full K-step reverse run of ``batch`` images as a call: the path of ``sample.py``, FID's samples and the
    sample grids (:func:`lintrans.device.inference_network`, ``sampling.prior`` + ``sampling.reverse``)."""
    import torch

    from lintrans import sampling
    from lintrans.device import inference_network

    net = inference_network(model, bf16, device, compiled)
    x0 = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)

    def run():
        gen = torch.Generator(device=device).manual_seed(0)
        return sampling.reverse(net, sampling.prior(process, x0, delta, gen), K, delta, gen)

    return run


def summarise(samples: list[float]) -> dict:
    return {
        "median_s": statistics.median(samples),
        "mean_s": statistics.fmean(samples),
        "min_s": min(samples),
        "stdev_s": statistics.stdev(samples) if len(samples) > 1 else 0.0,
        "n": len(samples),
    }


def matmul_peak(device, dtype, n: int | None = None, seconds: float = 2.0) -> dict:
    """Dense matmul peak: best FLOP/s of ``n x n @ n x n`` over ``seconds`` (after warm-up).

    ``n`` defaults to 8192 on a GPU (smaller products do not reach its peak) and 2048 on a CPU.
    """
    import torch

    if n is None:
        n = 8192 if getattr(device, "type", device) == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=c)
    sync(device)
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        times.append(time.perf_counter() - t0)
    best = min(times)
    flops = 2.0 * n**3
    return {
        "n": n,
        "dtype": str(dtype).replace("torch.", ""),
        "flop_s": flops / best,
        "median_flop_s": flops / statistics.median(times),
        "calls": len(times),
    }


def fmt_rate(x: float | None, unit: str = "FLOP/s") -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv])


def md_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table of positional rows, through the project's renderer (:func:`lintrans.table_format.render`)."""
    from lintrans.table_format import render

    return render([dict(zip(header, r, strict=True)) for r in rows], header)


def write_results(name: str, data: dict, markdown: str, folder: Path = RESULTS) -> tuple[Path, Path]:
    """``bench/results/<name>.json`` and ``.md`` (written whole, then renamed; ``folder``: elsewhere)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "command": command_line(), **data}
    paths = []
    for suffix, text in ((".json", json.dumps(data, indent=2, default=str) + "\n"), (".md", markdown)):
        path = folder / f"{name}{suffix}"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        paths.append(path)
    print(f"wrote {paths[0]} and {paths[1]}")
    return paths[0], paths[1]


def header_md(title: str, info: dict) -> str:
    return (
        f"# {title}\n\n"
        f"- machine: {info['cpu']} ({info['cpus']} CPUs, {info['torch_threads']} torch threads)"
        f"{', GPU ' + info['gpu'] if info.get('gpu') else ', no GPU'}\n"
        f"- torch {info['torch']}, python {info['python']}, commit {info['commit']}, {info['date']}\n"
        f"- environment: {' '.join(f'{k}={v}' for k, v in info['env'].items()) or '(no OMP/MKL variables set)'}\n"
        f"- command: `{command_line()}`\n"
        f"- CPU instruction sets (of avx2, avx512f, avx512_bf16, amx_bf16): {', '.join(info.get('cpu_isa', [])) or '-'}"
        "\n"
        f"- freed memory kept for reuse (`lintrans.procenv.keep_freed_memory`, as every entry point does): "
        f"{'yes' if info.get('keeps_freed_memory') else 'no'}\n"
        f"- load average (1/5/15 min) at start: {' / '.join(f'{x:.2f}' for x in info['loadavg_at_start'])}"
        f", at end: {' / '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes share the 2 cores)\n\n"
    )


def trainer_args(config: str, workdir: Path, steps: int, batch_size: int, precision: str) -> list[str]:
    """``train.py`` on mnist5k as a user runs it, without sample grids; callers add their cadences."""
    return [
        "train.py",
        f"--config={config}",
        f"--workdir={workdir}",
        "--config.data.dataset=mnist5k",
        f"--config.training.n_iters={steps}",
        f"--config.training.batch_size={batch_size}",
        f"--config.training.mixed_precision={precision}",
        "--config.training.sampling_freq=0",
    ]


def steady_median(values: list[float]) -> float | None:
    """Median of a per-interval series with the first interval (warm-up) dropped when there are more."""
    steady = values[1:] if len(values) > 1 else values
    return statistics.median(steady) if steady else None


# ----------------------------------------------------------------------------- the real training step

PHASES = ("forward_process", "optimizer", "ema")  # the phases TrainStep hands to its timer


class PhaseTimer:
    """``TrainStep``'s ``timer``: device-synchronised seconds per phase, summed while ``on``."""

    def __init__(self, device) -> None:
        self.device, self.on, self.seconds = device, False, dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.on:
            yield
            return
        sync(self.device)
        t0 = time.perf_counter()
        yield
        sync(self.device)
        self.seconds[name] += time.perf_counter() - t0


@dataclass
class Step:
    """``step()``: the next batch through :class:`lintrans.step.TrainStep`, as the training loop feeds it."""

    run: Callable
    batches: Iterator
    timer: PhaseTimer
    index: int = 0

    def __call__(self):
        out = self.run(self.index, next(self.batches))
        self.index += 1
        return out

    def breakdown(self, steps: int) -> tuple[dict[str, float], list[float]]:
        """Seconds of each phase summed over ``steps`` device-synchronised steps, and each step's seconds."""
        self.timer.seconds, self.timer.on = dict.fromkeys(PHASES, 0.0), True
        try:
            return self.timer.seconds, time_calls(self, self.timer.device, 0, steps)
        finally:
            self.timer.on = False


def train_step(
    config, device, train_set, bf16: bool = False, channels_last: bool = False, fused_adam: bool = False,
    compile: bool = False,
):  # fmt: skip
    """The :class:`~lintrans.step.TrainStep` of ``training_loop``, from the components it builds it from.

    ``compile`` is ``training.compile`` resolved on. What-ifs change only what goes in: ``channels_last``
    converts the model (and each batch) to NHWC; ``fused_adam`` passes ``torch.optim.Adam(fused=True)``
    with ``make_optimizer``'s hyper-parameters in place of its ``foreach`` Adam.
    """
    import torch
    import torch.distributed as dist

    from lintrans import config as cfg
    from lintrans import datasets
    from lintrans.ema import EMA
    from lintrans.forward import create_forward
    from lintrans.model import build_model, make_optimizer
    from lintrans.step import TrainStep

    m, o, batch = config.model, config.optim, config.training.batch_size
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(cfg.model_args(config), config.seed, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), **cfg.optim_args(config))
    if fused_adam and isinstance(opt, torch.optim.Adam):
        opt = torch.optim.Adam(model.parameters(), **{**opt.defaults, "foreach": None, "fused": True})
    timer, process = PhaseTimer(device), create_forward(**cfg.forward_args(config)).to(device)
    step = TrainStep(
        model=model, ema=EMA(model, m.ema_rate), optimizer=opt, process=process, sigma=m.sigma, seed=config.seed,
        global_batch=batch, lr=o.lr, warmup=o.warmup, grad_clip=o.grad_clip, random_flip=config.data.random_flip,
        dequantization=config.data.uniform_dequantization, bf16=bf16, compile=compile, device=device, timer=timer,
    )  # fmt: skip
    torch.manual_seed(config.seed * 1000 + rank)  # the trainer's dropout stream
    sampler = datasets.GlobalBatchSampler(len(train_set), batch, rank, world, config.seed)
    batches = datasets.batches(train_set, sampler)
    if channels_last:
        batches = (x.contiguous(memory_format=torch.channels_last) for x in batches)
    model.train()
    return Step(step, batches, timer)


def step_options(doc: str, name: str, warmup: int) -> argparse.ArgumentParser:
    """The options of the benchmarks that time the training step."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--config", default="configs/mnist/small_mnist.py")
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument(
        "--data", default="auto", help="auto (mnist5k for 1x28x28, else synthetic), synthetic, or a data set"
    )
    p.add_argument("--precisions", default="no,bf16", help="comma list of 'no' (fp32) and 'bf16'")
    p.add_argument("--seed", type=int, default=None, help="config seed (default: the config's)")
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--quick", action="store_true", help="smoke run (seconds)")
    p.add_argument("--name", default=name, help="result file stem under bench/results/")
    return p


def step_setup(a: argparse.Namespace):
    """Device, config (``--batch-size``, ``--seed``, ``--data``), training images and the result file's facts."""
    from lintrans import datasets
    from lintrans.config import image_shape, load

    dev = device(a.device)
    overrides = {"training.batch_size": a.batch_size, **({"seed": a.seed} if a.seed is not None else {})}
    config = load(a.config, overrides)
    shape, data = image_shape(config), a.data
    if data == "auto":
        data = "mnist5k" if shape == (1, 28, 28) else "synthetic"
    if data == "synthetic":
        train_set, data = synthetic_images(max(4 * a.batch_size, 512), shape), "synthetic uint8 images"
    else:
        train_set = datasets.load(load(a.config, {**overrides, "data.dataset": data}))[0]
    facts = {
        "machine": machine(dev.type),
        "config": a.config,
        "batch_size": a.batch_size,
        "data": data,
        "quick": a.quick,
    }
    return dev, config, train_set, facts


def synthetic_images(n: int, shape: tuple[int, int, int], seed: int = 0):
    import torch

    from lintrans.datasets import TensorImages

    gen = torch.Generator().manual_seed(seed)
    return TensorImages(torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8))


def untrained(config, device):
    """The config's network (initial weights, eval mode) and forward process: wall time does not depend on weights."""
    from lintrans import config as cfg
    from lintrans.forward import create_forward
    from lintrans.model import build_model

    model = build_model(cfg.model_args(config), config.seed, device).eval()
    return model, create_forward(**cfg.forward_args(config)).to(device)


def shares_text(shares: dict[str, float], digits: int = 1) -> str:
    return ", ".join(f"{k} {100 * v:.{digits}f}%" for k, v in shares.items())


# --------------------------------------------------------------------------- the benchmarks' SLURM cluster

# The test cluster of slurm/cluster.sh in its own folder, on ports of its own (the tests pick free ports
# elsewhere and leave these alone), so a benchmark never disturbs a test's cluster or a real one.
SLURM_DIR = "/tmp/bench-slurm"
SLURM_PORTS = {
    "LINTRANS_SLURMCTLD_PORT": "26817",
    "LINTRANS_SLURMD_PORT": "26818",
    "LINTRANS_SLURMDBD_PORT": "26819",
    "LINTRANS_SLURM_MYSQL_PORT": "23306",
}


def slurm_cluster(*args: str, env: dict, check: bool = True) -> str:
    """``slurm/cluster.sh ARGS /tmp/bench-slurm`` (``start``, ``stop``, ``node-kill n2``, ...); its output."""
    cmd = ["bash", "slurm/cluster.sh", *args, SLURM_DIR]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=check).stdout


def start_slurm(nodes: int, **settings: str) -> dict[str, str]:
    """Start the benchmarks' cluster of ``nodes`` nodes (``settings``: cluster.sh's LINTRANS_SLURM_*
    variables); the environment its client commands (sbatch, squeue, lintrans) need."""
    env = dict(os.environ, **SLURM_PORTS, **settings)
    slurm_cluster("start", "--nodes", str(nodes), env=env)
    for line in slurm_cluster("env", env=env).splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value.strip("'\"")
    return env


def cancel_all(env: dict) -> int:
    """``scancel`` every job on the cluster; how many array tasks and jobs were queued or running."""
    before = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], env=env, capture_output=True, text=True).stdout.split()
    subprocess.run(["scancel", "--user", os.environ.get("USER", "root") or "root"], env=env, capture_output=True)
    subprocess.run(["scancel", "-u", "root"], env=env, capture_output=True)
    return len(before)
