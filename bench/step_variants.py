"""What-if: the training step with candidate performance changes, to size patches before making them.

    .venv/bin/python bench/step_variants.py            # small_mnist, batch 32
    .venv/bin/python bench/step_variants.py --quick

Each variant is the real step (:class:`lintrans.step.TrainStep`) given different inputs (nothing in
``lintrans/`` is edited): ``channels_last`` (a model converted to NHWC memory format, which oneDNN's
convolutions prefer, above all in bf16, fed NHWC batches), ``fused_adam`` (``torch.optim.Adam(fused=True)``,
one kernel over all parameters, passed in place of ``make_optimizer``'s ``foreach=True`` Adam, which
on CPU loops per tensor).
Reports img/s (median of timed steps) and the optimizer/EMA/forward-process shares per variant.
"""

from __future__ import annotations

import argparse

import _common as C

VARIANTS = {
    "baseline": {},
    "channels_last": {"channels_last": True},
    "fused_adam": {"fused_adam": True},
    "channels_last+fused_adam": {"channels_last": True, "fused_adam": True},
}


def parse() -> argparse.Namespace:
    p = C.step_options(__doc__, "step_variants", warmup=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    a = p.parse_args()
    if a.quick:
        a.warmup, a.steps = 1, 2
    return a


def main() -> None:
    a = parse()
    device, config, train_set, facts = C.step_setup(a)
    results = []
    for precision in a.precisions.split(","):
        for name in a.variants.split(","):
            step = C.train_step(config, device, train_set, bf16=precision == "bf16", **VARIANTS[name])
            times = C.time_calls(step, device, a.warmup, a.steps)
            phases, inst = step.breakdown(max(2, a.steps // 3))
            s = C.summarise(times)
            r = {
                "precision": "fp32" if precision == "no" else precision,
                "variant": name,
                "step": s,
                "img_per_s": a.batch_size / s["median_s"],
                "img_per_s_best": a.batch_size / s["min_s"],
                "share": {k: v / sum(inst) for k, v in phases.items()},
            }
            results.append(r)
            print(
                f"{r['precision']} {name}: {r['img_per_s']:.1f} img/s (best {r['img_per_s_best']:.1f}); "
                f"{C.shares_text(r['share'])}",
                flush=True,
            )
            del step
    data = {
        **facts,
        "variants": VARIANTS,
        "results": results,
    }
    md = C.header_md("Training step variants (what-if)", facts["machine"])
    md += f"Config `{a.config}`, batch {a.batch_size}, data {facts['data']}; variants applied in-process only.\n\n"
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
