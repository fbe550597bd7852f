"""``python -m launchers run|status|cancel|table``: one sweep file, any backend, one table.

    python -m launchers run sweeps/quickstart.yaml --backend local
    python -m launchers status sweeps/quickstart.yaml
    python -m launchers table sweeps/quickstart.yaml --format md --plot runs/quickstart.png

``run`` submits what is not finished: finished trials are skipped, interrupted ones resume from
their checkpoints, trials still queued or running are left alone; a second ``run`` of a finished
sweep submits nothing. Bad input exits 2 with one line naming the file, line and key.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launchers import state, table
from launchers.sweep import BACKENDS, Sweep, Trial, load
from launchers.trial import is_running, write_spec
from lintrans.errors import EXIT_USAGE, UsageError, choices

FORMATS = ("md", "csv", "json")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launchers", description=__doc__.split("\n")[0])
    p.add_argument("--runs-dir", default=None, help="root of run directories (default: runs/ or the sweep's runs_dir)")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="submit the unfinished trials of a sweep")
    run.add_argument("sweep")
    run.add_argument("--backend", default=None, help=f"one of {', '.join(BACKENDS)} (default: the sweep's, or local)")
    run.add_argument("--dry-run", action="store_true", help="print the trials (and sbatch scripts), submit nothing")
    run.add_argument("--sbatch-only", action="store_true", help="slurm: write plain sbatch array scripts into slurm/")
    run.add_argument("--ray-address", default=None, help="ray: address of an existing cluster")
    for name, text in (("status", "per-trial state"), ("cancel", "cancel queued/running trials")):
        sub.add_parser(name, help=text).add_argument("sweep")
    tab = sub.add_parser("table", help="results table of one or more sweeps")
    tab.add_argument("sweeps", nargs="+")
    tab.add_argument("--format", default="md", help=f"one of {', '.join(FORMATS)}")
    tab.add_argument("--grouped", action="store_true", help="mean ± std over seeds")
    tab.add_argument("--plot", default=None, help="write a PNG of FID and NLL against K")
    return p


def trial_state(trial: Trial) -> dict:
    """State as a user means it: 'running' only while a process really holds the trial."""
    st = state.summary(trial.run_dir)
    if st["state"] == "running" and not is_running(trial.run_dir):
        st["state"] = "interrupted"
    return st


def active(trial: Trial, st: dict, queued: set[str] | None) -> bool:
    if is_running(trial.run_dir):
        return True
    return queued is not None and st.get("backend") == "slurm" and st.get("job_id") in queued


def print_trials(sweep: Sweep, trials: list[Trial], extra: dict[str, str] | None = None) -> None:
    width = max((len(t.label) for t in trials), default=10)
    print(f"{'trial':<10}  {'values':<{width}}  {'state':<11} {'step':>6} {'try':>3}  job / log / reason")
    counts: dict[str, int] = {}
    for t in trials:
        st = trial_state(t)
        counts[st["state"]] = counts.get(st["state"], 0) + 1
        note = st["reason"] or " ".join(str(x) for x in (st["backend"], st["job_id"], st["log"]) if x)
        if extra:
            note = extra.get(t.id, "") + (f"  {note}" if note else "")
        step = "" if st["step"] is None else st["step"]
        print(f"{t.id:<10}  {t.label:<{width}}  {st['state']:<11} {step:>6} {st['attempt']:>3}  {note}")
    total = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"sweep {sweep.name}: {len(trials)} trials ({total})")


def cmd_run(args) -> int:
    sweep = load(args.sweep, args.runs_dir)
    backend = args.backend or sweep.backend or "local"
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend '{backend}'; valid: {choices(BACKENDS)}")
    trials = sweep.trials()
    queued = None
    if backend == "slurm" and not args.dry_run and not args.sbatch_only:
        from launchers.slurm import queued_jobs

        queued = queued_jobs()
    todo, plan = [], {}
    for t in trials:
        st = trial_state(t)
        if st["state"] == "done":
            plan[t.id] = "skip (done)"
        elif active(t, st, queued):
            plan[t.id] = "skip (queued/running)"
        else:
            plan[t.id] = "resume" if st["state"] != "pending" else "submit"
            todo.append(t)
    if args.dry_run:
        print_trials(sweep, trials, extra=plan)
        if backend == "slurm":
            from launchers import slurm

            print(f"\n# sbatch script submitit would submit for {len(todo)} trial(s):")
            print(slurm.dry_run_script(sweep, max(1, len(todo))))
        print(f"dry run: {len(todo)} of {len(trials)} trials would be submitted to {backend}")
        return 0
    for t in trials:
        write_spec(sweep, t)
    if not todo:
        print(f"nothing to submit: {sum(v == 'skip (done)' for v in plan.values())} done, "
              f"{sum(v.startswith('skip (q') for v in plan.values())} queued or running")  # fmt: skip
        _print_table(sweep)
        return 0
    if backend == "local":
        from launchers import local

        code = local.run(sweep, todo)
        _print_table(sweep)
        return code
    if backend == "ray":
        from launchers import ray_tune

        code = ray_tune.run(sweep, todo, args.ray_address)
        _print_table(sweep)
        return code
    from launchers import slurm

    if args.sbatch_only:
        folder = Path("slurm") / "generated"
        for path in slurm.sbatch_scripts(sweep, todo, folder):
            print(f"wrote {path} (submit with: sbatch {path})")
        return 0
    slurm.submit(sweep, todo)
    print(f"follow with: python -m launchers status {args.sweep}")
    return 0


def _print_table(sweep: Sweep) -> None:
    rows = table.rows(sweep.dir)
    brief = [c for c in table.columns(rows) if "." not in c or c.split(".")[0] in table.CONFIG_SECTIONS]
    print(table.render(rows, "md", cols=[c for c in brief if c not in ("sweep", "reason")]))
    table.rebuild_shared(sweep.runs_dir)


def cmd_status(args) -> int:
    sweep = load(args.sweep, args.runs_dir)
    print_trials(sweep, sweep.trials())
    return 0


def cmd_cancel(args) -> int:
    sweep = load(args.sweep, args.runs_dir)
    trials = [t for t in sweep.trials() if trial_state(t)["state"] != "done"]
    by_backend: dict[str, list[Trial]] = {}
    for t in trials:
        by_backend.setdefault(state.summary(t.run_dir).get("backend") or "local", []).append(t)
    if "slurm" in by_backend:
        from launchers import slurm

        slurm.cancel(by_backend.pop("slurm"))
    import os
    import signal

    stopped = 0
    for t in (t for group in by_backend.values() for t in group):
        st = state.status(t.run_dir)
        if is_running(t.run_dir) and st.get("pid"):
            os.kill(st["pid"], signal.SIGTERM)  # the trial checkpoints and exits, resumable
            stopped += 1
    print(f"cancelled: {stopped} local/ray trial process(es) signalled; re-run `run` to resume")
    return 0


def cmd_table(args) -> int:
    if args.format not in FORMATS:
        raise UsageError(f"unknown format '{args.format}'; valid: {choices(FORMATS)}")
    rows = []
    runs = None
    for path in args.sweeps:
        sweep = load(path, args.runs_dir)
        rows += table.rows(sweep.dir)
        runs = sweep.runs_dir
    out = table.render_grouped(rows, args.format) if args.grouped else table.render(rows, args.format)
    sys.stdout.write(out)
    if args.plot:
        written = table.plot(rows, Path(args.plot))
        print(f"plot: {written}" if written else "plot: no FID/NLL metrics with K to plot yet", file=sys.stderr)
    table.rebuild_shared(runs)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return {"run": cmd_run, "status": cmd_status, "cancel": cmd_cancel, "table": cmd_table}[args.command](args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
