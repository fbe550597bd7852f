"""What-if: the training step with candidate performance changes, to size patches before making them.

    .venv/bin/python bench/step_variants.py            # small_mnist, batch 32
    .venv/bin/python bench/step_variants.py --quick

Each variant is the real step of ``bench/_step.py`` with one change applied in-process (nothing in
``lintrans/`` is edited): ``channels_last`` (model weights and input in NHWC memory format, which
oneDNN's convolutions prefer, above all in bf16), ``fused_adam`` (``torch.optim.Adam(fused=True)``,
one kernel over all parameters, instead of ``foreach=True``, which on CPU loops per tensor).
Reports img/s (median of timed steps) and the optimizer/EMA/forward-process shares per variant.
"""

from __future__ import annotations

import argparse

import _common as C
from _step import TrainStep, train_images

VARIANTS = {
    "baseline": {},
    "channels_last": {"channels_last": True},
    "fused_adam": {"fused_adam": True},
    "channels_last+fused_adam": {"channels_last": True, "fused_adam": True},
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/mnist/small_mnist.py")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--data", default="auto")
    p.add_argument("--precisions", default="no,bf16")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--name", default="step_variants")
    a = p.parse_args()
    if a.quick:
        a.warmup, a.steps = 1, 2
    return a


def main() -> None:
    a = parse()
    device = C.pick_device(a.device)
    info = C.machine(device.type)
    config = C.load_config(a.config, {"training.batch_size": a.batch_size})
    train_set, data_name = train_images(config, a.data)
    results = []
    for precision in a.precisions.split(","):
        for name in a.variants.split(","):
            ts = TrainStep(config, device, train_set, precision, VARIANTS[name])
            times = C.time_calls(ts.step, device, a.warmup, a.steps)
            ts.instrument = True
            inst = C.time_calls(ts.step, device, 0, max(2, a.steps // 3))
            s = C.summarise(times)
            r = {
                "precision": "fp32" if precision == "no" else precision,
                "variant": name,
                "step": s,
                "img_per_s": a.batch_size / s["median_s"],
                "img_per_s_best": a.batch_size / s["min_s"],
                "share": {k: v / sum(inst) for k, v in ts.timers.items()},
            }
            results.append(r)
            print(
                f"{r['precision']} {name}: {r['img_per_s']:.1f} img/s (best {r['img_per_s_best']:.1f}); "
                + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["share"].items()),
                flush=True,
            )
            del ts
    data = {
        "machine": info,
        "config": a.config,
        "batch_size": a.batch_size,
        "data": data_name,
        "quick": a.quick,
        "variants": VARIANTS,
        "results": results,
    }
    md = C.header_md("Training step variants (what-if)", info)
    md += f"Config `{a.config}`, batch {a.batch_size}, data {data_name}; variants applied in-process only.\n\n"
    md += C.md_table(
        ["precision", "variant", "img/s (median)", "img/s (best step)", "fwd process %", "optimizer %", "EMA %"],
        [
            [r["precision"], r["variant"], round(r["img_per_s"], 1), round(r["img_per_s_best"], 1)]
            + [round(100 * r["share"][k], 1) for k in ("forward_process", "optimizer", "ema")]
            for r in results
        ],
    )
    C.write_results(a.name, data, md)


if __name__ == "__main__":
    main()
