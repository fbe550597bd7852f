"""Evaluation records: one JSON file per evaluation, and the summary tables rebuilt from them.

Every evaluation writes its record twice, atomically:

* into the run directory, ``<workdir>/records/<mode>-<experiment>-<param>-ckpt<N>.json``
  (re-evaluating the same thing replaces it; :func:`read_records` reads them back);
* into IHDM's experiment folder, ``<runs>/<dataset_name>/evaluation_results/<experiment>/``,
  as ``<mode>-<param>-ckpt<N>-<run id>.json``, a name no other run can write, after which
  ``summary.csv`` and ``summary.md`` are rebuilt from all record files in that folder.

IHDM kept a pickle there that every run read, updated and rewrote without a lock, so
concurrent runs dropped each other's results. Here a record is its own file and the tables are
derived data: the rebuild runs under an ``fcntl`` lock on ``.summary.lock`` in the folder, so the
last rebuild sees every record written before it, and rebuilding is idempotent.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from lintrans.atomic import write_json, write_text
from lintrans.errors import UsageError
from lintrans.table_format import render

RECORDS = "records"
SUMMARY_STEM = "summary"
LOCK = ".summary.lock"
RUNS_ENV = "LINTRANS_RUNS_DIR"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")
IDENTITY_COLUMNS = ("param", "mode", "checkpoint", "steps", "dataset", "forward", "K", "sigma", "delta", "seed")
TRAILING_COLUMNS = ("wall_s", "device", "timestamp", "workdir")

log = logging.getLogger(__name__)


def check_name(value: str, flag: str) -> str:
    """Experiment and parameter names become file names: letters, digits and ``._=+-`` only."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise UsageError(
            f"{flag}={value!r} must start with a letter or digit and use only letters, digits and . _ = + -"
        )
    return value


def record_path(workdir: str | Path, mode: str, experiment: str, param: str, checkpoint: int) -> Path:
    return Path(workdir) / RECORDS / f"{mode}-{experiment}-{param}-ckpt{checkpoint}.json"


def runs_dir() -> Path:
    """Root of IHDM's ``runs/`` tree: ``$LINTRANS_RUNS_DIR``, else ``runs`` in the current directory."""
    return Path(os.environ.get(RUNS_ENV) or "runs")


def results_dir(dataset_name: str, experiment: str) -> Path:
    return runs_dir() / dataset_name / "evaluation_results" / experiment


def package_versions(*packages: str) -> dict[str, str | None]:
    """Python's and each installed package's version (``None`` where it has no metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def environment(device: str) -> dict:
    """Where and with what an evaluation ran."""
    return {
        "device": device,
        "hostname": socket.gethostname(),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": package_versions("torch", "clean-fid", "lintrans", "numpy"),
        "argv": sys.argv,
    }


def write_record(workdir: str | Path, record: dict) -> Path:
    r = record
    return write_json(record_path(workdir, r["mode"], r["experiment"], r["param"], r["run"]["checkpoint"]), r)


def _read(path: Path) -> dict | None:
    """A record, or ``None`` with a warning when the file is unreadable or not a record."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("skipping unreadable record %s: %s", path, exc)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        log.warning("skipping %s: not an evaluation record (no 'metrics' object)", path)
        return None
    return data


def read_folder(folder: str | Path) -> list[dict]:
    """All readable records in ``folder`` (``*.json``, hidden temp files excluded), in file-name order."""
    paths = sorted(Path(folder).glob("[!.]*.json"))
    return [r for r in map(_read, paths) if r is not None]


def read_records(workdir: str | Path) -> list[dict]:
    """The records of one run directory; unreadable or partial files are skipped with a warning."""
    return read_folder(Path(workdir) / RECORDS)


def metrics(workdir: str | Path) -> dict:
    """Every metric of a run's records, plus scalar breakdown terms as ``<mode>.<term>`` (newest record wins).

    A record of a named snapshot (``checkpoint`` N, not the last) puts its terms under ``<mode>_step<N>.``,
    as its metrics carry ``_step<N>``, so they sit beside the last checkpoint's instead of replacing them.
    """
    out: dict = {}
    for record in sorted(read_records(workdir), key=lambda r: str(r.get("timestamp", ""))):
        out.update(record.get("metrics", {}))
        run = record.get("run") or {}
        mode = record.get("mode", "eval") + (f"_step{run.get('steps')}" if run.get("checkpoint") else "")
        for key, value in (record.get("breakdown") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{mode}.{key}"] = value
    return out


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``folder/.summary.lock``, held for the block."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def publish(record: dict, dataset_name: str) -> Path:
    """Add ``record`` to its experiment folder and rebuild the summary tables; returns the record file."""
    folder = results_dir(dataset_name, record["experiment"])
    run_id = hashlib.sha1(str(record["run"]["workdir"]).encode()).hexdigest()[:10]
    name = f"{record['mode']}-{record['param']}-ckpt{record['run']['checkpoint']}-{run_id}.json"
    path = write_json(folder / name, record)
    with locked(folder):
        rebuild_summary(folder)
    return path


def summary_rows(records: list[dict]) -> tuple[list[str], list[dict]]:
    """Columns and one row per record; each metric is a column of its own, so metrics never mix."""
    metrics = sorted({name for r in records for name in r["metrics"]})
    columns = [*IDENTITY_COLUMNS, *metrics, *TRAILING_COLUMNS]
    rows = []
    for r in records:
        run = r.get("run", {})
        row = {c: run.get(c) for c in IDENTITY_COLUMNS}
        row.update(param=r.get("param"), mode=r.get("mode"), **r["metrics"])
        row.update({c: r.get(c, run.get(c)) for c in TRAILING_COLUMNS})
        rows.append(row)
    rows.sort(key=lambda row: (str(row["param"]), str(row["mode"]), str(row["timestamp"])))
    return columns, rows


def rebuild_summary(folder: str | Path) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``summary.md`` from every record in ``folder`` (call under :func:`locked`)."""
    folder = Path(folder)
    columns, rows = summary_rows(read_folder(folder))
    csv_text, md_text = render(rows, columns, "csv"), render(rows, columns, "md", title=folder.name)
    csv_path = write_text(folder / f"{SUMMARY_STEM}.csv", csv_text)
    md_path = write_text(folder / f"{SUMMARY_STEM}.md", md_text)
    return csv_path, md_path
