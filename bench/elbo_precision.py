"""The ELBO in fp32 and in bf16 on the same trained model: the bound's digits and its wall time.

    .venv/bin/python bench/elbo_precision.py                   # mnist5k config (K=20), 200 steps, CPU
    .venv/bin/python bench/elbo_precision.py --device cuda     # the same on a GPU
    .venv/bin/python bench/elbo_precision.py --quick           # smoke run: tiny model, few images

Trains a model with ``train.py`` as a user runs it (the config's defaults: ``mixed_precision`` and
``compile`` auto), loads its EMA weights as ``evaluate.py`` does (``lintrans.run.load_model``), and
computes ``lintrans.elbo.negative_elbo`` with the network as evaluations call it
(``lintrans.device.inference_network``): fp32, and bf16 autocast around the network with fp32
states and float64 sums. Same images, same noise (one seed), alternating rounds; reported: bpd of
each, their difference (the issue's bound: 0.01 bpd), and the bf16/fp32 speed ratio per round.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C
import torch

from lintrans import datasets
from lintrans.config import sampling_delta
from lintrans.device import has_bf16, inference_network
from lintrans.elbo import negative_elbo
from lintrans.evaluation import subset
from lintrans.run import load_model

BOUND_BPD = 0.01  # the largest |bf16 - fp32| the bound may move


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/mnist5k/default_mnist5k_configs.py")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--steps", type=int, default=200, help="training steps before the ELBO")
    p.add_argument("--num-train", type=int, default=1000, help="training images in the prior term")
    p.add_argument("--num-test", type=int, default=200, help="test images in the bound")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3, help="alternating fp32/bf16 rounds")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 4 steps, 20/8 images, 1 round")
    p.add_argument("--name", default="elbo_precision")
    a = p.parse_args()
    if a.quick:
        a.config, a.steps, a.num_train, a.num_test, a.batch_size, a.rounds = "tests/configs/tiny.py", 4, 20, 8, 8, 1
    return a


def train(a, workdir: Path) -> float:
    """``train.py`` for ``a.steps`` steps into ``workdir``; its wall seconds."""
    t0 = time.perf_counter()
    args = C.trainer_args(a.config, workdir, a.steps, 8 if a.quick else 32, "auto")
    subprocess.run([sys.executable, *args, f"--config.device={a.device}"], cwd=C.ROOT, check=True)
    return time.perf_counter() - t0


def main() -> None:
    a = parse()
    device = C.device(a.device)
    info = C.machine(device.type)
    with tempfile.TemporaryDirectory() as tmp:
        train_s = train(a, Path(tmp) / "run")
        loaded = load_model(Path(tmp) / "run", 0, device)
    config = loaded.config
    train_set, test_set = datasets.load(config)
    train_x, test_x = subset(train_set, a.num_train, 0), subset(test_set, a.num_test, 1)
    sigma, delta = float(config.model.sigma), sampling_delta(config)

    rounds = []
    for r in range(a.rounds):
        row = {}
        for name, bf16 in (("fp32", False), ("bf16", True)):
            net = inference_network(loaded.model, bf16, device)
            t0 = time.perf_counter()
            out = negative_elbo(
                net, loaded.process, train_x, test_x, sigma=sigma, delta=delta, batch_size=a.batch_size,
                device=device, generator=torch.Generator().manual_seed(0), progress=False,
            )  # fmt: skip
            C.sync(device)
            row[name] = {"s": time.perf_counter() - t0, "bpd": out["bpd"], "nll_nats": out["nll_nats"]}
        row["speedup"] = row["fp32"]["s"] / row["bf16"]["s"]
        row["bpd_diff"] = row["bf16"]["bpd"] - row["fp32"]["bpd"]
        rounds.append(row)
        print(
            f"round {r + 1}: fp32 {row['fp32']['bpd']:.4f} bpd in {row['fp32']['s']:.1f} s, bf16 "
            f"{row['bf16']['bpd']:.4f} bpd in {row['bf16']['s']:.1f} s: {row['speedup']:.2f}x, "
            f"diff {row['bpd_diff']:+.4f} bpd",
            flush=True,
        )
    speedups = [r["speedup"] for r in rounds]
    worst = max(abs(r["bpd_diff"]) for r in rounds)
    data = {
        "machine": info, "config": a.config, "steps": a.steps, "train_s": train_s, "num_train": a.num_train,
        "num_test": a.num_test, "batch_size": a.batch_size, "device_has_bf16": has_bf16(device), "rounds": rounds,
        "speedup_median": statistics.median(speedups), "worst_bpd_diff": worst, "bound_bpd": BOUND_BPD,
        "within_bound": worst <= BOUND_BPD, "quick": a.quick,
    }  # fmt: skip
    md = C.header_md("ELBO: fp32 vs bf16 network, same trained model", info)
    md += (
        f"`{a.config}` trained {a.steps} steps with `train.py` (defaults: auto precision, auto compile; "
        f"{train_s:.0f} s), EMA weights; ELBO over {a.num_test} test images with {a.num_train} training images in "
        f"the prior, batch {a.batch_size}, same noise (seed 0) for both; device bf16 support: "
        f"{'yes' if has_bf16(device) else 'no (bf16 emulated: slow)'}.\n\n"
    )
    md += C.md_table(
        ["round", "fp32 bpd", "bf16 bpd", "bf16 - fp32 (bpd)", "fp32 s", "bf16 s", "bf16 speed-up"],
        [
            [i + 1, f"{r['fp32']['bpd']:.4f}", f"{r['bf16']['bpd']:.4f}", f"{r['bpd_diff']:+.4f}",
             round(r["fp32"]["s"], 2), round(r["bf16"]["s"], 2), f"{r['speedup']:.2f}x"]
            for i, r in enumerate(rounds)
        ],
    )  # fmt: skip
    md += (
        f"\nMedian speed-up {statistics.median(speedups):.2f}x (min {min(speedups):.2f}, max {max(speedups):.2f}); "
        f"largest |bf16 - fp32| {worst:.4f} bpd: {'within' if worst <= BOUND_BPD else 'OUTSIDE'} the "
        f"{BOUND_BPD} bpd bound.\n"
    )
    C.write_results(a.name, data, md)


if __name__ == "__main__":
    main()
