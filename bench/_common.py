"""Shared helpers for the benchmarks: repository path, machine facts, timing, result files.

Every benchmark writes ``bench/results/<name>.json`` (figures + machine + commit + command) and
``bench/results/<name>.md`` (a short human summary). Benchmarks are scripts, never timed tests.
"""

from __future__ import annotations

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
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: str = "cpu") -> dict:
    import torch

    info = {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "loadavg_at_start": os.getloadavg(),
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


def pick_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA device is available")
    return torch.device(name)


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


def summarise(samples: list[float]) -> dict:
    return {
        "median_s": statistics.median(samples),
        "mean_s": statistics.fmean(samples),
        "min_s": min(samples),
        "stdev_s": statistics.stdev(samples) if len(samples) > 1 else 0.0,
        "n": len(samples),
    }


def matmul_peak(device, dtype, n: int = 2048, seconds: float = 2.0) -> dict:
    """Dense matmul peak: best FLOP/s of ``n x n @ n x n`` over ``seconds`` (after warm-up)."""
    import torch

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
    def cell(v) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """``bench/results/<name>.json`` and ``.md`` (written whole, then renamed)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "command": command_line(), **data}
    paths = []
    for suffix, text in ((".json", json.dumps(data, indent=2, default=str) + "\n"), (".md", markdown)):
        path = RESULTS / f"{name}{suffix}"
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


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a TensorBoard log directory, as (step, value) pairs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def steady_median(values: list[float]) -> float | None:
    """Median of a per-interval series with the first interval (warm-up) dropped when there are more."""
    steady = values[1:] if len(values) > 1 else values
    return statistics.median(steady) if steady else None


def load_config(path: str, overrides: dict | None = None):
    """An ml_collections config file with dotted overrides (the launcher's own loader)."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        from launchers.sweep import apply_overrides
        from launchers.sweep import load_config as _load

        return apply_overrides(_load(Path(path)), overrides or {})
    finally:
        os.chdir(cwd)
