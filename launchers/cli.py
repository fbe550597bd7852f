"""``lintrans run|rerun|status|cancel|clean|table|init`` (``python -m launchers``): one sweep file, any backend.

    lintrans init myproject                    # a config, a forward process of one's own, a sweep over it
    lintrans run sweeps/quickstart.yaml --backend local
    lintrans rerun sweeps/quickstart.yaml --failed
    lintrans status sweeps/quickstart.yaml
    lintrans table sweeps/quickstart.yaml --format md --plot k --plot curves

This module parses the command line and dispatches, nothing more: ``run``, ``rerun`` and ``cancel``
to :mod:`launchers.submission` (``run`` of an adaptive search to :mod:`launchers.search`) with the
backend the registry (:mod:`launchers.backends`) builds from its own options, ``status`` to
:mod:`launchers.status`, ``clean`` to :mod:`launchers.clean`, ``table`` to :mod:`launchers.table`,
``init`` to :mod:`launchers.project`. ``--trial ID...`` (``rerun``, ``cancel``) names trials by the
ids ``status`` shows; an id the sweep has none of is bad input.
``run`` and ``rerun`` exit 1 when a trial of the sweep ended failed (``--allow-failures``: 0); bad input exits 2
with one line naming the file, line and key.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from launchers import backends, clean, project, state, status, submission, table
from launchers.search import listed_trials, run_optuna
from launchers.sweep import MAX_TRIALS, Sweep, load
from lintrans import provenance
from lintrans import sweeps as ls
from lintrans.atomic import disk_full
from lintrans.errors import UsageError, choices, printable
from lintrans.procenv import EXIT_FAILED, EXIT_USAGE
from lintrans.table_format import FORMATS, render


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lintrans", description=__doc__.split("\n")[0])
    p.add_argument(
        "--version", action="version", version=f"lintrans {provenance.package_version() or '(not installed)'}"
    )
    common = argparse.ArgumentParser(add_help=False)  # before or after the command: `lintrans run X --runs-dir R`
    for parser_, default in ((p, None), (common, argparse.SUPPRESS)):
        parser_.add_argument("--runs-dir", default=default,
                             help="root of run directories (default: the sweep's runs_dir, else "
                                  "$LINTRANS_RUNS_DIR, else runs/ beside the sweep file)")  # fmt: skip
        parser_.add_argument("--max-trials", type=int, default=MAX_TRIALS if default is None else default,
                             help=f"refuse larger sweeps (default {MAX_TRIALS:,})")  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common], help="submit the unfinished trials of a sweep")
    rerun = sub.add_parser("rerun", parents=[common], help="submit some trials again, whatever ended them")
    for submits in (run, rerun):
        submits.add_argument("sweep")
        submits.add_argument("--backend", default=None,
                             help=f"{', '.join(backends.NAMES)} (default: the sweep's, or local)")  # fmt: skip
        submits.add_argument("--allow-failures", action="store_true", help="exit 0 even when trials failed")
        backends.add_arguments(submits)
    run.add_argument("--dry-run", action="store_true", help="print the trials (and sbatch scripts), submit nothing")
    run.add_argument("--retry-failed", action="store_true", help="also re-run failures a re-run cannot fix by itself")
    run.add_argument("--resume-stopped", action="store_true", help="also resume trials a scheduler stopped early")
    add_trial_option(rerun)
    rerun.add_argument("--failed", action="store_true", help="the failed trials")
    rerun.add_argument("--stale", action="store_true", help="the trials whose older version is stale, not done yet")
    rerun.add_argument("--from-scratch", action="store_true",
                       help="discard their checkpoints (their folders are kept as ID.old-N)")  # fmt: skip
    sub.add_parser("import-ihdm", help="turn an IHDM run directory into a lintrans run (lintrans import-ihdm --help)")
    stat = sub.add_parser("status", parents=[common], help="per-trial state")
    stat.add_argument("sweep")
    stat.add_argument("--format", default="table", choices=("table", "json"), help="json: every field, values in full")
    cancel = sub.add_parser("cancel", parents=[common], help="cancel queued/running trials")
    cancel.add_argument("sweep")
    add_trial_option(cancel)
    cln = sub.add_parser("clean", parents=[common], help="remove old checkpoints (never a running trial's)")
    cln.add_argument("sweep")
    cln.add_argument("--keep", type=int, default=1, help="numbered checkpoints kept per trial (default 1)")
    cln.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    tab = sub.add_parser("table", parents=[common], help="results table of one or more sweeps")
    tab.add_argument("sweeps", nargs="+")
    tab.add_argument("--format", default="md", help=f"one of {', '.join(FORMATS)}")
    tab.add_argument(
        "--columns",
        default=None,
        metavar="A,B,C",
        help="these columns, in this order; all: every one (default: axes, state, steps, metrics)",
    )
    tab.add_argument("--out", default=None, metavar="FILE", help="also write the table to FILE (.csv, .json or .md)")
    tab.add_argument("--grouped", action="store_true", help="mean ± std over seeds")
    tab.add_argument("--include-stale", "--all", action="store_true",
                     help="also run folders of older versions of the sweep's trials (stale)")  # fmt: skip
    tab.add_argument("--sort", default=None, metavar="METRIC", help="order by a metric (best first)")
    tab.add_argument("--best", type=int, default=None, metavar="N", help="only the N best by --sort (or the objective)")
    tab.add_argument("--plot", action="append", default=[], metavar="KIND",
                     help=f"{', '.join(table.PLOTS)} (into <sweep>/plots/), or a .png path for 'k'")  # fmt: skip
    init = sub.add_parser("init", help="write a minimal project of your own (config, forward process, sweep)")
    init.add_argument("dir", help="a new or empty folder")
    return p


def add_trial_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--trial", nargs="+", action="extend", default=[], metavar="ID",
                         help="only these trials (ids as `status` shows them)")  # fmt: skip


def cmd_init(args) -> int:
    sweep = project.init(Path(args.dir))
    print(f"wrote {sweep.parent}: config.py, my_processes.py, sweep.yaml")
    print(f"next: lintrans run {shlex.quote(str(sweep))}")
    return 0


def submitting(args) -> tuple[Sweep, backends.Backend]:
    """The sweep and backend of ``run`` or ``rerun``, once every check that needs no write has passed."""
    sweep = load(args.sweep, args.runs_dir, args.max_trials, backends=backends.NAMES)
    backend = backends.from_args(backends.chosen(args, sweep.backend), args)
    state.check_writable(sweep.runs_dir, "runs folder")  # every check before anything is written,
    backend.check(sweep)  # --dry-run included
    return sweep, backend


def cmd_run(args) -> int:
    sweep, backend = submitting(args)
    if sweep.search.method == "optuna":
        return run_optuna(sweep, backend, args)
    return submission.run(sweep, backend, args)


def cmd_rerun(args) -> int:
    if sum(map(bool, (args.trial, args.failed, args.stale))) != 1:
        raise UsageError("rerun takes one of --trial ID..., --failed, --stale")
    sweep, backend = submitting(args)
    return submission.rerun(sweep, backend, args, submission.select(sweep, listed_trials(sweep), args.trial))


def cmd_status(args) -> int:
    sweep = load(args.sweep, args.runs_dir, args.max_trials, check_forwards=False)
    trials = listed_trials(sweep)
    seen = status.views(trials, status.observe(trials))
    stale = status.stale(sweep, trials)
    if args.format == "json":
        print(status.as_json(trials, seen, stale))
    else:
        status.print_trials(sweep, trials, seen, stale_folders=stale)
        if note := provenance.mixed([state.read(t.run_dir / provenance.FILE) for t in trials]):
            print(note)
        print(f"disk: {clean.human(clean.disk_use(sweep.dir)) if sweep.dir.is_dir() else 'nothing'} under {sweep.dir}")
    return 0


def cmd_cancel(args) -> int:
    sweep = load(args.sweep, args.runs_dir, args.max_trials, check_forwards=False)
    submission.cancel(submission.select(sweep, listed_trials(sweep), args.trial))
    return 0


def cmd_clean(args) -> int:
    if args.keep < 0:
        raise UsageError(f"--keep {args.keep}: a number of checkpoints, 0 or more")
    sweep = load(args.sweep, args.runs_dir, args.max_trials, check_forwards=False)
    return clean.clean(listed_trials(sweep), args.keep, args.dry_run)


def cmd_table(args) -> int:
    if args.format not in FORMATS:
        raise UsageError(f"unknown format '{args.format}'; valid: {choices(FORMATS)}")
    if args.out and Path(args.out).suffix not in table.OUT_FORMATS:
        raise UsageError(f"--out {args.out}: unknown extension; valid: {choices(table.OUT_FORMATS)}")
    for kind in args.plot:
        if kind not in table.PLOTS and not kind.endswith(".png"):
            raise UsageError(f"unknown --plot '{kind}'; valid: {choices(table.PLOTS)}, or a .png path")
    rows, sweeps = [], []
    for path in args.sweeps:  # the rows of the Python API (lintrans.sweeps), so both show the same
        sweep = ls.load(path, args.runs_dir, args.max_trials)
        trials = sweep.listed()
        rows += sweep.rows(args.include_stale, trials)
        sweeps.append((sweep.spec, trials))
    objective = sweeps[0][0].search.objective
    if args.sort and args.sort not in (known := {*table.columns(rows), objective.metric, *table.METRICS}):
        numeric = sorted(c for c in known if c == objective.metric or c in table.METRICS
                         or any(isinstance(r.get(c), float) for r in rows))  # fmt: skip
        raise UsageError(f"unknown --sort {args.sort!r}; valid: {', '.join(numeric)}")
    if args.sort or args.best:
        metric = args.sort or objective.metric
        rows = table.sort(rows, metric, objective.mode if metric == objective.metric else "min", args.best)
    out = table.render_grouped(rows, args.format) if args.grouped else render(rows, chosen(args, rows), args.format)
    sys.stdout.write(out)
    if note := provenance.mixed(rows):
        print(note, file=sys.stderr)
    for kind in args.plot:
        for sweep, trials in sweeps:
            written = table.plot(kind, sweep, trials, rows, objective.metric)
            print(f"plot: {written}" if written else f"plot {kind}: nothing to plot yet", file=sys.stderr)
    if args.out:
        table.write_out(rows, args.out, args.grouped)
    return 0


def chosen(args, rows: list[dict]) -> list[str]:
    """``--columns`` (each a column some row has; ``all``: every one), else the short set people read
    (axes, state, steps, top-level metrics: :func:`launchers.table.brief`) and, for csv and json,
    which programs read, every column."""
    every = table.columns(rows)
    if args.columns == "all" or (not args.columns and args.format in ("csv", "json")):
        return every
    if not args.columns:
        return table.brief(rows)
    wanted = [c.strip() for c in args.columns.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in every]
    if unknown:
        raise UsageError(f"unknown column {unknown[0]!r}; valid: {', '.join(every)}")
    return wanted


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["import-ihdm"]:  # an IHDM run directory into a lintrans one (lintrans.ihdm)
        from lintrans import ihdm

        return ihdm.main(["lintrans import-ihdm", *argv[1:]])
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    args = parser().parse_args(argv)
    try:
        commands = {"run": cmd_run, "rerun": cmd_rerun, "status": cmd_status, "cancel": cmd_cancel, "clean": cmd_clean,
                    "table": cmd_table, "init": cmd_init}  # fmt: skip
        return commands[args.command](args)
    except UsageError as exc:
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a full disk or quota, in `table --out` say: one line; no partial file was left
        if not disk_full(exc):
            raise
        print(f"error: no space left on device ({exc.filename or 'a write'})", file=sys.stderr)
        return EXIT_FAILED
