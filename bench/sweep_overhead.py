"""Launcher overheads: sweep expansion, SLURM submission, results table, per-trial cost of local/Ray.

    .venv/bin/python bench/sweep_overhead.py                 # everything (about 5 minutes)
    .venv/bin/python bench/sweep_overhead.py --quick         # smoke run: small sizes
    .venv/bin/python bench/sweep_overhead.py --parts dryrun,table

Parts (all in a temporary directory; nothing is left in runs/):

``dryrun``  a generated sweep file whose axes multiply to ``--dryrun-trials`` (10,000):
            ``python -m launchers run SWEEP --dry-run`` end to end (median of 3), plus the
            interpreter + import floor (``python -c 'import launchers.cli'``) and a cProfile of the
            same command in-process.
``slurm``   starts the test cluster (``slurm/cluster.sh start /tmp/bench-slurm``, private ports,
            ``LINTRANS_SLURM_MAX_ARRAY_SIZE=1001``), times ``run SWEEP --backend slurm --dry-run``
            and the real submission of ``--slurm-trials`` (1,000) trials end to end, ``scancel``s
            everything, profiles a second submission (cProfile), cancels again and stops the cluster.
``table``   writes ``--table-trials`` (10,000) finished local trials, each file by the function that
            writes it in a sweep (``trial.json``: ``launchers.trial.spec_of``; ``launch.json``,
            ``status.json``: ``launchers.state``; ``records/elbo-*.json``, ``records/fid-*.json``:
            ``lintrans.records.write_record`` of records shaped like ``evaluation.evaluate``'s; no
            fsync), then times ``launchers.table.rows(sweep, sweep.trials())`` + ``render`` (md and
            csv) in-process (median of 3, warm page cache) and ``python -m launchers table SWEEP``
            end to end (which also asks the local backend about each trial and rebuilds
            ``runs/results.csv``), and ``run SWEEP --dry-run`` over the same done trials (its plan
            reads each trial's records for evaluations still missing).
``local``   per-trial overhead of the local backend: sweeps of N trivial trials
``ray``     (``training.n_iters=0`` on an 8-channel model: load data, build the model, one held-out
            batch, no training) run serially (``local.slots: 1`` / ``ray.max_concurrent: 1``) for
            two values of N. Method: each trial records its own work in ``status.json``
            (``wall_s``: from trial start to done, measured inside the trial process);
            overhead per trial = (launcher wall - sum of the trials' own work) / N, and the
            marginal overhead is the slope of (wall - own work) against N (fixed start-up cost --
            interpreter, imports, ``ray.init`` -- drops out). The floor of a fresh trial process
            (``python -c 'import launchers.trial, lintrans.training_loop'``) is measured too.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

PY = sys.executable
LAUNCHER = [PY, "-m", "launchers"]  # what the `lintrans` command runs
MNIST5K = "configs/mnist5k/default_mnist5k_configs.py"
FORWARDS = ["heat", "identity", "constant_velocity", "constant_deceleration", "random_fixed_separable"]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="dryrun,slurm,table,local,ray")
    p.add_argument("--dryrun-trials", type=int, default=10_000)
    p.add_argument("--slurm-trials", type=int, default=1_000)
    p.add_argument("--table-trials", type=int, default=10_000)
    p.add_argument("--trivial-counts", default="4,8", help="N for the local/Ray per-trial overhead fit")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (printed)")
    p.add_argument("--quick", action="store_true", help="smoke run: 200 / 50 / 200 trials, N = 1,2")
    p.add_argument("--name", default="sweep_overhead")
    a = p.parse_args()
    if a.quick:
        a.dryrun_trials, a.slurm_trials, a.table_trials, a.trivial_counts, a.repeats = 200, 50, 200, "1,2", 1
    return a


# ----------------------------------------------------------------------------- helpers


def axes_for(n: int) -> dict[str, list]:
    """Axes forward (5) x K (<= 20) x sigma (<= 10) x lr whose product is exactly ``n``."""
    if n % 5:
        raise SystemExit(f"trial counts must be multiples of 5, got {n}")
    rest = n // 5
    nk = max(d for d in range(1, 21) if rest % d == 0)
    rest //= nk
    ns = max(d for d in range(1, 11) if rest % d == 0)
    nl = rest // ns
    return {
        "model.forward": FORWARDS,
        "model.K": [5 * (i + 1) for i in range(nk)],
        "model.sigma": [round(0.005 * (i + 1), 4) for i in range(ns)],
        "optim.lr": [round(1e-4 * (i + 1), 6) for i in range(nl)],
    }


def write_sweep(path: Path, name: str, axes: dict, config: str, overrides: dict, extra: dict | None = None) -> Path:
    import yaml

    doc = {
        "name": name,
        "config": config,
        "axes": axes,
        "seeds": [0],
        "overrides": overrides,
        "resources": {"cpus": 1, "gpus": 0, "mem_gb": 1, "time_min": 5},
        **(extra or {}),
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def cli_args(runs: Path, *args: str) -> list[str]:
    """Arguments of ``lintrans`` (``launchers.cli.main``) with its own runs directory."""
    return ["--runs-dir", str(runs), *args]


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=C.ROOT, env=env or os.environ.copy(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        last = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        raise RuntimeError(
            f"{' '.join(cmd[1:])} failed ({proc.returncode}): {last[0]}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    return wall, proc.stdout + proc.stderr


def profile_top(prof: cProfile.Profile | str, n: int = 12) -> list[dict]:
    stats = pstats.Stats(prof) if isinstance(prof, str) else pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, func), (_, nc, tt, ct, _) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": nc, "self_s": tt, "cumulative_s": ct})
    total = max((r["cumulative_s"] for r in rows), default=1.0)
    by_self = sorted(rows, key=lambda r: r["self_s"], reverse=True)[:n]
    by_cum = [
        r
        for r in sorted(rows, key=lambda r: r["cumulative_s"], reverse=True)
        if not r["function"].startswith(("<", "{"))
    ][:n]
    return {"total_s": total, "by_self": by_self, "by_cumulative": by_cum}


def import_floor(modules: str, repeats: int) -> float:
    times = [timed([PY, "-c", f"import {modules}"])[0] for _ in range(repeats)]
    return statistics.median(times)


# ----------------------------------------------------------------------------- parts


def part_dryrun(a, tmp: Path) -> dict:
    from launchers import cli
    from launchers.sweep import load

    axes = axes_for(a.dryrun_trials)
    sweep = write_sweep(tmp / "dry10k.yaml", "benchdry", axes, MNIST5K, {"training.n_iters": 10})
    args = cli_args(tmp / "dryrun", "run", str(sweep), "--dry-run")
    cmd = [*LAUNCHER, *args]
    walls = []
    for _ in range(a.repeats):
        wall, out = timed(cmd)
        walls.append(wall)
    last = out.strip().splitlines()[-1]
    floor = import_floor("launchers.cli", a.repeats)
    res = {
        "trials": a.dryrun_trials,
        "axes": {k: len(v) for k, v in axes.items()},
        "command": " ".join(cmd[1:]),
        "wall_s": statistics.median(walls),
        "walls": walls,
        "last_line": last,
        "import_floor_s": floor,
    }
    # in-process split: load (validation) / expand / dry-run print
    t0 = time.perf_counter()
    loaded = load(sweep, tmp / "dryrun")
    t1 = time.perf_counter()
    trials = loaded.trials()
    t2 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        cli.main(args)
    t3 = time.perf_counter()
    res["in_process"] = {
        "load_validate_s": t1 - t0,
        "expand_s": t2 - t1,
        "trials": len(trials),
        "cmd_run_dry_s": t3 - t2,
    }
    if not a.no_profile:
        prof = cProfile.Profile()
        with contextlib.redirect_stdout(io.StringIO()):
            prof.runcall(cli.main, args)
        res["profile"] = profile_top(prof)
    print(
        f"dry run of {a.dryrun_trials} trials: {res['wall_s']:.2f} s end to end (imports {floor:.2f} s; "
        f"in-process load {t1 - t0:.2f} s, expand {t2 - t1:.2f} s, whole dry run {t3 - t2:.2f} s)"
    )
    return res


def part_slurm(a, tmp: Path) -> dict:
    if not shutil.which("slurmctld"):
        return {"skipped": "SLURM is not installed (bash scripts/setup.sh installs it)"}
    t0 = time.perf_counter()
    env = C.start_slurm(1, LINTRANS_SLURM_MAX_ARRAY_SIZE="1001", LINTRANS_SLURM_CPUS="2")
    start_s = time.perf_counter() - t0
    res: dict = {"cluster_start_s": start_s, "trials": a.slurm_trials, "cluster_dir": C.SLURM_DIR}
    try:
        axes = axes_for(a.slurm_trials)
        extra = {"slurm": {"array_parallelism": 1, "max_requeues": 0}}
        sweep = write_sweep(tmp / "slurm1k.yaml", "benchslurm", axes, MNIST5K, {"training.n_iters": 0}, extra)
        args = cli_args(tmp / "slurm", "run", str(sweep), "--backend", "slurm")
        res["dry_run_s"], _ = timed([*LAUNCHER, *args, "--dry-run"], env)
        res["submit_s"], out = timed([*LAUNCHER, *args], env)
        res["submit_output_tail"] = out.strip().splitlines()[-3:]
        res["queued_after_submit"] = C.cancel_all(env)
        print(
            f"slurm: dry run {res['dry_run_s']:.2f} s, submit of {a.slurm_trials} trials {res['submit_s']:.2f} s "
            f"({res['queued_after_submit']} tasks queued, cancelled)"
        )
        if not a.no_profile:
            sweep2 = write_sweep(tmp / "slurm1k_b.yaml", "benchslurmb", axes, MNIST5K, {"training.n_iters": 0}, extra)
            prof_file = tmp / "slurm_submit.prof"
            args = cli_args(tmp / "slurm", "run", str(sweep2), "--backend", "slurm")
            res["profiled_submit_s"], _ = timed([PY, "-m", "cProfile", "-o", str(prof_file), *LAUNCHER[1:], *args], env)
            C.cancel_all(env)
            res["profile"] = profile_top(str(prof_file))
        # the pieces a submission is made of, measured on their own
        res["squeue_s"], _ = timed(["squeue", "-h", "-r", "-o", "%i"], env)
        res["scontrol_show_config_s"], _ = timed(["scontrol", "show", "config"], env)
        res["import_floor_s"] = import_floor("launchers.cli, launchers.backends.slurm, submitit", 1)
    finally:
        C.cancel_all(env)
        t0 = time.perf_counter()
        C.slurm_cluster("stop", env=env, check=False)
        res["cluster_stop_s"] = time.perf_counter() - t0
    return res


TABLE_STEPS = 150


def fake_record(ev: dict, run: dict, i: int, environment: dict) -> dict:
    """A record as ``lintrans.evaluation.evaluate`` makes it (breakdowns as ``negative_elbo``, ``run_fid`` give)."""
    from lintrans.elbo import DEQUANTIZATION_8BIT

    K, n_train, n_test = run["K"], 4500, 500
    if ev["mode"] == "elbo":
        metrics = {"nll_bpd": 1.2 + (i % 97) / 1000, "nll_nats": 650.0 + i % 13}
        breakdown = {
            "nll_nats": metrics["nll_nats"], "nll_nats_stderr": 1.5, "bpd": metrics["nll_bpd"],
            "nll_bpd_continuous": -3.1, "dequantization": DEQUANTIZATION_8BIT, "L_K": 3.2, "L_1": -600.0,
            "L_levels": [None, None, *[1.0 + j / 100 for j in range(K - 1)]], "L_mid_total": 40.0,
            "mse_per_level": [None, *[0.1 * j for j in range(K)]], "dims": 784, "K": K, "num_train": n_train,
            "num_test": n_test, "forward_applications": n_train + K * n_test, "sigma": run["sigma"],
            "delta": run["delta"],
        }  # fmt: skip
        evaluation = {"metric": "nll_bpd", "num_train": n_train, "num_test": n_test}
    else:
        metrics = {"fid_mnist_features": 20.0 + (i % 31) / 10}
        extractor = {"held_out_accuracy": 0.97, "feature_dim": 128, "sha256": "0" * 64}
        breakdown = {"num_gen": ev["num_gen"], "feature_extractor": extractor}
        evaluation = {"metric": "fid_mnist_features", "num_gen": ev["num_gen"], "reference": "mnist5k held-out digits",
                      "cleanfid_mode": ev["cleanfid_mode"]}  # fmt: skip
    return {
        "mode": ev["mode"], "experiment": ev["experiment_name"], "param": ev["param_name"], "dataset_name": "mnist5k",
        "run": run, "evaluation": {**evaluation, "batch_size": ev["batch_size"], "seed": ev["seed"]},
        "metrics": metrics, "breakdown": breakdown, "wall_s": 12.3, **environment,
    }  # fmt: skip


def fake_trial(sweep, trial, environment: dict) -> None:
    """A finished local trial's files, each written by the function that writes it in a real sweep."""
    from launchers import state
    from launchers.trial import spec_of
    from lintrans import config as cfg
    from lintrans import records
    from lintrans.atomic import write_json
    from lintrans.checkpoint_files import META
    from lintrans.evaluation import run_identity
    from lintrans.run import Run

    d, spec, job = trial.run_dir, spec_of(sweep, trial), str(100_000 + trial.index)
    write_json(d / state.SPEC, spec)
    state.write_launch(d, "local", job, str(d / "train.log"))  # before status.json: the trial answered it
    state.write_status(d, "done", attempt=1, backend="local", job_id=job, wall_s=321.5, preemptions=0,
                       resumed_from=0, n_iters=TABLE_STEPS, step=TABLE_STEPS,
                       eval_loss=0.05, train_loss=0.05, img_per_s=40.0, evaluating=None, eta_s=None)  # fmt: skip
    config = cfg.apply_overrides(sweep.base, trial.overrides)
    run = run_identity(config, Run(d), d / META, 0, TABLE_STEPS, cfg.sampling_delta(config))
    run["overrides"] = trial.overrides  # what source.json (not written here) would say
    for ev in spec["evaluations"]:
        records.write_record(d, fake_record(ev, run, trial.index, environment))


