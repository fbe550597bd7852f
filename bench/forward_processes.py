"""Cost of the forward-process pair ``(T(k) x, T(k-1) x)`` per process and image size.

    .venv/bin/python bench/forward_processes.py            # 28x28x1, 32x32x3, 64x64x3
    .venv/bin/python bench/forward_processes.py --quick    # smoke run

For every process in the registry (``lintrans.forward.FORWARD_PROCESSES``: separable variants
included, and whatever a config registers) and every size, ``process.pair`` is
timed on a batch of ``--batch-size`` images with levels drawn as training draws them
(``k ~ Uniform{1..K}``, one per sample), on the device, in fp32. Dense matrix processes that
refuse a size (``config.model.max_dense_bytes``), or need a parameter the config lacks, are
reported as skipped with their message.

The share of a training step: the real training step (:class:`lintrans.step.TrainStep`, fp32, DDP
world size 1, same batch) of the config for that size is timed once with its own process (``heat``), and the
step of another process is taken as ``step_heat - pair_heat + pair`` (everything else in the step
is the same), so ``share = pair / (step_heat - pair_heat + pair)``.

Configs: 28x28x1 ``configs/mnist/small_mnist.py``; 32x32x3 ``configs/cifar10/default_cifar10_configs.py``;
64x64x3 ``configs/afhq/default_afhq_configs.py``. ``--widths`` sets ``model.model_channels`` per size
where the full-width step is too slow for this machine (default: full width at 28 and 32, 32
channels at 64x64 -- a cheaper step, so the share reported there is an upper bound of the
full model's); the result files say which width was used.
"""

from __future__ import annotations

import argparse
import time

import _common as C
import torch

from lintrans import config as cfg
from lintrans.errors import UsageError
from lintrans.forward import FORWARD_PROCESSES, create_forward

SIZES = {
    "28x28x1": ("configs/mnist/small_mnist.py", (1, 28)),
    "32x32x3": ("configs/cifar10/default_cifar10_configs.py", (3, 32)),
    "64x64x3": ("configs/afhq/default_afhq_configs.py", (3, 64)),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma list of {', '.join(SIZES)}")
    p.add_argument("--processes", default="all", help="comma list of registered names, or all")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=20, help="timed pair calls per process (at least --min-time s)")
    p.add_argument("--min-time", type=float, default=0.5)
    p.add_argument("--step-repeats", type=int, default=2, help="timed training steps per size")
    p.add_argument(
        "--widths",
        default="28x28x1=full,32x32x3=full,64x64x3=32",
        help="model width per size for the step: full or a model_channels value",
    )
    p.add_argument("--no-step", action="store_true", help="pair timings only")
    p.add_argument("--quick", action="store_true", help="smoke run: few repeats, reduced widths")
    p.add_argument("--name", default="forward_processes")
    a = p.parse_args()
    if a.quick:
        a.repeats, a.min_time, a.step_repeats = 3, 0.0, 1
        a.widths = "28x28x1=16,32x32x3=16,64x64x3=16"
    return a


def time_pair(process, x: torch.Tensor, device, a) -> dict:
    gen = torch.Generator().manual_seed(0)
    ks = [torch.randint(1, process.K + 1, (len(x),), generator=gen).to(device) for _ in range(8)]
    theta = process.sample_theta(len(x), gen)  # None for a deterministic process
    theta = theta.to(device) if theta is not None else None
    it = iter(range(10**9))

    def call():
        return process.pair(x, ks[next(it) % len(ks)], theta)

    with torch.no_grad():
        times = C.time_calls(call, device, 2, a.repeats, a.min_time)
    return C.summarise(times)


