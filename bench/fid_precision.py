"""FID of the same trained models sampled in fp32 and in bf16, against the seed-to-seed spread.

    .venv/bin/python bench/fid_precision.py --runs runs/sweeps/study_budget     # a study's trained runs
    .venv/bin/python bench/fid_precision.py --runs DIR --num-gen 200 --batch-size 100
    .venv/bin/python bench/fid_precision.py --quick --runs DIR                   # smoke run: 2 runs, 20 samples

For every run under ``--runs`` (each folder with a ``config.json`` and a checkpoint, e.g. a sweep's
trial folders), loads its last checkpoint's EMA network as ``evaluate.py`` does
(``lintrans.run.load_model``) and runs the FID evaluation itself (``lintrans.evaluation.run_fid``: the
run's prior, the reverse process, the FID and memorisation figures) twice, with the network as
evaluations call it (``lintrans.device.inference_network``): in fp32 and under bf16 autocast, with
the same seed, so the prior draws and the noise are the same and only the network's arithmetic
differs. Nothing is written into the runs (no records). Reported: each run's two FIDs, their
difference and the bf16/fp32 speed ratio, and per forward process the mean and standard deviation
over seeds in each precision, so that the precision's effect can be read against the seed spread.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import _common as C

from lintrans import datasets
from lintrans.config import sampling_delta
from lintrans.device import inference_network
from lintrans.eval_spec import EvalSpec
from lintrans.evaluation import run_fid
from lintrans.run import Run, load_model


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", required=True, help="a folder of runs (e.g. runs/sweeps/<sweep>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-gen", type=int, default=200, help="samples per FID")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="the FID evaluation's seed (prior draws and noise)")
    p.add_argument("--quick", action="store_true", help="smoke run: the first 2 runs, 20 samples")
    p.add_argument("--name", default="fid_precision")
    a = p.parse_args()
    if a.quick:
        a.num_gen, a.batch_size = 20, 10
    return a


def run_dirs(folder: Path, quick: bool) -> list[Path]:
    found = sorted(d for d in folder.iterdir() if (d / "config.json").is_file() and Run(d).meta.is_file())
    if not found:
        raise SystemExit(f"bench/fid_precision.py: no trained runs (config.json and a checkpoint) under {folder}")
    return found[:2] if quick else found


def both_precisions(workdir: Path, a, device) -> dict:
    """One run's FID (and memorisation) with the network in fp32, then in bf16; same seed for both."""
    loaded = load_model(workdir, 0, device)
    own = loaded.config
    train_set, test_set = datasets.load(own)
    spec = EvalSpec(mode="fid", num_gen=a.num_gen, batch_size=a.batch_size, seed=a.seed).resolved(own.data.dataset)
    fit = Run(workdir).configured_prior(own)  # the run's Gaussian fit, or None for IHDM's data prior
    out = {"run": str(workdir), "forward": own.model.forward, "K": int(own.model.K), "seed": int(own.seed),
           "steps": loaded.step, "metric": spec.metric}  # fmt: skip
    for name, bf16 in (("fp32", False), ("bf16", True)):
        net = inference_network(loaded.model, bf16, device)
        t0 = time.perf_counter()
        metrics, _ = run_fid(
            net, loaded.process, train_set, test_set, spec, sampling_delta(own), int(own.data.image_size), device, fit
        )
        C.sync(device)
        out[name] = {"fid": metrics[spec.metric], "memorised_fraction": metrics["memorised_fraction"],
                     "s": time.perf_counter() - t0}  # fmt: skip
    out["fid_diff"] = out["bf16"]["fid"] - out["fp32"]["fid"]
    out["speedup"] = out["fp32"]["s"] / out["bf16"]["s"]
    print(
        f"{workdir.name} {out['forward']} seed {out['seed']}: FID fp32 {out['fp32']['fid']:.2f}, "
        f"bf16 {out['bf16']['fid']:.2f} ({out['fid_diff']:+.2f}), bf16 {out['speedup']:.2f}x",
        flush=True,
    )
    return out


