"""``lintrans run|status|cancel|table`` (also ``python -m launchers ...``): one sweep file, any backend, one table.

    lintrans run sweeps/quickstart.yaml --backend local
    lintrans status sweeps/quickstart.yaml
    lintrans table sweeps/quickstart.yaml --format md --plot k --plot curves

``run`` submits what is not finished: done and stopped trials are skipped, preempted and crashed
ones resume from their checkpoints, trials still queued or running are left alone, failures that
running again cannot fix (bad input, non-finite loss) are reported and left (``--retry-failed``
re-runs them). It exits 1 when a trial of the sweep ended failed (``--allow-failures``: 0). A
sweep holds a submission lock, so a second ``run`` of it waits, then sees the first one's trials.
Bad input exits 2 with one line naming the file, line and key.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from pathlib import Path

from launchers import backends, state, table
from launchers.state import Observation
from launchers.sweep import BACKENDS, MAX_TRIALS, Sweep, Trial, load
from launchers.trial import write_spec
from lintrans.errors import UsageError, choices, printable
from lintrans.procenv import EXIT_FAILED, EXIT_USAGE
from lintrans.tables import FORMATS, render


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lintrans", description=__doc__.split("\n")[0])
    p.add_argument("--runs-dir", default=None, help="root of run directories (default: runs/ or the sweep's runs_dir)")
    p.add_argument("--max-trials", type=int, default=MAX_TRIALS, help=f"refuse larger sweeps (default {MAX_TRIALS:,})")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="submit the unfinished trials of a sweep")
    run.add_argument("sweep")
    run.add_argument("--backend", default=None, help=f"one of {', '.join(BACKENDS)} (default: the sweep's, or local)")
    run.add_argument("--dry-run", action="store_true", help="print the trials (and sbatch scripts), submit nothing")
    run.add_argument(
        "--sbatch-only", action="store_true", help="slurm: write plain sbatch array scripts, submit nothing"
    )
    run.add_argument("--ray-address", default=None, help="ray: address of an existing cluster")
    run.add_argument("--gpus", default=None, help="local: GPU ids to use, e.g. 0,3 (default: CUDA_VISIBLE_DEVICES)")
    run.add_argument("--allow-failures", action="store_true", help="exit 0 even when trials failed")
    run.add_argument("--retry-failed", action="store_true", help="also re-run failures a re-run cannot fix by itself")
    run.add_argument("--resume-stopped", action="store_true", help="also resume trials a scheduler stopped early")
    sub.add_parser("import-ihdm", help="turn an IHDM run directory into a lintrans run (lintrans import-ihdm --help)")
    for name, text in (("status", "per-trial state"), ("cancel", "cancel queued/running trials")):
        sub.add_parser(name, help=text).add_argument("sweep")
    tab = sub.add_parser("table", help="results table of one or more sweeps")
    tab.add_argument("sweeps", nargs="+")
    tab.add_argument("--format", default="md", help=f"one of {', '.join(FORMATS)}")
    tab.add_argument("--grouped", action="store_true", help="mean ± std over seeds")
    tab.add_argument("--all", action="store_true", help="also trials of older versions of the sweep file")
    tab.add_argument("--sort", default=None, metavar="METRIC", help="order by a metric (best first)")
    tab.add_argument("--best", type=int, default=None, metavar="N", help="only the N best by --sort (or the objective)")
    tab.add_argument("--plot", action="append", default=[], metavar="KIND",
                     help=f"{', '.join(table.PLOTS)} (into <sweep>/plots/), or a .png path for 'k'")  # fmt: skip
    return p


# --------------------------------------------------------------------------- shared pieces


def observe(trials: list[Trial], strict: bool = False) -> dict[str, Observation]:
    """What each trial's scheduler says, asking each backend about the trials it launched.

    ``status`` and ``table`` still answer from the run directories when a scheduler cannot be
    asked (with a warning); ``run`` (``strict``) stops, since it would act on a guess.
    """
    by_backend: dict[str, list[Trial]] = {}
    for t in trials:
        name = state.launch(t.run_dir).get("backend")
        if name in BACKENDS:
            by_backend.setdefault(name, []).append(t)
    out: dict[str, Observation] = {}
    for name, group in by_backend.items():
        try:
            out.update(backends.get(name).observe(group))
        except UsageError as exc:
            if strict:
                raise
            logging.warning("%s; states below are from the run directories only", exc)
    return out


def print_trials(sweep: Sweep, trials: list[Trial], views: dict[str, dict], plan: dict[str, str] | None = None) -> None:
    width = max((len(t.label) for t in trials), default=10)
    print(f"{'trial':<10}  {'values':<{width}}  {'state':<9} {'step':>13} {'eta':>6} {'try':>3}  job / log / reason")
    counts: dict[str, int] = {}
    for t in trials:
        st = views[t.id]
        counts[st["state"]] = counts.get(st["state"], 0) + 1
        note = st["reason"] or " ".join(str(x) for x in (st["backend"], st["job_id"], st["log"]) if x)
        if plan:
            note = f"{plan[t.id]}  {note}".strip()
        step = "" if st["step"] is None else f"{st['step']}/{st['n_iters']}" if st.get("n_iters") else st["step"]
        eta = _duration(st["eta_s"]) if st.get("eta_s") else ""
        print(f"{t.id:<10}  {t.label:<{width}}  {st['state']:<9} {step!s:>13} {eta:>6} {st['attempt']:>3}  {note}")
    total = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"sweep {sweep.name}: {len(trials)} trials ({total})")


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}" if s >= 3600 else f"{s // 60}m{s % 60:02d}" if s >= 60 else f"{s}s"


def print_table(sweep: Sweep, trials: list[Trial], observations: dict) -> None:
    rows = table.rows(sweep, trials, observations)
    print(render(rows, table.brief(rows)), end="")
    table.rebuild_shared(sweep.runs_dir)


def report_failures(trials: list[Trial], views: dict[str, dict]) -> list[Trial]:
    failed = [t for t in trials if views[t.id]["state"] == "failed"]
    for t in failed:
        print(f"failed  {t.id} {t.label}: {views[t.id]['reason']}", file=sys.stderr)
    return failed


# --------------------------------------------------------------------------- commands


def cmd_run(args) -> int:
    sweep = load(args.sweep, args.runs_dir, args.max_trials)
    backend_name = args.backend or ("slurm" if args.sbatch_only else sweep.backend) or "local"
    if backend_name not in BACKENDS:
        raise UsageError(f"unknown backend '{backend_name}'; valid: {choices(BACKENDS)}")
    if args.sbatch_only and backend_name != "slurm":
        raise UsageError(f"--sbatch-only writes SLURM scripts; it cannot go with --backend {backend_name}")
    options = (
        {"gpus": args.gpus}
        if backend_name == "local"
        else {"address": args.ray_address}
        if backend_name == "ray"
        else {}
    )
    backend = backends.get(backend_name, **options)
    if sweep.search.method == "optuna":
        from launchers.search import run_optuna

        return run_optuna(sweep, backend, args)
    trials = sweep.trials()
    if args.dry_run:
        return dry_run(sweep, trials, backend)
    lock = state.Lock(sweep.dir / ".submit.lock")
    if not lock.acquire():
        print(f"another `run` of sweep {sweep.name} holds its submission lock; waiting for it", flush=True)
        lock.acquire(block=True)
    try:
        return submit(sweep, trials, backend, args)
    finally:
        lock.release()


def plan_for(trials: list[Trial], views: dict[str, dict], args) -> dict[str, str]:
    """What ``run`` does with each trial."""
    plan = {}
    for t in trials:
        st = views[t.id]
        if st["state"] == "done":
            plan[t.id] = "skip (done)"
        elif st["state"] in ("queued", "running"):
            plan[t.id] = f"skip ({st['state']})"
        elif st["state"] == "stopped" and not args.resume_stopped:
            plan[t.id] = "skip (stopped; --resume-stopped resumes it)"
        elif st["state"] == "failed" and not st["resumable"] and not args.retry_failed:
            plan[t.id] = "skip (failed; --retry-failed re-runs it)"
        else:
            plan[t.id] = "submit" if st["state"] == "pending" else "resume"
    return plan


def dry_run(sweep: Sweep, trials: list[Trial], backend) -> int:
    views = {t.id: state.view(t.run_dir) for t in trials}
    plan = plan_for(trials, views, argparse.Namespace(resume_stopped=False, retry_failed=False))
    print_trials(sweep, trials, views, plan)
    todo = [t for t in trials if plan[t.id] in ("submit", "resume")]
    print(backend.dry_run(sweep, todo))
    print(f"dry run: {len(todo)} of {len(trials)} trials would be submitted to {backend.name}")
    return 0


def submit(sweep: Sweep, trials: list[Trial], backend, args) -> int:
    observations = observe(trials, strict=True)
    views = {t.id: state.view(t.run_dir, observations.get(t.id)) for t in trials}
    plan = plan_for(trials, views, args)
    todo = [t for t in trials if plan[t.id] in ("submit", "resume")]
    for t in todo:
        write_spec(sweep, t)
        if views[t.id]["state"] in ("stopped", "failed"):  # asked to go again: the next start is a resume
            state.write_status(t.run_dir, "preempted", reason=f"re-run after {views[t.id]['state']}", resumable=True)
    code = 0
    if not todo:
        kinds = Counter(views[t.id]["state"] for t in trials)  # every trial is skipped for its state
        print("nothing to submit: " + ", ".join(f"{n} {kind}" for kind, n in kinds.items()))
    elif args.sbatch_only:
        for path in backend.sbatch_scripts(sweep, todo):
            print(f"wrote {path} (submit with: sbatch {path})")
        return 0
    else:
        code = backend.submit(sweep, todo)
    if backend.name == "slurm" and todo:
        print(f"follow with: lintrans status {args.sweep}")
        failed = report_failures([t for t in trials if plan[t.id].startswith("skip (failed")], views)
        return EXIT_FAILED if failed and not args.allow_failures else 0
    observations = observe(trials)
    views = {t.id: state.view(t.run_dir, observations.get(t.id)) for t in trials}
    print_table(sweep, trials, observations)
    failed = report_failures(trials, views)
    if code not in (0, EXIT_FAILED):
        return code
    return EXIT_FAILED if failed and not args.allow_failures else 0


def cmd_status(args) -> int:
    sweep = load(args.sweep, args.runs_dir, args.max_trials, check_forwards=False)
    trials = sweep.trials() if sweep.search.method != "optuna" else _study_trials(sweep)
    observations = observe(trials)
    print_trials(sweep, trials, {t.id: state.view(t.run_dir, observations.get(t.id)) for t in trials})
    return 0


def cmd_cancel(args) -> int:
    sweep = load(args.sweep, args.runs_dir, args.max_trials, check_forwards=False)
    trials = sweep.trials() if sweep.search.method != "optuna" else _study_trials(sweep)
    by_backend: dict[str, list[Trial]] = {}
    for t in trials:
        by_backend.setdefault(state.launch(t.run_dir).get("backend") or "local", []).append(t)
    for name, group in by_backend.items():
        n = backends.get(name if name in BACKENDS else "local").cancel(group)
        print(f"{name}: cancelled {n} trial(s); re-run `run` to resume them")
    return 0


def _study_trials(sweep: Sweep) -> list[Trial]:
    from launchers.search import study_trials

    return study_trials(sweep)


def cmd_table(args) -> int:
    if args.format not in FORMATS:
        raise UsageError(f"unknown format '{args.format}'; valid: {choices(FORMATS)}")
    for kind in args.plot:
        if kind not in table.PLOTS and not kind.endswith(".png"):
            raise UsageError(f"unknown --plot '{kind}'; valid: {choices(table.PLOTS)}, or a .png path")
    rows, sweeps = [], []
    for path in args.sweeps:
        sweep = load(path, args.runs_dir, args.max_trials, check_forwards=False)
        trials = sweep.trials() if sweep.search.method != "optuna" else _study_trials(sweep)
        rows += table.rows(sweep, trials, observe(trials), stale=args.all)
        sweeps.append((sweep, trials))
    objective = sweeps[0][0].search.objective
    if args.sort or args.best:
        metric = args.sort or objective.metric
        rows = table.sort(rows, metric, objective.mode if metric == objective.metric else "min", args.best)
    out = table.render_grouped(rows, args.format) if args.grouped else render(rows, table.columns(rows), args.format)
    sys.stdout.write(out)
    for kind in args.plot:
        for sweep, trials in sweeps:
            folder = sweep.dir / "plots"
            if kind == "curves":
                written = table.plot_curves(sweep, trials, folder / "curves.png")
            elif kind == "axes":
                written = table.plot_axes(sweep, rows, objective.metric, folder / "axes.png")
            elif kind == "samples":
                written = table.plot_samples(sweep, trials, folder / "samples.png")
            else:
                written = table.plot_k(rows, Path(kind) if kind.endswith(".png") else folder / "k.png")
            print(f"plot: {written}" if written else f"plot {kind}: nothing to plot yet", file=sys.stderr)
    table.rebuild_shared(sweeps[0][0].runs_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["import-ihdm"]:  # an IHDM run directory into a lintrans one (lintrans.ihdm)
        from lintrans import ihdm

        return ihdm.main(["lintrans import-ihdm", *argv[1:]])
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    args = parser().parse_args(argv)
    try:
        return {"run": cmd_run, "status": cmd_status, "cancel": cmd_cancel, "table": cmd_table}[args.command](args)
    except UsageError as exc:
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
