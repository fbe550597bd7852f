"""Sampling speed: images per second for a full K-step reverse run (``lintrans.sampling.reverse``).

    .venv/bin/python bench/sampling.py                 # mnist5k config, K=20 and K=200, batch 36
    .venv/bin/python bench/sampling.py --config configs/mnist/small_mnist.py --K 50
    .venv/bin/python bench/sampling.py --device cuda --batch-sizes 256 --compile off,on
    .venv/bin/python bench/sampling.py --quick

Times ``sampling.prior`` + ``sampling.reverse`` (the path of ``sample.py``, FID generation and the
trainer's sample grids) with an untrained model of the config in eval mode (speed does not depend
on the weights), per horizon ``K``, batch size, precision and compilation. The network is what
sampling really calls: :func:`lintrans.device.inference_network` (``bf16``: the network under bf16
autocast, answering in fp32; ``compile``: ``torch.compile``, whose first run's extra time is
reported as the compile time). The variants are timed in alternating rounds, so that load on a
shared machine falls on all of them alike, and each ratio to fp32 is taken within a round. Also
reports model FLOPs per sample (K forward passes, ``FlopCounterMode``) and the achieved fraction of
the device's dense matmul peak (measured here).
"""

from __future__ import annotations

import argparse
import statistics

import _common as C
import torch

from lintrans import config as cfg


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/mnist5k/default_mnist5k_configs.py")
    p.add_argument("--batch-sizes", default="36", help="comma list (36: the trainer's sample grid)")
    p.add_argument("--K", default="20,200", help="comma list of horizons (model.K)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--compile", default="off", help="comma list of off and on (torch.compile of the network)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds: one timed full run of each variant")
    p.add_argument("--quick", action="store_true", help="smoke run: K=5, batch 8, one round")
    p.add_argument("--name", default="sampling")
    a = p.parse_args()
    if a.quick:
        a.K, a.batch_sizes, a.rounds = "5", "8", 1
    return a


def ratio_text(r: dict) -> str:
    if r["vs_fp32_eager"] is None:
        return "n/a"
    low, high = r["vs_fp32_eager_range"]
    return f"{r['vs_fp32_eager']:.2f}x ({low:.2f}-{high:.2f})"


def main() -> None:
    a = parse()
    device = C.device(a.device)
    info = C.machine(device.type)
    peak_n, peak_s = (1024, 0.5) if a.quick else (None, 1.5)
    peaks = {
        p: C.matmul_peak(device, torch.float32 if p == "fp32" else torch.bfloat16, peak_n, peak_s)
        for p in a.precisions.split(",")
    }
    from torch.utils.flop_counter import FlopCounterMode

    results = []
    for K in (int(k) for k in a.K.split(",")):
        config = cfg.load(a.config, {"model.K": K})
        shape, delta = cfg.image_shape(config), cfg.sampling_delta(config)
        model, process = C.untrained(config, device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.rand(1, *shape, device=device), torch.ones(1, dtype=torch.long, device=device))
        flops_per_sample = counter.get_total_flops() * K
        variants = [
            (precision, compiled, bs)
            for precision in a.precisions.split(",")
            for compiled in (c == "on" for c in a.compile.split(","))
            for bs in (int(b) for b in a.batch_sizes.split(","))
        ]
        runners, firsts, times = {}, {}, {v: [] for v in variants}
        for v in variants:
            runners[v] = C.reverse_run(model, process, K, v[2], shape, delta, device, v[0] == "bf16", v[1])
            firsts[v] = C.time_calls(runners[v], device, 0, 1)[0]  # the first run compiles and warms
        for _ in range(a.rounds):  # alternating rounds: every variant once per round, in the same order
            for v in variants:
                times[v] += C.time_calls(runners[v], device, 0, 1)
        for (precision, compiled, bs), samples in times.items():
            s = C.summarise(samples)
            ips = bs / s["median_s"]
            r = {
                "precision": precision, "compile": compiled, "batch_size": bs, "K": K, "run": s,
                "round_s": samples, "first_run_s": firsts[precision, compiled, bs],
                "compile_s": C.compile_time(firsts[precision, compiled, bs], s["median_s"], compiled),
                "img_per_s": ips, "ms_per_level": 1e3 * s["median_s"] / K,
                "flops_per_sample": flops_per_sample, "achieved_flop_s": flops_per_sample * ips,
                "peak_flop_s": peaks[precision]["flop_s"],
            }  # fmt: skip
            r["fraction_of_peak"] = r["achieved_flop_s"] / r["peak_flop_s"]
            results.append(r)
            took = f", compile {r['compile_s']:.1f} s" if compiled else ""
            print(
                f"K={K} {precision}{' compiled' if compiled else ''} batch {bs}: {ips:.2f} img/s "
                f"({s['median_s']:.2f} s per run, {100 * r['fraction_of_peak']:.1f}% of matmul peak{took})",
                flush=True,
            )
    for r in results:  # against the same K and batch in fp32 eager, measured in this run
        base = next(
            (b for b in results if (b["K"], b["batch_size"], b["precision"], b["compile"]) == (r["K"], r["batch_size"],
             "fp32", False)), None,
        )  # fmt: skip
        # per round: each round's ratio against the baseline's run in the same round
        rounds = [b / t for t, b in zip(r["round_s"], base["round_s"], strict=True)] if base else []
        r["vs_fp32_eager"] = statistics.median(rounds) if base else None
        r["vs_fp32_eager_range"] = [min(rounds), max(rounds)] if base else None
    data = {"machine": info, "config": a.config, "quick": a.quick, "matmul_peak": peaks, "results": results}
    md = C.header_md("Sampling: full K-step reverse process", info)
    md += (
        f"Config `{a.config}`, untrained model in eval mode, `sampling.prior` + `sampling.reverse` through "
        "`lintrans.device.inference_network` (bf16: autocast around the network, fp32 states); img/s from the "
        f"median of {a.rounds} alternating round(s) (each round runs every variant once, in the order of the table) "
        "after a first run of each (compile time = first run - median); vs fp32 eager = the median (min-max) over "
        "rounds of the ratio to fp32 eager's run of the same K and batch in the same round.\n\n"
    )
    md += C.md_table(
        ["K", "precision", "compiled", "batch", "img/s", "vs fp32 eager", "s per run", "ms per level",
         "% of matmul peak", "compile s"],
        [
            [
                r["K"], r["precision"], "yes" if r["compile"] else "no", r["batch_size"], round(r["img_per_s"], 2),
                ratio_text(r), round(r["run"]["median_s"], 2),
                round(r["ms_per_level"], 1), round(100 * r["fraction_of_peak"], 1),
                round(r["compile_s"], 1) if r["compile_s"] is not None else "-",
            ]
            for r in results
        ],
    )  # fmt: skip
    C.write_results(a.name, data, md)


if __name__ == "__main__":
    main()
