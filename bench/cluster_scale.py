"""Scheduler load at 10,000 trials: what one ``run``, ``status``, ``table`` and re-``run`` ask SLURM.

    .venv/bin/python bench/cluster_scale.py                    # 10,000 trials (about 5 minutes)
    .venv/bin/python bench/cluster_scale.py --trials 2000      # smaller

Starts the benchmarks' test cluster (``slurm/cluster.sh``, one node, private ports) with a real site's
``MaxArraySize`` (1001, so the sweep goes out as several arrays), submits a sweep of ``--trials``
trivial trials (``training.n_iters: 0``) **held** (``#SBATCH --hold``: they stay PENDING, so nothing
runs and every trial is one of the queue's jobs while the commands are timed), then times, end to
end as a user runs them, with a logging wrapper first on ``PATH`` for each SLURM client command:

``run``         the submission (sbatch calls, wall time)
``status``      one ``lintrans status`` of the whole sweep (squeue/sacct calls, wall time)
``table``       one ``lintrans table`` (the same, plus reading every trial's files)
``run again``   a second ``run`` of the queued sweep: it plans, submits nothing

Targets (issue "A good citizen of a production SLURM cluster"): one ``status`` of 10,000 trials
makes at most 2 calls of each kind and takes at most 3 s here; the submission at most 40 s. Then
``scancel`` everything and stop the cluster. Writes ``bench/results/cluster_scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import _common as C

CLIENTS = ("sbatch", "squeue", "sacct", "scontrol", "scancel", "sinfo")
NAME = "scale"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=10_000, help="a multiple of 10")
    p.add_argument("--max-array-size", type=int, default=1001)
    return p.parse_args()


def write_sweep(folder: Path, trials: int) -> Path:
    """``trials`` trivial trials: 10 horizons x seeds; held, so that none runs while the commands are timed."""
    sweep = {
        "name": NAME,
        "config": str(C.ROOT / "configs" / "mnist5k" / "default_mnist5k_configs.py"),
        "axes": {"model.K": list(range(3, 13))},
        "seeds": list(range(trials // 10)),
        "overrides": {"training.n_iters": 0},
        "resources": {"cpus": 1, "time_min": 10},
        "slurm": {"array_parallelism": 8, "additional": {"hold": True}},
    }
    path = folder / f"{NAME}.yaml"
    path.write_text(json.dumps(sweep, indent=1))
    return path


def logging_clients(folder: Path) -> tuple[Path, Path]:
    """Wrappers for the SLURM client commands that log each call (its argv), then run the real one."""
    bin_dir, log = folder / "logged-bin", folder / "calls.log"
    bin_dir.mkdir()
    for tool in CLIENTS:
        real = shutil.which(tool)
        if real is None:
            continue
        wrapper = bin_dir / tool
        wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "{tool} $*" >> {log}\nexec {real} "$@"\n')
        wrapper.chmod(0o755)
    return bin_dir, log


def timed(cmd: list[str], env: dict, log: Path) -> dict:
    """Wall time, exit code and the SLURM calls (by command) of one lintrans command, end to end."""
    log.write_text("")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=C.ROOT, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    calls = [line.split()[0] for line in log.read_text().splitlines() if line.strip()]
    if done.returncode != 0:
        print(done.stdout[-2000:] + done.stderr[-2000:], file=sys.stderr)
    return {"wall_s": wall, "rc": done.returncode, "calls": dict(Counter(calls)), "tail": done.stdout[-300:]}


def report(a: argparse.Namespace, info: dict, res: dict) -> str:
    rows = []
    for what, target in (("run", "submission <= 40 s"), ("status", "<= 2 calls of each kind, <= 3 s"),
                         ("table", ""), ("run_again", "")):  # fmt: skip
        r = res[what]
        calls = ", ".join(f"{k} {v}" for k, v in sorted(r["calls"].items())) or "none"
        rows.append([what.replace("_", " "), f"{r['wall_s']:.2f} s", calls, r["rc"], target])
    return (
        C.header_md(f"Scheduler load at {a.trials:,} trials", info)
        + f"Test cluster: one node, `MaxArraySize={a.max_array_size}` (the sweep went out as "
        f"{res['arrays']} arrays); every trial held (PENDING) while the commands ran: "
        f"{res['queued']:,} array tasks in `squeue` after the submission.\n\n"
        + C.md_table(["command", "wall", "SLURM calls", "exit", "target"], rows)
        + "\n\nEach command is a fresh `python -m launchers ...` process, timed end to end (interpreter and "
        "imports included); calls are counted by logging wrappers first on `PATH`.\n"
    )


def main() -> int:
    a = parse()
    if a.trials < 10 or a.trials % 10:
        sys.exit(f"--trials {a.trials}: a positive multiple of 10")
    if not shutil.which("slurmctld"):
        sys.exit("SLURM is not installed (bash scripts/setup.sh installs it)")
    info = C.machine()
    tmp = Path(tempfile.mkdtemp(prefix="lintrans-scale-"))
    env = C.start_slurm(1, LINTRANS_SLURM_MAX_ARRAY_SIZE=str(a.max_array_size), LINTRANS_SLURM_CPUS="2")
    try:
        sweep = write_sweep(tmp, a.trials)
        bin_dir, log = logging_clients(tmp)
        logged = {**env, "PATH": f"{bin_dir}:{env['PATH']}", "PYTHONUNBUFFERED": "1"}
        cli = [sys.executable, "-m", "launchers", "--runs-dir", str(tmp / "runs")]
        res: dict = {"trials": a.trials, "max_array_size": a.max_array_size, "machine": info}
        res["run"] = timed([*cli, "run", str(sweep), "--backend", "slurm"], logged, log)
        res["arrays"] = res["run"]["calls"].get("sbatch", 0)  # one sbatch per array
        queued = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], env=env, capture_output=True, text=True)
        res["queued"] = len(queued.stdout.split())
        print(f"run: {res['run']['wall_s']:.1f} s, {res['queued']} tasks queued", flush=True)
        res["status"] = timed([*cli, "status", str(sweep)], logged, log)
        res["table"] = timed([*cli, "table", str(sweep)], logged, log)
        res["run_again"] = timed([*cli, "run", str(sweep), "--backend", "slurm"], logged, log)
        for what in ("status", "table", "run_again"):
            print(f"{what}: {res[what]['wall_s']:.2f} s, calls {res[what]['calls']}", flush=True)
        C.write_results("cluster_scale", res, report(a, info, res))
        status = res["status"]
        ok = res["run"]["rc"] == 0 and status["rc"] == 0 and all(n <= 2 for n in status["calls"].values())
        return 0 if ok else 1
    finally:
        C.cancel_all(env)
        C.slurm_cluster("stop", env=env, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