def by_process(rows: list[dict]) -> list[dict]:
    """Per forward process: mean and seed-to-seed standard deviation of FID in each precision."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["forward"], r["K"]].append(r)
    out = []
    for (forward, K), group in groups.items():
        entry = {"forward": forward, "K": K, "seeds": len(group)}
        for name in ("fp32", "bf16"):
            fids = [r[name]["fid"] for r in group]
            entry[name] = {"mean": statistics.fmean(fids), "std": statistics.stdev(fids) if len(fids) > 1 else None}
        entry["mean_diff"] = entry["bf16"]["mean"] - entry["fp32"]["mean"]
        entry["largest_abs_diff"] = max(abs(r["fid_diff"]) for r in group)
        std = entry["fp32"]["std"]
        entry["within_seed_spread"] = None if std is None else entry["largest_abs_diff"] <= std
        out.append(entry)
    return out


def markdown(a, info: dict, rows: list[dict], groups: list[dict]) -> str:
    md = C.header_md("FID: fp32 vs bf16 sampling, same trained models", info)
    md += (
        f"Runs under `{a.runs}`, last checkpoint, EMA weights; `lintrans.evaluation.run_fid` ({rows[0]['metric']}, "
        f"{a.num_gen} samples, batch {a.batch_size}, seed {a.seed}: same prior draws and noise in both precisions), "
        "the network through `inference_network` in fp32 and under bf16 autocast.\n\n"
    )
    md += C.md_table(
        ["run", "forward", "K", "seed", "steps", "FID fp32", "FID bf16", "bf16 - fp32", "fp32 s", "bf16 s",
         "bf16 speed-up"],
        [
            [Path(r["run"]).name, r["forward"], r["K"], r["seed"], r["steps"], round(r["fp32"]["fid"], 2),
             round(r["bf16"]["fid"], 2), f"{r['fid_diff']:+.2f}", round(r["fp32"]["s"], 1), round(r["bf16"]["s"], 1),
             f"{r['speedup']:.2f}x"]
            for r in rows
        ],
    )  # fmt: skip
    md += "\nPer forward process (mean ± standard deviation over seeds):\n\n"

    def pm(x: dict) -> str:
        return f"{x['mean']:.2f}" + (f" ± {x['std']:.2f}" if x["std"] is not None else "")

    md += C.md_table(
        ["forward", "K", "seeds", "FID fp32", "FID bf16", "mean bf16 - fp32", "largest abs(bf16 - fp32)",
         "within the fp32 seed std"],
        [
            [g["forward"], g["K"], g["seeds"], pm(g["fp32"]), pm(g["bf16"]), f"{g['mean_diff']:+.2f}",
             round(g["largest_abs_diff"], 2),
             "n/a (one seed)" if g["within_seed_spread"] is None else "yes" if g["within_seed_spread"] else "no"]
            for g in groups
        ],
    )  # fmt: skip
    speedups = [r["speedup"] for r in rows]
    md += (
        f"\nbf16 speed-up of the whole FID evaluation (generation, features, memorisation): median "
        f"{statistics.median(speedups):.2f}x (min {min(speedups):.2f}, max {max(speedups):.2f}).\n"
    )
    return md


def main() -> None:
    a = parse()
    device = C.device(a.device)
    info = C.machine(device.type)
    rows = [both_precisions(d, a, device) for d in run_dirs(Path(a.runs), a.quick)]
    groups = by_process(rows)
    data = {"machine": info, "runs": a.runs, "num_gen": a.num_gen, "batch_size": a.batch_size, "seed": a.seed,
            "quick": a.quick, "results": rows, "by_process": groups}  # fmt: skip
    C.write_results(a.name, data, markdown(a, info, rows, groups))


if __name__ == "__main__":
    main()