def main() -> None:
    a = parse()
    device = C.device(a.device)
    info = C.machine(device.type)
    widths = dict(item.split("=") for item in a.widths.split(","))
    names = list(FORWARD_PROCESSES) if a.processes == "all" else a.processes.split(",")
    out = {}
    for size in a.sizes.split(","):
        path, (ch, res) = SIZES[size]
        width = widths.get(size, "full")
        overrides = {"training.batch_size": a.batch_size}
        if width != "full":
            overrides["model.model_channels"] = int(width)
        base = cfg.load(path, overrides)
        x = torch.rand(a.batch_size, ch, res, res, generator=torch.Generator().manual_seed(1)).to(device)
        rows = {}
        for name in names:
            t0 = time.perf_counter()
            try:
                process = create_forward(**cfg.forward_args(cfg.load(path, {"model.forward": name}))).to(device)
            except UsageError as exc:
                rows[name] = {"skipped": str(exc)}
                print(f"{size} {name}: skipped ({exc})")
                continue
            build_s = time.perf_counter() - t0
            s = time_pair(process, x, device, a)
            rows[name] = {
                "pair": s,
                "per_image_us": 1e6 * s["median_s"] / a.batch_size,
                "build_s": build_s,
                "K": process.K,
            }
            print(
                f"{size} {name}: pair {1e3 * s['median_s']:.3f} ms / batch {a.batch_size} "
                f"= {rows[name]['per_image_us']:.1f} us/image (build {build_s:.2f} s)"
            )
            del process
        step = None
        if not a.no_step:
            train_step = C.train_step(base, device, C.synthetic_images(max(4 * a.batch_size, 256), (ch, res, res)))
            phases, _ = train_step.breakdown(1)  # the warm-up step also times the pair inside the step
            times = C.time_calls(train_step, device, 0, a.step_repeats)
            step = {
                "config": path,
                "model_channels": base.model.model_channels,
                "width": "full"
                if width == "full"
                else f"reduced (model_channels={width}, config has {cfg.load(path).model.model_channels})",
                "process": base.model.forward,
                "step": C.summarise(times),
                "pair_in_step_s": phases["forward_process"],
            }
            step_s = step["step"]["median_s"]
            pair_own = rows.get(base.model.forward, {}).get("pair", {}).get("median_s", step["pair_in_step_s"])
            for r in rows.values():
                if "pair" in r:
                    p = r["pair"]["median_s"]
                    r["step_estimate_s"] = step_s - pair_own + p
                    r["share_of_step"] = p / r["step_estimate_s"]
            print(f"{size} step ({step['width']}): {1e3 * step_s:.0f} ms at batch {a.batch_size}")
            del train_step
        out[size] = {"config": path, "processes": rows, "training_step": step}

    worst = {
        size: max((r.get("share_of_step", 0.0), n) for n, r in v["processes"].items() if "pair" in r)
        for size, v in out.items()
        if v["training_step"]
    }
    data = {
        "machine": info,
        "batch_size": a.batch_size,
        "dtype": "float32",
        "quick": a.quick,
        "sizes": out,
        "worst_share": {s: {"process": n, "share": w} for s, (w, n) in worst.items()},
        "target": {"size": "32x32x3", "max_share": 0.05},
    }
    md = C.header_md("Forward processes: cost of the (T(k)x, T(k-1)x) pair", info)
    md += (
        f"`process.pair` on a batch of {a.batch_size} fp32 images with per-sample levels k ~ U{{1..K}}; "
        "share = pair / (training step with this process), the step measured once per size with the "
        "config's own process (see the script's docstring).\n\n"
    )
    for size, v in out.items():
        st = v["training_step"]
        md += f"## {size} (`{v['config']}`)\n\n"
        if st:
            md += (
                f"Training step (fp32, batch {a.batch_size}, {st['width']} width, process {st['process']}): "
                f"{1e3 * st['step']['median_s']:.0f} ms.\n\n"
            )
        rows = []
        for name, r in v["processes"].items():
            if "skipped" in r:
                rows.append([name, "skipped", "", "", r["skipped"]])
            else:
                rows.append(
                    [
                        name,
                        round(1e3 * r["pair"]["median_s"], 3),
                        round(r["per_image_us"], 2),
                        f"{100 * r['share_of_step']:.2f}%" if "share_of_step" in r else "",
                        f"K={r['K']}",
                    ]
                )
        md += C.md_table(["process", "pair ms/batch", "us/image", "share of step", "note"], rows) + "\n"
    C.write_results(a.name, data, md)


if __name__ == "__main__":
    main()
