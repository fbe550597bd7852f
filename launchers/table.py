"""Results tables built from trial records (never appended to by concurrent writers), and their plots.

One row per trial (axes, seed, status, steps, every metric and its breakdown, wall time, backend,
job id); a grouped view with mean ± std over seeds; sorting and the best N by a metric;
Markdown, CSV and JSON. Plots: FID and NLL against K (one line per forward process, one panel per
σ), learning curves (held-out loss against step, from each trial's TensorBoard scalars), and the
objective against each numeric axis (log scale for log-uniform axes). ``runs/results.csv`` is the
shared table over every sweep, rebuilt from scratch, so rebuilding is idempotent. A damaged file
anywhere is a warning, never a missing row or a crash.
"""

from __future__ import annotations

import io
import logging
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launchers import state, status
from launchers.schema import Distribution
from launchers.sweep import Sweep, Trial
from lintrans import provenance, records
from lintrans.atomic import write_atomic, write_text
from lintrans.table_format import render

FIXED = ["sweep", "trial", "status", "reason", "steps"]
TAIL = ["wall_s", "backend", "job_id"]
STALE = ["stale", "stale_of", "differs"]  # rows of older versions of a trial (table --include-stale)
# What produced each trial's numbers (lintrans.provenance, from the trainer): in the full table and
# --columns, not in the brief one.
PROVENANCE = list(provenance.FIELDS)
AXIS_NAMES = {"model.forward": "forward", "model.K": "K", "model.sigma": "sigma", "seed": "seed"}
FID_METRICS = ("fid_inception", "fid_mnist_features")
NLL_METRIC = "nll_bpd"
# What a table can be sorted by before any trial has it (`table --sort`): the evaluations' headline metrics.
METRICS = (*FID_METRICS, NLL_METRIC, "memorised_fraction", "eval_loss", "train_loss")
CONFIG_SECTIONS = ("model", "data", "training", "optim", "sampling", "eval")
PLOTS = ("k", "curves", "axes", "samples")

log = logging.getLogger(__name__)


def axis_name(key: str) -> str:
    return AXIS_NAMES.get(key, key)


def row(trial_dir: Path, spec: dict[str, Any], observation: state.Observation | None = None) -> dict[str, Any]:
    """One trial's row: identity, state, every metric of its records, where it ran."""
    st = status.view(trial_dir, observation)
    out: dict[str, Any] = {"sweep": spec.get("sweep"), "trial": spec.get("id", trial_dir.name),
                           "index": spec.get("index", 1 << 30)}  # fmt: skip
    for key in [*spec.get("axes", []), "seed"]:
        out[axis_name(key)] = spec.get("overrides", {}).get(key)
    out.update(status=st.state, reason=st.reason or "", steps=st.step)
    out.update(records.metrics(trial_dir))
    final_eval = state.status(trial_dir).get("eval_loss")
    if isinstance(final_eval, float) and "eval_loss" not in out:
        out["eval_loss"] = final_eval
    out.update(wall_s=st.wall_s, backend=st.backend, job_id=st.job_id)
    made_by = state.read(trial_dir / provenance.FILE)
    out.update({k: made_by[k] for k in PROVENANCE if k in made_by})
    return out


def rows(
    sweep: Sweep, trials: list[Trial], observations: dict | None = None, include_stale: bool = False
) -> list[dict]:
    """Rows of ``trials`` (their spec is known even if ``trial.json`` is damaged), plus, with
    ``include_stale``, the run folders of the sweep that no trial of the current file owns (older
    versions of it: ``stale``, with ``stale_of`` the current trial where its axis values still are)."""
    from launchers.trial import spec_of

    observations = observations or {}
    out = [row(t.run_dir, spec_of(sweep, t), observations.get(t.id)) for t in trials]
    if include_stale:
        for other in status.others(sweep, trials):
            differs = "" if other.differs is None else ", ".join(other.differs)
            stale_of = other.of.id if other.of else None
            out.append({**row(other.folder, other.spec), "stale": True, "stale_of": stale_of, "differs": differs})
    return sorted(out, key=lambda r: (r.get("stale", False), r["index"]))


def scan(sweep_dir: Path) -> list[dict]:
    """Rows of every trial directory under a sweep folder, without its sweep file (the shared table)."""
    out = []
    for folder, spec in state.trial_folders(sweep_dir):
        try:
            out.append(row(folder, spec))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("skipping %s: %s", folder, exc)
    return sorted(out, key=lambda r: r["index"])


