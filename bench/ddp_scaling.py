"""DDP scaling: img/s of the real trainer for 1 and 2 processes at a fixed global batch.

    .venv/bin/python bench/ddp_scaling.py            # small_mnist, global batch 32, 20 steps per run
    .venv/bin/python bench/ddp_scaling.py --quick

Runs ``torchrun --standalone --nproc_per_node=N train.py ...`` (gloo on CPU, NCCL on GPUs: the
trainer picks) on mnist5k and reads the trainer's own ``train/img_per_s`` from TensorBoard
(median over log intervals, the first one -- warm-up -- dropped; the final evaluation and
checkpoint come after the last interval and are not counted). Three runs:

* ``1 proc x T threads``: one process with every core (``T`` = CPU count, torch's default);
* ``1 proc x 1 thread``: the per-core baseline (``OMP_NUM_THREADS=1``);
* ``N procs x T/N threads``: DDP, each rank on its share of the cores and ``batch / N`` images.

Scaling efficiency = img/s(N procs) / (N x img/s(1 proc x T/N threads)) -- each rank has the
resources of the baseline run, so 100 % means DDP costs nothing. Speed-up over the
all-cores single process is reported too (on a CPU machine the cores stay the same, so ideal
is about 1). On GPUs, use ``--gpus N``: runs 1 and N processes with one GPU each.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

from launchers.table import learning_curve


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/mnist/small_mnist.py")
    p.add_argument("--batch-size", type=int, default=32, help="global batch (fixed across runs)")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--log-freq", type=int, default=5)
    p.add_argument("--precision", default="no", help="no (fp32) or bf16")
    p.add_argument("--gpus", type=int, default=0, help="CUDA: compare 1 and N GPUs instead of CPU processes")
    p.add_argument("--quick", action="store_true", help="smoke run: 6 steps, 16-channel model")
    p.add_argument("--name", default="ddp_scaling")
    a = p.parse_args()
    if a.quick:
        a.steps, a.log_freq = 6, 2
    return a


def run(a, nproc: int, threads: int | None, workdir: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *C.trainer_args(a.config, workdir, a.steps, a.batch_size, a.precision),
        f"--config.training.log_freq={a.log_freq}",
        f"--config.training.eval_freq={10 * a.steps}",
        f"--config.training.snapshot_freq={10 * a.steps}",
        f"--config.training.snapshot_freq_for_preemption={10 * a.steps}",
    ]
    if a.quick:
        cmd.append("--config.model.model_channels=16")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if a.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(nproc))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=C.ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    ips = [v for _, v in learning_curve(workdir, "train/img_per_s")]
    return {
        "procs": nproc,
        "threads_per_proc": threads,
        "img_per_s": C.steady_median(ips),
        "intervals": ips,
        "wall_s": wall,
        "command": " ".join(cmd[1:]),
    }


def main() -> None:
    a = parse()
    info = C.machine("cuda" if a.gpus else "cpu")
    cores = os.cpu_count() or 1
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        if a.gpus:
            plan = {"1 GPU": (1, None), f"{a.gpus} GPUs": (a.gpus, None)}
        else:
            per = max(1, cores // a.procs)
            plan = {
                f"1 proc x {cores} threads": (1, cores),
                f"1 proc x {per} threads": (1, per),
                f"{a.procs} procs x {per} threads": (a.procs, per),
            }
        for label, (n, threads) in plan.items():
            r = run(a, n, threads, Path(tmp) / label.replace(" ", "_"))
            runs[label] = r
            print(
                f"{label}: {r['img_per_s']:.1f} img/s (global batch {a.batch_size}; wall {r['wall_s']:.0f} s)",
                flush=True,
            )
    labels = list(runs)
    if a.gpus:
        base, multi = runs[labels[0]], runs[labels[1]]
        eff = multi["img_per_s"] / (a.gpus * base["img_per_s"])
        summary = {"scaling_efficiency": eff, "speedup": multi["img_per_s"] / base["img_per_s"]}
    else:
        allcores, percore, multi = (runs[k] for k in labels)
        summary = {
            "scaling_efficiency": multi["img_per_s"] / (a.procs * percore["img_per_s"]),
            "speedup_vs_one_process_all_cores": multi["img_per_s"] / allcores["img_per_s"],
            "thread_scaling_one_process": allcores["img_per_s"] / percore["img_per_s"],
        }
    print("; ".join(f"{k} {v:.2f}" for k, v in summary.items()))
    data = {
        "machine": info,
        "config": a.config,
        "global_batch": a.batch_size,
        "steps": a.steps,
        "precision": a.precision,
        "quick": a.quick,
        "backend": "nccl" if a.gpus else "gloo",
        "runs": runs,
        "summary": summary,
    }
    md = C.header_md("DDP scaling (real trainer under torchrun)", info)
    md += (
        f"Config `{a.config}`, global batch {a.batch_size} (fixed), {a.steps} steps, "
        f"{'bf16' if a.precision == 'bf16' else 'fp32'}, backend {data['backend']}; img/s is the trainer's own "
        "`train/img_per_s` (median of log intervals after the first).\n\n"
    )
    md += C.md_table(
        ["run", "img/s", "wall s"], [[k, round(r["img_per_s"], 2), round(r["wall_s"], 1)] for k, r in runs.items()]
    )
    md += "\n" + "\n".join(f"- {k.replace('_', ' ')}: {v:.2f}" for k, v in summary.items()) + "\n"
    C.write_results(a.name, data, md)


if __name__ == "__main__":
    main()
