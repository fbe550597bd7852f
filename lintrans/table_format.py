"""Rows of results as Markdown, CSV or JSON text: the one table renderer (which rows: launchers/table.py)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

FORMATS = ("md", "csv", "json")


def cell(value: Any) -> str:
    """A Markdown cell: 4 significant digits for floats, pipes escaped, nothing for None."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def render(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str = "md", title: str | None = None) -> str:
    """``rows`` as text in ``fmt`` (one of :data:`FORMATS`), ``columns`` in order; ``title`` heads Markdown only."""
    if fmt == "json":
        return json.dumps([{c: r.get(c) for c in columns} for r in rows], indent=2, default=str) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()
    lines = [f"# {title}", ""] if title else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
