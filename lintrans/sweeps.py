"""Sweeps from Python, for notebooks: a sweep's trials, their states and their results as pandas DataFrames.

    import lintrans.sweeps as ls

    s = ls.load("sweeps/quickstart.yaml")  # runs where `lintrans` looks for them (runs_dir= as --runs-dir)
    s.trials()   # one row per trial: trial, its axis values, seed, run_dir
    s.status()   # the same, with state (categorical), reason, step, n_iters, eta_s, attempt, ..., wall_s
    s.table()    # the rows of `lintrans table` (axes, status, steps, every metric, wall_s, ...), run_dir

Nothing here writes, so a runs folder one may only read (a colleague's, an archived study) works;
and nothing here imports torch (pandas comes with the first DataFrame), unless the sweep's config
imports it for a forward process of its own. ``lintrans table`` builds its rows through
:meth:`Sweep.rows`, so a notebook and the command line show the same numbers.

Columns are typed from their values: numbers as ``int64`` (``float64`` where one is missing, and
for a column with no value yet), text as ``string``, flags as ``boolean``, a state as a ``category`` ordered as
:data:`launchers.status.STATES`, ``updated`` as a UTC datetime, ``run_dir`` as :class:`pathlib.Path`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launchers import status, table
from launchers import sweep as sweep_file
from launchers.search import listed_trials

if TYPE_CHECKING:
    import pandas as pd

    from launchers.sweep import Trial


# Columns of text that may hold no value yet (every other empty column is a number to come).
TEXT = {"sweep", "trial", "reason", "backend", "job_id", "log", "stale_of", "differs", *table.PROVENANCE}


def load(path: str | Path, runs_dir: str | Path | None = None, max_trials: int = sweep_file.MAX_TRIALS) -> Sweep:
    """The sweep file at ``path``, validated as ``lintrans status`` validates it (a bad one raises
    :class:`lintrans.errors.UsageError` with the file, line and key); ``runs_dir`` is ``--runs-dir``."""
    return Sweep(sweep_file.load(path, runs_dir, max_trials, check_forwards=False))


@dataclass(frozen=True)
class Sweep:
    """One sweep file and its runs folder; every method reads the run folders afresh."""

    spec: sweep_file.Sweep

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dir(self) -> Path:
        """Where its trials' run folders are: ``<runs_dir>/sweeps/<name>``."""
        return self.spec.dir

    def listed(self) -> list[Trial]:
        """Its trials: the file's (grid, random) or the study's (optuna), in order."""
        return listed_trials(self.spec)

    def trials(self) -> pd.DataFrame:
        """One row per trial: ``trial`` (its id), its axis values (named as in the table), ``seed``, ``run_dir``."""
        return _frame([{"trial": t.id, **_values(t), "run_dir": t.run_dir} for t in self.listed()])

    def status(self) -> pd.DataFrame:
        """:meth:`trials` with what ``lintrans status`` says of each (the schedulers asked, as it asks them)."""
        trials = self.listed()
        seen = status.views(trials, status.observe(trials))
        rows = [{"trial": t.id, **_values(t), **dataclasses.asdict(seen[t.id]), "run_dir": t.run_dir} for t in trials]
        return _frame(rows)

    def rows(self, include_stale: bool = False, trials: list[Trial] | None = None) -> list[dict[str, Any]]:
        """The rows of ``lintrans table`` as plain values (``trials``: :meth:`listed`, when the caller has it)."""
        trials = self.listed() if trials is None else trials
        return table.rows(self.spec, trials, status.observe(trials), include_stale)

    def table(self, include_stale: bool = False) -> pd.DataFrame:
        """One row per trial (and, with ``include_stale``, per stale folder): the columns of ``lintrans
        table --format json`` in its order, and ``run_dir``."""
        rows = [{"stale": False, **r} if include_stale else r for r in self.rows(include_stale)]
        return _frame([{**r, "run_dir": self.dir / r["trial"]} for r in rows], [*table.columns(rows), "run_dir"])


def _values(trial: Trial) -> dict[str, Any]:
    return {table.axis_name(k): trial.overrides[k] for k in (*trial.axes, "seed")}


def _frame(rows: list[dict[str, Any]], columns: list[str] | None = None) -> pd.DataFrame:
    """``rows`` as a DataFrame whose columns have the types their values share."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=columns or list(dict.fromkeys(k for r in rows for k in r)))
    for column in frame.columns:
        frame[column] = _typed(frame[column])
    return frame


def _typed(column: pd.Series) -> pd.Series:
    import pandas as pd

    if column.name in ("state", "status"):
        return pd.Categorical(column, categories=status.STATES)
    if column.name == "updated":
        return pd.to_datetime(column, utc=True)
    present = [v for v in column if v is not None and v == v]  # NaN is the one value unequal to itself
    if not present:  # nothing recorded yet (a pending trial's metrics): numbers to come, unless it is text
        return column.astype("string" if column.name in TEXT else "float64")
    kinds = {"number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v) for v in present}
    if kinds == {bool}:
        return column.astype("boolean")
    if kinds == {str}:
        return column.astype("string")
    if kinds == {"number"}:
        whole = len(present) == len(column) and all(isinstance(v, int) for v in present)
        return column.astype("int64" if whole else "float64")
    return column  # mixed, or objects (paths): as they are