def part_table(a, tmp: Path) -> dict:
    from unittest import mock

    from launchers import table
    from launchers.sweep import load
    from lintrans.records import environment
    from lintrans.table_format import render

    runs = tmp / "table"
    evaluations = [{"mode": "elbo"}, {"mode": "fid", "num_gen": 500}]
    sweep_file = write_sweep(tmp / "table10k.yaml", "benchtable", axes_for(a.table_trials), MNIST5K,
                             {"training.n_iters": TABLE_STEPS}, {"evaluations": evaluations})  # fmt: skip
    sweep = load(sweep_file, runs)
    env = environment("cpu")
    t0 = time.perf_counter()
    with mock.patch("os.fsync"):  # the files are what matters here, not their durability (4 ms a file)
        for t in sweep.trials():
            fake_trial(sweep, t, env)
    gen_s = time.perf_counter() - t0
    files = [p for p in t.run_dir.rglob("*") if p.is_file()]
    sizes = [p.stat().st_size for p in files if p.parent.name == "records"]
    print(
        f"table: wrote {a.table_trials} fake trials ({len(files)} files each, records {sizes} bytes) in {gen_s:.1f} s"
    )

    walls, split = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        rows = table.rows(sweep, sweep.trials())
        t1 = time.perf_counter()
        md = render(rows, table.columns(rows), "md")
        t2 = time.perf_counter()
        render(rows, table.columns(rows), "csv")
        t3 = time.perf_counter()
        walls.append(t2 - t0)
        split.append({"rows_s": t1 - t0, "render_md_s": t2 - t1, "render_csv_s": t3 - t2})
    res = {
        "trials": len(rows),
        "files_per_trial": len(files),
        "record_bytes": sizes,
        "generate_s": gen_s,
        "rows_plus_render_md_s": statistics.median(walls),
        "walls": walls,
        "split": split,
        "md_lines": md.count("\n"),
    }
    cmd = [*LAUNCHER, *cli_args(runs, "table", str(sweep_file))]
    res["cli_wall_s"], _ = timed(cmd)
    res["cli_command"] = " ".join(cmd[1:])
    # Planning over done trials: `run --dry-run` reads each one's records to find evaluations still missing.
    cmd = [*LAUNCHER, *cli_args(runs, "run", str(sweep_file), "--dry-run")]
    res["cli_run_dry_done_s"], out = timed(cmd)
    res["cli_run_dry_done_last_line"] = out.strip().splitlines()[-1]
    if not a.no_profile:

        def table_md() -> str:
            table_rows = table.rows(sweep, sweep.trials())
            return render(table_rows, table.columns(table_rows), "md")

        prof = cProfile.Profile()
        prof.runcall(table_md)
        res["profile"] = profile_top(prof)
    print(
        f"table over {len(rows)} trials: rows + md {res['rows_plus_render_md_s']:.2f} s in-process "
        f"(rows {split[-1]['rows_s']:.2f} s), CLI `table` {res['cli_wall_s']:.2f} s; `run --dry-run` over the done "
        f"trials {res['cli_run_dry_done_s']:.2f} s ({res['cli_run_dry_done_last_line']})"
    )
    return res


