"""Training throughput (img/s) in fp32 and bf16 autocast, against the device's dense matmul peak.

    .venv/bin/python bench/train_throughput.py                       # small_mnist, batch 32, CPU
    .venv/bin/python bench/train_throughput.py --quick               # smoke run (seconds)
    .venv/bin/python bench/train_throughput.py --config configs/cifar10/default_cifar10_configs.py \
        --batch-size 8 --no-heldout

What it measures, in one process:

* img/s of the real training step (:class:`lintrans.step.TrainStep`, built from the components
  ``training_loop`` builds it from, DDP with world size 1) for fp32 and for
  ``config.training.mixed_precision = "bf16"`` (``torch.autocast``), median over timed steps;
* the device's dense matmul peak (best ``n x n`` ``torch.mm`` FLOP/s, fp32 and bf16), the model's
  FLOPs per training step (forward + backward, ``torch.utils.flop_counter.FlopCounterMode``) and
  the achieved fraction of the peak;
* the share of step time in the forward process (``process.pair``), the optimizer (lr, clipping,
  ``opt.step``) and the EMA update (a separate pass, with ``TrainStep``'s timer synchronising the
  device around each phase);
* the top operators of each step (``torch.profiler``), to name the hot spots.

``--compile off,on`` times each precision eager and compiled (``training.compile`` resolved on:
``torch.compile`` of the DDP-wrapped network, as the trainer does); the first step's extra time is
the compile time, and FLOPs are counted on the eager step. ``--threads 2,1`` repeats everything
per intra-op thread count (``torch.set_num_threads``). The held-out loss after 300 real-trainer
steps, fp32 vs bf16, is ``bench/bf16_heldout.py``.
"""

from __future__ import annotations

import argparse

import _common as C
import torch


def parse() -> argparse.Namespace:
    p = C.step_options(__doc__, "train_throughput", warmup=2)
    p.add_argument("--breakdown-steps", type=int, default=3)
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--threads", default="default", help="comma list of intra-op thread counts, or 'default'")
    p.add_argument("--compile", default="off", help="comma list of off and on: training.compile resolved so")
    a = p.parse_args()
    if a.quick:
        a.warmup, a.steps, a.breakdown_steps, a.profile_steps = 2, 3, 2, 1
    return a


