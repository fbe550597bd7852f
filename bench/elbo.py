"""ELBO wall time on mnist5k, and how it grows with the training-set and test-set sizes.

    .venv/bin/python bench/elbo.py            # mnist5k config (K=20), untrained model
    .venv/bin/python bench/elbo.py --quick

Runs ``lintrans.elbo.negative_elbo`` (the path of ``evaluate.py --mode=elbo``) with an untrained
model of the config (wall time does not depend on the weights) over a grid of training-set sizes
(test set fixed) and test-set sizes (training set fixed), and reports each run's wall time and
``forward_applications`` next to the reference approach's count. The IHDM reference re-pushes
the whole training set through ``T(K)`` for every test batch (``num_train * ceil(num_test /
batch)`` applications for the prior term); lintrans pushes it once (``num_train``). The test-side
applications (``K * num_test``: ``T(k) u_0`` for every level, each reused as the next level's
target) are listed separately. The time one push of the training set takes is measured on its
own, so the time the reference approach would add is ``(ceil(num_test / batch) - 1) * push``.
"""

from __future__ import annotations

import argparse
import math
import time

import _common as C
import torch

from lintrans import config as cfg
from lintrans import datasets
from lintrans.elbo import negative_elbo


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/mnist5k/default_mnist5k_configs.py")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--train-sizes", default="500,1500,4500", help="with --fixed-test test images")
    p.add_argument("--test-sizes", default="100,250,500", help="with --fixed-train training images")
    p.add_argument("--fixed-test", type=int, default=100)
    p.add_argument("--fixed-train", type=int, default=4500)
    p.add_argument("--quick", action="store_true", help="smoke run: K=3, tiny sizes")
    p.add_argument("--name", default="elbo")
    a = p.parse_args()
    if a.quick:
        a.train_sizes, a.test_sizes, a.fixed_test, a.fixed_train, a.batch_size = "50,100,200", "10,20,40", 10, 200, 10
    return a


def main() -> None:
    a = parse()
    device = C.device(a.device)
    info = C.machine(device.type)
    overrides = {"data.dataset": "mnist5k"}
    if a.quick:
        overrides.update({"model.K": 3, "model.model_channels": 8})
    config = cfg.load(a.config, overrides)
    train_set, test_set = datasets.load(config)
    train_all = train_set.batch(torch.arange(len(train_set)))
    test_all = test_set.batch(torch.arange(len(test_set)))
    model, process = C.untrained(config, device)
    K, sigma, delta = config.model.K, float(config.model.sigma), cfg.sampling_delta(config)

    def push_time(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(0, n, a.batch_size):
                x = train_all[s : s + a.batch_size].to(device)
                theta = process.sample_theta(len(x), torch.Generator().manual_seed(s))
                process(x, process.levels(K, len(x), device), None if theta is None else theta.to(device))
        C.sync(device)
        return time.perf_counter() - t0

    push_time(min(500, len(train_all)))  # warm-up
    runs = []

    def one(n_train: int, n_test: int, axis: str) -> None:
        t0 = time.perf_counter()
        out = negative_elbo(
            model,
            process,
            train_all[:n_train],
            test_all[:n_test],
            sigma=sigma,
            delta=delta,
            batch_size=a.batch_size,
            device=device,
            generator=torch.Generator().manual_seed(0),
            progress=False,
        )
        C.sync(device)
        wall = time.perf_counter() - t0
        batches = math.ceil(n_test / a.batch_size)
        push = push_time(n_train)
        r = {
            "axis": axis,
            "num_train": n_train,
            "num_test": n_test,
            "batch_size": a.batch_size,
            "K": K,
            "wall_s": wall,
            "bpd": out["bpd"],
            "forward_applications": out["forward_applications"],
            "prior_applications": n_train,
            "test_applications": out["forward_applications"] - n_train,
            "reference_prior_applications": n_train * batches,
            "reference_total_applications": n_train * batches + out["forward_applications"] - n_train,
            "train_push_s": push,
            "reference_extra_s": (batches - 1) * push,
        }
        runs.append(r)
        print(
            f"{axis}: train {n_train}, test {n_test}: {wall:.2f} s, applications {r['forward_applications']} "
            f"(prior {n_train} vs reference {r['reference_prior_applications']}), push of train set {push:.3f} s"
        )

    for n in (int(v) for v in a.train_sizes.split(",")):
        one(n, a.fixed_test, "train size")
    for n in (int(v) for v in a.test_sizes.split(",")):
        one(a.fixed_train, n, "test size")

    def slope(axis: str, key: str) -> float:
        pts = [(r[key], r["wall_s"]) for r in runs if r["axis"] == axis]
        xs, ys = zip(*pts, strict=True)
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        return sum((x - mx) * (y - my) for x, y in pts) / max(sum((x - mx) ** 2 for x in xs), 1e-12)

    growth = {"s_per_train_image": slope("train size", "num_train"), "s_per_test_image": slope("test size", "num_test")}
    data = {
        "machine": info,
        "config": a.config,
        "K": K,
        "quick": a.quick,
        "model": "untrained (timing only)",
        "runs": runs,
        "growth": growth,
    }
    md = C.header_md("ELBO (negative_elbo) on mnist5k", info)
    md += (
        f"Config `{a.config}` (K={K}), untrained model, batch {a.batch_size}. Prior applications: images pushed "
        "through T(K) for the mixture prior (lintrans: once; reference: once per test batch). Test applications: "
        "K x num_test, the same for both.\n\n"
    )
    md += C.md_table(
        [
            "varied",
            "num_train",
            "num_test",
            "wall s",
            "forward_applications",
            "prior (lintrans)",
            "prior (reference)",
            "total (reference)",
            "reference would add s",
        ],
        [
            [
                r["axis"],
                r["num_train"],
                r["num_test"],
                round(r["wall_s"], 2),
                r["forward_applications"],
                r["prior_applications"],
                r["reference_prior_applications"],
                r["reference_total_applications"],
                round(r["reference_extra_s"], 3),
            ]
            for r in runs
        ],
    )
    md += (
        f"\nGrowth (least-squares slope): {1e3 * growth['s_per_train_image']:.3f} ms per training image, "
        f"{1e3 * growth['s_per_test_image']:.1f} ms per test image (K={K} model evaluations each).\n"
    )
    C.write_results(a.name, data, md)


if __name__ == "__main__":
    main()
