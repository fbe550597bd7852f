"""Sampling speed: images per second for a full K-step reverse run (``lintrans.sampling.reverse``).

    .venv/bin/python bench/sampling.py                 # mnist5k config (K=20), batch 36
    .venv/bin/python bench/sampling.py --config configs/mnist/small_mnist.py   # K=50, 64 channels
    .venv/bin/python bench/sampling.py --quick

Times ``sampling.prior`` + ``sampling.reverse`` (the path of ``sample.py``, FID generation and the
trainer's sample grids) with an untrained model of the config in eval mode (speed does not depend
on the weights), per batch size, in fp32 and -- as a what-if, ``reverse`` has no precision switch --
with the model call under bf16 autocast. Also reports model FLOPs per sample (K forward passes,
``FlopCounterMode``) and the achieved fraction of the device's dense matmul peak.
"""

from __future__ import annotations

import argparse

import _common as C
import torch

from lintrans import config as cfg
from lintrans import sampling


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/mnist5k/default_mnist5k_configs.py")
    p.add_argument("--batch-sizes", default="36", help="comma list (36: the trainer's sample grid)")
    p.add_argument("--K", type=int, default=None, help="override model.K")
    p.add_argument("--device", default="auto")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--repeats", type=int, default=1, help="timed full runs per batch size")
    p.add_argument("--quick", action="store_true", help="smoke run: K=5, batch 8, one repeat")
    p.add_argument("--name", default="sampling")
    a = p.parse_args()
    if a.quick:
        a.K, a.batch_sizes, a.repeats = 5, "8", 1
    return a


def main() -> None:
    a = parse()
    device = C.device(a.device)
    info = C.machine(device.type)
    config = cfg.load(a.config, {"model.K": a.K} if a.K else {})
    K, shape, delta = config.model.K, cfg.image_shape(config), cfg.sampling_delta(config)
    model, process = C.untrained(config, device)
    peaks = {
        p: C.matmul_peak(
            device, torch.float32 if p == "fp32" else torch.bfloat16, 1024 if a.quick else 2048, 0.5 if a.quick else 1.5
        )
        for p in a.precisions.split(",")
    }

    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, *shape, device=device), torch.ones(1, dtype=torch.long, device=device))
    flops_per_sample = counter.get_total_flops() * K

    results = []
    for precision in a.precisions.split(","):
        if precision == "bf16":

            def net(*inputs):  # (u, k), and theta where the forward process has one
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    return model(*inputs)
        else:
            net = model
        for bs in (int(b) for b in a.batch_sizes.split(",")):
            x0 = torch.rand(bs, *shape, generator=torch.Generator().manual_seed(0)).to(device)

            def run(x0=x0, net=net):
                gen = torch.Generator(device=device).manual_seed(0)
                u_K = sampling.prior(process, x0, delta, gen)
                return sampling.reverse(net, u_K, K, delta, gen)

            with torch.no_grad():
                net(x0, torch.ones(bs, dtype=torch.long, device=device))  # warm-up (oneDNN primitives)
            times = C.time_calls(run, device, 0, a.repeats)
            s = C.summarise(times)
            ips = bs / s["median_s"]
            r = {
                "precision": precision,
                "batch_size": bs,
                "K": K,
                "run": s,
                "img_per_s": ips,
                "ms_per_level": 1e3 * s["median_s"] / K,
                "flops_per_sample": flops_per_sample,
                "achieved_flop_s": flops_per_sample * ips,
                "peak_flop_s": peaks[precision]["flop_s"],
            }
            r["fraction_of_peak"] = r["achieved_flop_s"] / r["peak_flop_s"]
            results.append(r)
            print(
                f"{precision} batch {bs}: {ips:.2f} img/s ({s['median_s']:.2f} s for K={K} levels, "
                f"{100 * r['fraction_of_peak']:.1f}% of matmul peak)"
            )
    data = {
        "machine": info,
        "config": a.config,
        "K": K,
        "shape": shape,
        "quick": a.quick,
        "matmul_peak": peaks,
        "results": results,
    }
    md = C.header_md("Sampling: full K-step reverse process", info)
    md += (
        f"Config `{a.config}` (K={K}, {shape[0]}x{shape[1]}x{shape[2]}), untrained model in eval mode, "
        f"`sampling.prior` + `sampling.reverse`; model FLOPs per sample {flops_per_sample / 1e9:.2f} GFLOP.\n\n"
    )
    md += C.md_table(
        ["precision", "batch", "img/s", "s per run", "ms per level", "% of matmul peak"],
        [
            [
                r["precision"],
                r["batch_size"],
                round(r["img_per_s"], 2),
                round(r["run"]["median_s"], 2),
                round(r["ms_per_level"], 1),
                round(100 * r["fraction_of_peak"], 1),
            ]
            for r in results
        ],
    )
    md += "\nbf16 rows wrap the model call in `torch.autocast` (what-if: `reverse` itself has no precision switch).\n"
    C.write_results(a.name, data, md)


if __name__ == "__main__":
    main()