def flops_per_step(step: C.Step) -> int:
    """FLOPs of one whole step; only the model's matmuls and convolutions (and a matrix process's) count."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def profile_top(step: C.Step, device, steps: int, rows: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    key = "self_cpu_time_total"
    if device.type == "cuda":  # torch >= 2.4 names it for any device; older releases said cuda
        new = events and hasattr(events[0], "self_device_time_total")
        key = "self_device_time_total" if new else "self_cuda_time_total"
    events = sorted(events, key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    return [
        {
            "op": e.key,
            "self_ms_per_step": getattr(e, key) / 1e3 / steps,
            "share": getattr(e, key) / total,
            "calls_per_step": e.count / steps,
        }
        for e in events[:rows]
    ]


def measure(config, device, train_set, precision: str, compiled: bool, flops: int, a) -> dict:
    torch._dynamo.reset()  # each variant compiles (and is timed) on its own
    step = C.train_step(config, device, train_set, bf16=precision == "bf16", compile=compiled)
    first = C.time_calls(step, device, 0, 1)[0]  # builds oneDNN/cuDNN primitives; compiles when compiled
    times = C.time_calls(step, device, a.warmup, a.steps)
    phases, inst = step.breakdown(a.breakdown_steps)
    step_inst = sum(inst)
    shares = {k: v / step_inst for k, v in phases.items()}
    ms = {k: 1e3 * v / len(inst) for k, v in phases.items()}
    top = profile_top(step, device, a.profile_steps) if a.profile_steps > 0 else []
    s = C.summarise(times)
    ips = config.training.batch_size / s["median_s"]
    return {
        "precision": "fp32" if precision == "no" else precision,
        "compile": compiled,
        "first_step_s": first,
        "compile_s": C.compile_time(first, s["median_s"], compiled),
        "step": s,
        "img_per_s": ips,
        "img_per_s_mean": config.training.batch_size / s["mean_s"],
        "flops_per_step": flops,
        "achieved_flop_s": flops / s["median_s"],
        "breakdown_ms_per_step": {**ms, "step": 1e3 * step_inst / len(inst)},
        "breakdown_share": shares,
        "profile_top_ops": top,
    }


def main() -> None:
    a = parse()
    device, config, train_set, facts = C.step_setup(a)
    default_threads = torch.get_num_threads()
    thread_counts = [default_threads] if a.threads == "default" else [int(t) for t in a.threads.split(",")]

    peaks, results = {}, []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        print(f"{a.config}: batch {a.batch_size}, data {facts['data']}, device {device}, threads {threads}")
        for dtype in (torch.float32, torch.bfloat16):
            name = f"{str(dtype).replace('torch.', '')}@{threads}"
            peaks[name] = C.matmul_peak(device, dtype, n=1024 if a.quick else None, seconds=0.5 if a.quick else 2.0)
            print(f"matmul peak {name}: {C.fmt_rate(peaks[name]['flop_s'])}")
        for precision in a.precisions.split(","):
            flops = flops_per_step(C.train_step(config, device, train_set, bf16=precision == "bf16"))  # eager
            for compiled in (c == "on" for c in a.compile.split(",")):
                r = measure(config, device, train_set, precision, compiled, flops, a)
                r["threads"] = threads
                r["peak_flop_s"] = peaks[f"{'float32' if precision == 'no' else 'bfloat16'}@{threads}"]["flop_s"]
                r["fraction_of_peak"] = r["achieved_flop_s"] / r["peak_flop_s"]
                results.append(r)
                took = f", compile {r['compile_s']:.1f} s" if compiled else ""
                print(
                    f"{r['precision']}{' compiled' if compiled else ''} x{threads}: {r['img_per_s']:.1f} img/s "
                    f"(step {1e3 * r['step']['median_s']:.0f} ms, best {a.batch_size / r['step']['min_s']:.1f} "
                    f"img/s), {C.fmt_rate(r['achieved_flop_s'])} = {100 * r['fraction_of_peak']:.1f}% of peak"
                    f"{took}; {C.shares_text(r['breakdown_share'])}",
                    flush=True,
                )
    torch.set_num_threads(default_threads)

    data = {
        **facts,
        "matmul_peak": peaks,
        "results": results,
        "targets": {"fp32_img_per_s": 42, "bf16_img_per_s": 73},
    }
    md = C.header_md("Training throughput", facts["machine"])
    md += (
        f"Config `{a.config}`, global batch {a.batch_size}, data {facts['data']}, DDP world size 1; img/s from the "
        "median step (best step in brackets); FLOPs per step from `FlopCounterMode` (forward + backward).\n\n"
    )
    md += C.md_table(
        [
            "precision",
            "compiled",
            "compile s",
            "threads",
            "img/s",
            "step ms",
            "GFLOP/step",
            "achieved",
            "peak (mm)",
            "% of peak",
            "fwd process %",
            "optimizer %",
            "EMA %",
        ],
        [
            [
                r["precision"],
                "yes" if r["compile"] else "no",
                round(r["compile_s"], 1) if r["compile_s"] is not None else "-",
                r["threads"],
                f"{r['img_per_s']:.1f} ({a.batch_size / r['step']['min_s']:.1f})",
                round(1e3 * r["step"]["median_s"], 1),
                round(r["flops_per_step"] / 1e9, 2),
                C.fmt_rate(r["achieved_flop_s"]),
                C.fmt_rate(r["peak_flop_s"]),
                round(100 * r["fraction_of_peak"], 1),
            ]
            + [round(100 * r["breakdown_share"][k], 2) for k in ("forward_process", "optimizer", "ema")]
            for r in results
        ],
    )
    for r in results:
        if r["profile_top_ops"]:
            what = f"{r['precision']}{', compiled' if r['compile'] else ''}, {r['threads']} thread(s)"
            md += f"\nTop operators, {what} (self time per step):\n\n"
            md += C.md_table(
                ["op", "ms/step", "share", "calls/step"],
                [
                    [t["op"], round(t["self_ms_per_step"], 2), f"{100 * t['share']:.1f}%", t["calls_per_step"]]
                    for t in r["profile_top_ops"]
                ],
            )
    C.write_results(a.name, data, md)


if __name__ == "__main__":
    main()