def columns(table: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in table:
        seen += [k for k in r if k not in seen]
    axes = [k for k in seen if k in AXIS_NAMES.values() or k.split(".")[0] in CONFIG_SECTIONS]
    metrics = [k for k in seen if k not in FIXED + TAIL + PROVENANCE + axes + ["index", *STALE]]
    main_metrics = [m for m in metrics if "." not in m] + [m for m in metrics if "." in m]
    made_by = [k for k in PROVENANCE if k in seen]
    return FIXED[:2] + axes + FIXED[2:] + main_metrics + TAIL + made_by + [k for k in STALE if k in seen]


def top_level(column: str) -> bool:
    """An axis or a top-level metric, not a breakdown such as ``elbo.L_1`` (config keys are dotted too)."""
    return "." not in column or column.split(".")[0] in CONFIG_SECTIONS


def brief(table: list[dict[str, Any]]) -> list[str]:
    """The columns ``run`` prints: axes, status, steps, top-level metrics (no breakdowns, no reasons)."""
    return [c for c in columns(table) if top_level(c) and c not in ("sweep", "reason", *PROVENANCE)]


def grouped(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds for every metric, grouping by all other axes."""
    cols = columns(table)
    axes = [c for c in cols[2 : cols.index("status")] if c != "seed"]
    metrics = [c for c in cols[cols.index("steps") + 1 :] if c not in TAIL + PROVENANCE + STALE]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in table:
        groups[tuple(str(r.get(a)) for a in axes)].append(r)
    out = []
    for members in groups.values():
        g = {a: members[0].get(a) for a in axes}
        g["seeds"] = len(members)
        g["done"] = sum(m["status"] == "done" for m in members)
        for m in metrics:
            values = [r[m] for r in members if isinstance(r.get(m), (int, float)) and math.isfinite(r[m])]
            if values:
                g[m] = statistics.fmean(values)
                g[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(g)
    return out


def render_grouped(table: list[dict[str, Any]], fmt: str) -> str:
    """:func:`grouped` as ``fmt``: csv and json carry every metric and its ``_std``; markdown, read
    by people, shows the top-level metrics as ``mean ± std`` (breakdowns such as ``elbo.L_1`` stay
    in csv/json and the records)."""
    g = grouped(table)
    cols = list(dict.fromkeys(k for r in g for k in r))
    if fmt in ("csv", "json"):
        return render(g, cols, fmt)
    shown = [c for c in cols if not c.endswith("_std") and top_level(c)]
    merged = [{c: f"{r[c]:.4g} ± {r[c + '_std']:.2g}" if f"{c}_std" in r else r.get(c) for c in shown} for r in g]
    return render(merged, shown, fmt)


def sort(table: list[dict[str, Any]], metric: str, mode: str = "min", best: int | None = None) -> list[dict[str, Any]]:
    """Trials ordered by ``metric`` (``mode`` min: smallest first); those without it last."""
    sign = 1.0 if mode == "min" else -1.0
    have = [r for r in table if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    ordered = sorted(have, key=lambda r: sign * r[metric]) + [r for r in table if r not in have]
    return ordered[:best] if best else ordered


def print_brief(sweep: Sweep, trials: list[Trial], observations: dict) -> None:
    """The table ``run`` prints when its trials have ended (the columns people see), and the shared table."""
    table = rows(sweep, trials, observations)
    print(render(table, brief(table)), end="")
    rebuild_shared(sweep.runs_dir)


def plot(kind: str, sweep: Sweep, trials: list[Trial], table: list[dict[str, Any]], metric: str) -> Path | None:
    """``table --plot KIND`` (one of :data:`PLOTS`, or a .png path for ``k``) into ``<sweep>/plots/``."""
    folder = sweep.dir / "plots"
    if kind == "curves":
        return plot_curves(sweep, trials, folder / "curves.png")
    if kind == "axes":
        return plot_axes(sweep, table, metric, folder / "axes.png")
    if kind == "samples":
        return plot_samples(sweep, trials, folder / "samples.png")
    return plot_k(table, Path(kind) if kind.endswith(".png") else folder / "k.png")


OUT_FORMATS = {".csv": "csv", ".json": "json", ".md": "md"}


def write_out(table: list[dict[str, Any]], path: str, grouped: bool = False) -> Path:
    """``table --out FILE``: the table, atomically, in the format FILE's extension names.

    ``table`` writes nothing else: reading a sweep needs no write access.
    """
    fmt = OUT_FORMATS[Path(path).suffix]  # checked by the CLI before anything is printed
    text = render_grouped(table, fmt) if grouped else render(table, columns(table), fmt)
    return write_text(Path(path), text)


def rebuild_shared(runs_dir: Path) -> Path:
    """``runs/results.csv`` over every sweep under ``runs/sweeps``, rebuilt from the records."""
    table = [r for sweep_dir in sorted((runs_dir / "sweeps").glob("*")) if sweep_dir.is_dir() for r in scan(sweep_dir)]
    return write_text(runs_dir / "results.csv", render(table, columns(table), "csv"))


# --------------------------------------------------------------------------- plots


def _figure(n_rows: int, n_cols: int, width: float = 4.5, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False)
    return plt, fig, axes


def _panels(n: int, width: float, height: float):
    """A figure of ``n`` panels in rows of at most 4, the unused axes hidden."""
    n_cols = min(4, n)
    plt, fig, axes = _figure(-(-n // n_cols), n_cols, width, height)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return plt, fig, axes


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(path, lambda f: f.write(buf.getvalue()))


def plot_k(table: list[dict[str, Any]], path: Path) -> Path | None:
    """FID and NLL against K: one line per forward process, one column of panels per σ."""
    g = grouped(table)
    metric_names = [m for m in (*FID_METRICS, NLL_METRIC, "memorised_fraction") if any(m in r for r in g)]
    if not metric_names or not any("K" in r for r in g):
        return None
    sigmas = sorted({r.get("sigma") for r in g}, key=lambda s: (s is None, s))
    plt, fig, axes = _figure(len(metric_names), len(sigmas))
    for col, sigma in enumerate(sigmas):
        for row_i, metric in enumerate(metric_names):
            ax = axes[row_i][col]
            by_forward: dict[str, list] = defaultdict(list)
            for r in g:
                if r.get("sigma") == sigma and metric in r:
                    by_forward[str(r.get("forward", "?"))].append((r["K"], r[metric], r.get(f"{metric}_std", 0.0)))
            for forward, points in sorted(by_forward.items()):
                points.sort()
                ks, ys, es = zip(*points, strict=True)
                ax.errorbar(ks, ys, yerr=es, marker="o", capsize=3, label=forward)
            values = [y for points in by_forward.values() for _, y, _ in points]
            if values and min(values) > 0 and max(values) > 20 * min(values):  # processes orders of magnitude apart
                ax.set_yscale("log")
            if metric == "memorised_fraction" and values:  # a fraction: from 0, not a band of +-0.04 around it
                ax.set_ylim(-0.02, max(0.1, 1.15 * max(values)))
            ax.set_xlabel("K")
            ax.set_ylabel(metric)
            ax.set_title(f"σ = {sigma}" if sigma is not None else "")
            ax.grid(alpha=0.3)
            if by_forward:
                ax.legend(fontsize=8)
    return _save(plt, fig, path)


def learning_curve(trial_dir: Path, tag: str = "eval/loss") -> list[tuple[int, float]]:
    """``(step, value)`` of a TensorBoard scalar across every event file of a run (later files win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted((trial_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        try:
            acc.Reload()
        except Exception as exc:  # noqa: BLE001 - a torn event file is a warning, not a crash
            log.warning("skipping %s: %s", events, exc)
            continue
        if tag in acc.Tags().get("scalars", []):
            points.update({e.step: e.value for e in acc.Scalars(tag)})
    return sorted(points.items())


def plot_curves(sweep: Sweep, trials: list[Trial], path: Path, tag: str = "eval/loss") -> Path | None:
    """Held-out loss against step: one panel per forward process, one line per trial (colour by K)."""
    by_forward: dict[str, list] = defaultdict(list)
    for t in trials:
        curve = learning_curve(t.run_dir, tag)
        if curve:
            by_forward[str(t.overrides.get("model.forward", sweep.base.model.forward))].append((t, curve))
    if not by_forward:
        return None
    plt, fig, axes = _panels(len(by_forward), 4.2, 3.4)
    for ax, (forward, lines) in zip(axes.flat, sorted(by_forward.items()), strict=False):
        for t, curve in lines:
            steps, values = zip(*curve, strict=True)
            label = " ".join(f"{axis_name(k).split('.')[-1]}={t.overrides[k]}" for k in t.axes if k != "model.forward")
            ax.plot(steps, values, marker=".", label=f"{label} s{t.overrides['seed']}".strip(), alpha=0.8)
        ax.set_title(forward)
        ax.set_xlabel("step")
        ax.set_ylabel(tag)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(plt, fig, path)


@dataclass(frozen=True)
class Series:
    """One line of an axes panel: a forward process at fixed values of the other axes, over seeds."""

    forward: str
    label: str
    xs: list[float]
    means: list[float]
    stds: list[float]  # over seeds (population: 0 for one seed)
    stopped: list[tuple[float, float]]  # (x, metric) of trials a scheduler stopped early, not averaged in


def axis_series(axes: list[str], table: list[dict[str, Any]], metric: str, key: str, forward: str) -> list[Series]:
    """The lines of the ``key`` panel: one per process (``forward``: the sweep's own where it is no axis)
    and values of the other listed axes (``axes``; a sampled axis draws a new value per trial, so it
    splits nothing), each point the mean and spread over seeds of the done trials."""
    col, others = axis_name(key), [axis_name(k) for k in axes if k not in (key, "model.forward", "seed")]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in table:
        if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric]):
            groups[(str(r.get("forward", forward)), *(str(r.get(o)) for o in others))].append(r)
    out = []
    for (proc, *rest), rows in sorted(groups.items()):
        by_x: dict[float, list[float]] = defaultdict(list)
        for r in rows:
            if r.get("status") == "done":
                by_x[r[col]].append(r[metric])
        xs = sorted(by_x)
        label = ", ".join([proc, *(f"{o}={v}" for o, v in zip(others, rest, strict=True))])
        out.append(Series(proc, label, xs, [statistics.fmean(by_x[x]) for x in xs],
                          [statistics.pstdev(by_x[x]) for x in xs],
                          [(r[col], r[metric]) for r in rows if r.get("status") != "done"]))  # fmt: skip
    return out


def plot_axes(sweep: Sweep, table: list[dict[str, Any]], metric: str, path: Path) -> Path | None:
    """``metric`` against each numeric axis, one panel per axis (log scale where the axis is log-uniform):
    one colour per forward process with a legend, error bars over seeds, early-stopped trials as crosses."""
    numeric = [k for k, axis in sweep.axes.items()
               if all(isinstance(r.get(axis_name(k)), (int, float)) for r in table)]  # fmt: skip
    points = [r for r in table if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not numeric or not points:
        return None
    from matplotlib import ticker

    plt, fig, axes = _figure(1, len(numeric), 4.4, 3.4)
    forward = str(sweep.base.model.forward)
    colours = {f: f"C{i % 10}" for i, f in enumerate(sorted({str(r.get("forward", forward)) for r in points}))}
    for ax, key in zip(axes[0], numeric, strict=True):
        listed = [k for k, axis in sweep.axes.items() if not isinstance(axis, Distribution)]
        for i, line in enumerate(axis_series(listed, points, metric, key, forward)):
            style = ("-", "--", ":", "-.")[i % 4] if len(line.xs) > 1 else "none"
            if line.xs:
                ax.errorbar(line.xs, line.means, yerr=line.stds, marker="o", capsize=3, color=colours[line.forward],
                            linestyle=style, label=line.label)  # fmt: skip
            if line.stopped:
                ax.scatter(*zip(*line.stopped, strict=True), marker="x", color=colours[line.forward],
                           label=f"{line.label} (stopped early)")  # fmt: skip
        values = [r[metric] for r in points]
        if min(values) > 0 and max(values) > 20 * min(values):  # orders of magnitude apart
            ax.set_yscale("log")
        axis = sweep.axes[key]
        if isinstance(axis, Distribution) and axis.log:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))  # labels at 1, 2, 5 x 10^n only
            ax.xaxis.set_major_formatter(ticker.LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(9, 9)))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def latest_samples(trial_dir: Path) -> Path | None:
    """The sample grid of a trial's last sampling step (``samples/iter_N/samples.png``)."""
    grids = [(int(p.parent.name.split("_")[1]), p) for p in trial_dir.glob("samples/iter_*/samples.png")]
    return max(grids)[1] if grids else None


def plot_samples(sweep: Sweep, trials: list[Trial], path: Path) -> Path | None:
    """Each trial's last sample grid, one panel per trial of the first seed, labelled by its axis values."""
    from PIL import Image

    first_seed = sweep.seeds[0]
    shown = [(t, g) for t in trials if t.overrides["seed"] == first_seed and (g := latest_samples(t.run_dir))]
    if not shown:
        return None
    plt, fig, axes = _panels(len(shown), 3.0, 3.3)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (t, grid) in zip(axes.flat, shown, strict=False):
        with Image.open(grid) as img:
            ax.imshow(img.convert("RGB"))
        ax.set_title(" ".join(f"{axis_name(k).split('.')[-1]}={t.overrides[k]}" for k in t.axes), fontsize=8)
    return _save(plt, fig, path)
