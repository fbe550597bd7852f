"""Rows of results as Markdown, aligned text, CSV, JSON or LaTeX: the one table renderer (which rows:
launchers/table.py). ``markdown`` is ``md`` spelt out."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

FORMATS = ("md", "markdown", "table", "csv", "json", "latex")
LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {"~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                                                   "\\": r"\textbackslash{}"}  # fmt: skip


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
    if fmt == "table":  # for a terminal: columns aligned, numbers to the right
        cells = [list(columns)] + [[cell(r.get(c)).replace("\\|", "|") for c in columns] for r in rows]
        widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
        numeric = [all(isinstance(r.get(c), (int, float)) for r in rows if r.get(c) is not None) for c in columns]
        out = ["  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(line, widths, numeric, strict=True))
               for line in cells]  # fmt: skip
        return "\n".join(line.rstrip() for line in [out[0], "  ".join("-" * w for w in widths), *out[1:]]) + "\n"
    if fmt == "latex":  # a tabular to paste into a paper
        esc = lambda v: "".join(LATEX_SPECIAL.get(ch, ch) for ch in cell(v).replace("\\|", "|"))  # noqa: E731
        lines = [r"\begin{tabular}{" + "l" * len(columns) + "}", r"\hline", " & ".join(map(esc, columns)) + r" \\",
                 r"\hline", *(" & ".join(esc(r.get(c)) for c in columns) + r" \\" for r in rows), r"\hline",
                 r"\end{tabular}"]  # fmt: skip
        return "\n".join(lines) + "\n"
    lines = [f"# {title}", ""] if title else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
