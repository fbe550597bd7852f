"""What keeping freed memory (``lintrans.procenv.keep_freed_memory``) buys: sampling and training, with and without.

    .venv/bin/python bench/malloc.py             # mnist5k config, 5 alternating rounds, 1 thread (a local slot)
    .venv/bin/python bench/malloc.py --quick     # smoke run: tiny model, K=2, one round

Every lintrans entry point (``train.py``, ``sample.py``, ``evaluate.py``, a sweep's trial) calls
``keep_freed_memory()`` before any work, so that glibc serves tensors from memory the process already
holds instead of fresh pages. The setting lasts for the process's life, so each variant runs in its
own child process (this script with ``--child``), in alternating order, one pair per round; the ratio
is taken within a round. A child times what a trial spends its time on: a full reverse run
(``lintrans.sampling.reverse`` through :func:`lintrans.device.inference_network`, the path of FID's
samples and the sample grids, built by ``_common.reverse_run``) in fp32 and in bf16, and the real training step
(:class:`lintrans.step.TrainStep`, built by ``_common.train_step``) in both precisions. It also
counts the minor page faults of the timed work (``getrusage``), which is what the setting removes.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import _common as C


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/mnist5k/default_mnist5k_configs.py")
    p.add_argument("--batch-size", type=int, default=100, help="sampling batch (100: the quickstart's FID batch)")
    p.add_argument("--K", type=int, default=20)
    p.add_argument("--steps", type=int, default=6, help="timed training steps per precision (batch 32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per child (1: a quickstart slot)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, K=2, batch 8, 2 steps, 1 round")
    p.add_argument("--name", default="malloc")
    p.add_argument("--child", choices=("keep", "default"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.config, a.K, a.batch_size, a.steps, a.rounds = "tests/configs/tiny.py", 2, 8, 2, 1
    return a


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child(a: argparse.Namespace) -> dict:
    """This process's timings, after ``keep_freed_memory()`` if ``a.child == "keep"``: one JSON line."""
    import torch
    import torch.distributed as dist

    from lintrans import datasets
    from lintrans.config import image_shape, load, sampling_delta
    from lintrans.procenv import free_port, keep_freed_memory

    kept = keep_freed_memory() if a.child == "keep" else False
    torch.set_num_threads(a.threads)
    device = torch.device("cpu")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    config = load(a.config, {"training.batch_size": 32, "model.K": a.K})  # not C.step_setup: it keeps freed memory
    train_set = datasets.load(config)[0]
    model, process = C.untrained(config, device)
    shape, delta, out = image_shape(config), sampling_delta(config), {"kept": kept}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        run = C.reverse_run(model, process, a.K, a.batch_size, shape, delta, device, bf16)
        run()  # warm: oneDNN's kernels, the allocator
        f0, t0 = faults(), time.perf_counter()
        run()
        out[f"sample_{name}_s"], out[f"sample_{name}_faults"] = time.perf_counter() - t0, faults() - f0
    for name, bf16 in (("fp32", False), ("bf16", True)):
        step = C.train_step(config, device, train_set, bf16=bf16)
        for _ in range(2):
            step()
        f0, times = faults(), C.time_calls(step, device, 0, a.steps)
        out[f"step_{name}_s"], out[f"step_{name}_faults"] = statistics.median(times), (faults() - f0) / a.steps
    dist.destroy_process_group()
    return out


def run_child(a: argparse.Namespace, mode: str) -> dict:
    args = [sys.executable, __file__, "--child", mode, "--config", a.config, "--batch-size", str(a.batch_size),
            "--K", str(a.K), "--steps", str(a.steps), "--threads", str(a.threads)]  # fmt: skip
    done = subprocess.run(args, cwd=C.ROOT, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    a = parse()
    if a.child:
        print(json.dumps(child(a)), flush=True)
        return
    info = C.machine("cpu")
    measures = ("sample_fp32", "sample_bf16", "step_fp32", "step_bf16")
    rounds = []
    for r in range(a.rounds):
        order = ("default", "keep") if r % 2 == 0 else ("keep", "default")
        row = {mode: run_child(a, mode) for mode in order}
        if not row["keep"]["kept"]:
            raise SystemExit("keep_freed_memory() did not take effect here (no glibc mallopt): nothing to compare")
        row["speedup"] = {m: row["default"][f"{m}_s"] / row["keep"][f"{m}_s"] for m in measures}
        rounds.append(row)
        print(f"round {r + 1}: " + ", ".join(f"{m} {row['speedup'][m]:.2f}x" for m in measures), flush=True)
    summary = {m: C.spread([row["speedup"][m] for row in rounds]) for m in measures}
    data = {
        "machine": info, "config": a.config, "batch_size": a.batch_size, "K": a.K, "steps": a.steps,
        "threads": a.threads, "rounds": rounds, "speedup": summary, "quick": a.quick,
    }  # fmt: skip
    md = C.header_md("Keeping freed memory: sampling and training steps with and without", info)
    md += (
        f"`{a.config}`, untrained network (speed does not depend on the weights), {a.threads} torch thread(s) "
        f"per child process; sampling: one full reverse run of K = {a.K} at batch {a.batch_size}; training: "
        f"median of {a.steps} steps at batch 32 (mnist5k). Each round runs one child with "
        "`keep_freed_memory()` and one without, in alternating order; speed-up = time without / time with, "
        "within the round. Faults: minor page faults during the timed work (per step for training).\n\n"
    )
    md += C.md_table(
        ["measure", "speed-up median (min-max)", "faults without", "faults with"],
        [
            [m, f"{summary[m]['median']:.2f}x ({summary[m]['min']:.2f}-{summary[m]['max']:.2f})",
             round(statistics.median(row["default"][f"{m}_faults"] for row in rounds)),
             round(statistics.median(row["keep"][f"{m}_faults"] for row in rounds))]
            for m in measures
        ],
    )  # fmt: skip
    C.write_results(a.name, data, md)


if __name__ == "__main__":
    main()
