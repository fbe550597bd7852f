"""Results tables built from trial records (never appended to by concurrent writers).

One row per trial (axes, seed, status, steps, every metric and its breakdown, wall time, backend,
job id); a grouped view with mean ± std over seeds; Markdown, CSV and JSON; a PNG of FID and NLL
against K, one line per forward process, one panel per σ. ``runs/results.csv`` is the shared
table over every sweep, rebuilt from scratch (so rebuilding is idempotent).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from launchers import state
from launchers.trial import SPEC
from lintrans.atomic import write_atomic, write_text

FIXED = ["sweep", "trial", "status", "reason", "steps"]
TAIL = ["wall_s", "backend", "job_id"]
AXIS_NAMES = {"model.forward": "forward", "model.K": "K", "model.sigma": "sigma", "seed": "seed"}
FID_METRICS = ("fid_inception", "fid_mnist_features")
NLL_METRIC = "nll_bpd"
CONFIG_SECTIONS = ("model", "data", "training", "optim", "sampling", "eval")


def trial_metrics(trial_dir: Path) -> dict[str, Any]:
    """Every metric of a trial's evaluation records, plus scalar breakdown terms as ``<mode>.<term>``."""
    from lintrans.records import read_records

    out: dict[str, Any] = {}
    for record in sorted(read_records(trial_dir), key=lambda r: r.get("created", "")):
        out.update(record.get("metrics", {}))
        mode = record.get("mode", "eval")
        for key, value in (record.get("breakdown") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{mode}.{key}"] = value
    return out


def rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per trial directory of a sweep, in trial order."""
    out = []
    for spec_path in sweep_dir.glob(f"*/{SPEC}"):
        spec = state.read(spec_path)
        if not spec:
            continue
        trial_dir = spec_path.parent
        st = state.summary(trial_dir)
        row: dict[str, Any] = {
            "sweep": spec["sweep"],
            "trial": spec["id"],
            "index": spec["index"],
            "status": st["state"],
            "reason": st["reason"] or "",
            "steps": st["step"],
        }
        for key in [*spec.get("axes", []), "seed"]:
            row[AXIS_NAMES.get(key, key)] = spec["overrides"][key]
        row.update(trial_metrics(trial_dir))
        row.update({"wall_s": st["wall_s"], "backend": st["backend"], "job_id": st["job_id"]})
        out.append(row)
    return sorted(out, key=lambda r: r["index"])


def columns(table: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for row in table:
        seen += [k for k in row if k not in seen]
    axes = [k for k in seen if k in AXIS_NAMES.values() or k.split(".")[0] in CONFIG_SECTIONS]
    metrics = [k for k in seen if k not in FIXED + TAIL + axes + ["index"]]
    main_metrics = [m for m in metrics if "." not in m] + [m for m in metrics if "." in m]
    return FIXED[:2] + axes + FIXED[2:] + main_metrics + TAIL


def grouped(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds for every metric, grouping by all other axes."""
    cols = columns(table)
    axes = [c for c in cols[2 : cols.index("status")] if c != "seed"]
    metrics = [c for c in cols[cols.index("steps") + 1 : -len(TAIL)]]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in table:
        groups[tuple(str(row.get(a)) for a in axes)].append(row)
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


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(table: list[dict[str, Any]], fmt: str, cols: list[str] | None = None) -> str:
    cols = cols or columns(table)
    if fmt == "json":
        return json.dumps(table, indent=2, default=str) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(table)
        return buf.getvalue()
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in table]
    return "\n".join(lines) + "\n"


def render_grouped(table: list[dict[str, Any]], fmt: str) -> str:
    g = grouped(table)
    if fmt != "md":
        return render(g, fmt, cols=list(dict.fromkeys(k for r in g for k in r)))
    cols = list(dict.fromkeys(k for r in g for k in r if not k.endswith("_std")))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in g:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:.4g} ± {r[c + '_std']:.2g}" if f"{c}_std" in r else _fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict[str, Any]], path: Path) -> Path | None:
    """FID and NLL against K: one line per forward process, one column of panels per σ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = grouped(table)
    metric_names = [m for m in (*FID_METRICS, NLL_METRIC) if any(m in r for r in g)]
    if not metric_names or not any("K" in r for r in g):
        return None
    sigmas = sorted({r.get("sigma") for r in g}, key=lambda s: (s is None, s))
    fig, axes = plt.subplots(
        len(metric_names), len(sigmas), figsize=(4.5 * len(sigmas), 3.4 * len(metric_names)), squeeze=False
    )
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
            ax.set_xlabel("K")
            ax.set_ylabel(metric)
            ax.set_title(f"σ = {sigma}" if sigma is not None else "")
            ax.grid(alpha=0.3)
            if by_forward:
                ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(path, lambda f: f.write(buf.getvalue()))


def rebuild_shared(runs_dir: Path) -> Path:
    """``runs/results.csv`` over every sweep under ``runs/sweeps``, rebuilt from the records."""
    table = [
        row for sweep_dir in sorted((runs_dir / "sweeps").glob("*")) if sweep_dir.is_dir() for row in rows(sweep_dir)
    ]
    return write_text(runs_dir / "results.csv", render(table, "csv"))
