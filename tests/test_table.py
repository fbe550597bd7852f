"""The grouped table: mean ± std over seeds, what markdown shows and what csv/json keep."""

from __future__ import annotations

import csv
import io

from launchers.table import grouped, render_grouped


def trial_row(forward: str, lr: float, seed: int, nll: float, l1: float, status: str = "done") -> dict:
    return {"sweep": "s", "trial": f"{forward}{lr}{seed}", "forward": forward, "optim.lr": lr, "seed": seed,
            "status": status, "reason": "", "steps": 10, "nll_bpd": nll, "elbo.L_1": l1,
            "wall_s": 1.0, "backend": "local", "job_id": "1"}  # fmt: skip


ROWS = [
    trial_row("heat", 1e-3, 0, 2.0, 5.0),
    trial_row("heat", 1e-3, 1, 4.0, 7.0),
    trial_row("identity", 1e-3, 0, 9.0, 1.0),
    trial_row("identity", 1e-3, 1, float("nan"), 3.0, "failed"),
]


def test_seeds_are_averaged_per_group_of_the_other_axes():
    heat, identity = grouped(ROWS)
    assert (heat["forward"], heat["optim.lr"], heat["seeds"], heat["done"]) == ("heat", 1e-3, 2, 2)
    assert (heat["nll_bpd"], heat["nll_bpd_std"]) == (3.0, 2**0.5)
    assert (identity["seeds"], identity["done"]) == (2, 1)
    assert (identity["nll_bpd"], identity["nll_bpd_std"]) == (9.0, 0.0)  # the failed seed's NaN is left out


def test_markdown_shows_axes_and_top_level_metrics_and_csv_keeps_every_breakdown():
    md = render_grouped(ROWS, "md")
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert header == ["forward", "optim.lr", "seeds", "done", "nll_bpd"]
    assert "| heat | 0.001 | 2 | 2 | 3 ± 1.4 |" in md
    table = list(csv.DictReader(io.StringIO(render_grouped(ROWS, "csv"))))
    assert {"elbo.L_1", "elbo.L_1_std", "nll_bpd_std"} <= set(table[0])
    assert float(table[0]["elbo.L_1"]) == 6.0


def test_the_axes_panel_has_one_line_per_process_with_the_spread_over_seeds():
    from launchers.table import axis_series

    rows = [*ROWS, trial_row("heat", 1e-2, 0, 6.0, 1.0), trial_row("heat", 1e-2, 1, 6.0, 1.0, "stopped")]
    heat, identity = axis_series(["model.forward", "optim.lr"], rows, "nll_bpd", "optim.lr", "heat")
    assert (heat.forward, heat.xs, heat.means) == ("heat", [1e-3, 1e-2], [3.0, 6.0])
    assert heat.stds == [1.0, 0.0] and heat.stopped == [(1e-2, 6.0)]  # population spread; stopped not averaged
    assert (identity.label, identity.xs, identity.means) == ("identity", [1e-3], [9.0])  # NaN left out


def test_aligned_text_and_latex_tables():
    from lintrans.table_format import render

    rows = [{"trial": "a_b", "K": 3, "nll": 1.23456}, {"trial": "c&d", "K": 10, "nll": 22.5}]
    assert render(rows, ["trial", "K", "nll"], "table").splitlines() == [
        "trial   K    nll", "-----  --  -----", "a_b     3  1.235", "c&d    10   22.5"]  # fmt: skip
    latex = render(rows, ["trial", "K", "nll"], "latex").splitlines()
    assert latex[0] == r"\begin{tabular}{lll}" and latex[-1] == r"\end{tabular}"
    assert r"a\_b & 3 & 1.235 \\" in latex and r"c\&d & 10 & 22.5 \\" in latex
    assert render(rows, ["trial"], "markdown") == render(rows, ["trial"], "md")
    assert "± " in render_grouped(ROWS, "table") and "± " in render_grouped(ROWS, "latex")