TRIVIAL_CONFIG = '''"""bench: an 8-channel mnist5k model; with n_iters=0 a trial is load + build + one eval batch."""

from configs.mnist5k import default_mnist5k_configs


def get_config():
    config = default_mnist5k_configs.get_config()
    config.training.batch_size = 8
    config.training.n_iters = 0
    config.training.sampling_freq = 0
    config.eval.batch_size = 50
    config.eval.num_batches = 1
    model = config.model
    model.K = 5
    model.model_channels = 8
    model.channel_mult = (1, 1, 1)
    model.num_res_blocks = 1
    model.attention_levels = ()
    return config
'''


def trivial_runs(a, tmp: Path, backend: str) -> dict:
    from launchers import state
    from launchers.sweep import load

    config = tmp / "bench_trivial.py"
    config.write_text(TRIVIAL_CONFIG)
    points = []
    for n in (int(v) for v in a.trivial_counts.split(",")):
        name = f"benchtrivial{backend}{n}"
        extra = {"local": {"slots": 1}} if backend == "local" else {"ray": {"max_concurrent": 1, "max_failures": 0}}
        sweep = write_sweep(
            tmp / f"{name}.yaml",
            name,
            {"model.K": [2 + i for i in range(n)]},
            str(config),
            {"training.n_iters": 0},
            extra,
        )
        runs = tmp / backend
        env = dict(os.environ, RAY_DEDUP_LOGS="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
        wall, out = timed([*LAUNCHER, *cli_args(runs, "run", str(sweep), "--backend", backend)], env)
        statuses = [state.status(t.run_dir) for t in load(sweep, runs).trials()]
        unfinished = [
            f"{st.get('state', 'no status')}: {st.get('reason')}" for st in statuses if st.get("state") != "done"
        ]
        if unfinished:
            raise RuntimeError(f"{backend}: {len(unfinished)} of {n} trials not done ({unfinished[0]})\n{out[-2000:]}")
        own = sum(st["wall_s"] for st in statuses)
        points.append(
            {
                "n": n,
                "wall_s": wall,
                "own_work_s": own,
                "own_work_per_trial_s": own / n,
                "overhead_per_trial_s": (wall - own) / n,
            }
        )
        print(
            f"{backend}: {n} trivial trials in {wall:.2f} s, own work {own:.2f} s, "
            f"overhead {(wall - own) / n:.2f} s per trial (all-in)"
        )
    res = {
        "points": points,
        "method": "overhead = (launcher wall - sum of status.json wall_s) / N; "
        "marginal = slope of (wall - own work) over N",
    }
    if len(points) >= 2:
        p0, p1 = points[0], points[-1]
        res["marginal_overhead_per_trial_s"] = (
            (p1["wall_s"] - p1["own_work_s"]) - (p0["wall_s"] - p0["own_work_s"])
        ) / (p1["n"] - p0["n"])
        res["fixed_overhead_s"] = (p0["wall_s"] - p0["own_work_s"]) - res["marginal_overhead_per_trial_s"] * p0["n"]
    return res


def part_local(a, tmp: Path) -> dict:
    res = trivial_runs(a, tmp, "local")
    res["trial_process_floor_s"] = import_floor("launchers.trial, lintrans.training_loop", a.repeats)
    res["python_torch_import_s"] = import_floor("torch", a.repeats)
    res["python_bare_s"] = import_floor("sys", a.repeats)
    print(
        f"local: marginal overhead {res.get('marginal_overhead_per_trial_s', float('nan')):.2f} s per trial; "
        f"fresh trial process floor (python + imports) {res['trial_process_floor_s']:.2f} s, torch import alone "
        f"{res['python_torch_import_s']:.2f} s"
    )
    return res


def part_ray(a, tmp: Path) -> dict:
    try:
        import ray  # noqa: F401
    except ImportError:
        return {"skipped": "ray is not installed"}
    res = trivial_runs(a, tmp, "ray")
    print(
        f"ray: marginal overhead {res.get('marginal_overhead_per_trial_s', float('nan')):.2f} s per trial, "
        f"fixed {res.get('fixed_overhead_s', float('nan')):.2f} s"
    )
    return res


PARTS = {"dryrun": part_dryrun, "slurm": part_slurm, "table": part_table, "local": part_local, "ray": part_ray}


def fmt(x, unit: str = "s", digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f} {unit}"


def main() -> None:
    a = parse()
    os.chdir(C.ROOT)  # sweep files name their config relative to the repository
    info = C.machine("cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    out = {}
    try:
        for part in a.parts.split(","):
            try:
                out[part] = PARTS[part](a, tmp)
            except Exception as exc:  # noqa: BLE001 - record the failure, carry on with the other parts
                message = f"{type(exc).__name__}: {exc}"  # one line for the tables, the rest in "output"
                out[part] = {"error": message.splitlines()[0], "output": message}
                print(f"{part}: FAILED: {exc}", file=sys.stderr)
    finally:
        if a.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    data = {
        "machine": info,
        "quick": a.quick,
        "parts": out,
        "targets": {"dryrun_10k_s": 2.0, "slurm_submit_1k_s": 10.0, "table_10k_s": 2.0, "local_overhead_s": 0.5},
    }
    md = C.header_md("Sweep and launcher overheads", info)
    rows = []
    d, s, t = (out.get(k, {}) for k in ("dryrun", "slurm", "table"))
    if "wall_s" in d:
        ip = d["in_process"]
        label = f"expand + dry-run, {d['trials']} trials (`run --dry-run`, end to end)"
        details = (
            f"imports alone {fmt(d['import_floor_s'])}; in-process: load+validate {fmt(ip['load_validate_s'])}, "
            f"expand {fmt(ip['expand_s'], digits=3)}, whole dry run {fmt(ip['cmd_run_dry_s'])}"
        )
        rows.append([label, fmt(d["wall_s"]), "< 2 s", details])
    if "submit_s" in s:
        label = f"submit {s['trials']} trials to the test SLURM cluster (end to end)"
        details = (
            f"dry run {fmt(s['dry_run_s'])}; squeue {fmt(s['squeue_s'])}; cluster start {fmt(s['cluster_start_s'])}"
        )
        rows.append([label, fmt(s["submit_s"]), "< 10 s", details])
    if "rows_plus_render_md_s" in t:
        label = f"table over {t['trials']} trials (`table.rows` + md render, in-process)"
        rows.append(
            [label, fmt(t["rows_plus_render_md_s"]), "< 2 s", f"`lintrans table` end to end {fmt(t['cli_wall_s'])}"]
        )
    for name in ("local", "ray"):
        r = out.get(name, {})
        if "points" in r:
            last = r["points"][-1]
            label = f"{name}: overhead per trivial trial (N={last['n']}, serial)"
            details = (
                f"marginal {fmt(r.get('marginal_overhead_per_trial_s'))}, fixed {fmt(r.get('fixed_overhead_s'))}; "
                f"own work {fmt(last['own_work_per_trial_s'])}/trial"
            )
            if name == "local":
                details += f"; fresh trial process floor {fmt(r['trial_process_floor_s'])}"
            rows.append([label, fmt(last["overhead_per_trial_s"]), "< 0.5 s" if name == "local" else "", details])
    rows += [
        [name, "n/a", "", r.get("error") or r.get("skipped")]
        for name, r in out.items()
        if "error" in r or "skipped" in r
    ]
    md += C.md_table(["measurement", "figure", "target", "details"], rows)
    for name, r in out.items():
        prof = r.get("profile")
        if prof:
            md += f"\n### {name}: cProfile, top functions by self time (total {prof['total_s']:.2f} s)\n\n"
            md += C.md_table(
                ["function", "calls", "self s", "cumulative s"],
                [
                    [p["function"], p["calls"], round(p["self_s"], 3), round(p["cumulative_s"], 3)]
                    for p in prof["by_self"][:10]
                ],
            )
    md += (
        "\nMethod for local/Ray: each trivial trial records its own work in `status.json` (`wall_s`, measured "
        "inside the trial process from start to done); overhead = launcher wall - sum of own work, per trial. "
        "Marginal = slope over the two sweep sizes (fixed start-up removed).\n"
    )
    C.write_results(a.name, data, md)


if __name__ == "__main__":
    main()
