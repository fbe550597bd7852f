"""Does a ranking hold under another budget? Spearman's rho between two metric columns of a sweep's table.

    python scripts/rank_agreement.py sweeps/study_budget.yaml nll_bpd_step200:nll_bpd \
        fid_mnist_features_step200:fid_mnist_features [--by forward]

For each ``BEFORE:AFTER`` pair of columns, the groups (the values of ``--by``, by default the sweep's
forward processes) are ranked by BEFORE and by AFTER (lower is better), per seed and on the seed
means, and the two rankings compared with Spearman's rank correlation (1: the same order, -1:
reversed). Prints a markdown table, as pasted into docs/results.md. Reads the table through
``lintrans table --format json``, so the numbers are the table's own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import defaultdict


def ranks(values: list[float]) -> list[float]:
    """Rank of each value (1 = lowest), ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (NaN when a ranking is constant)."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def order(groups: list[str], values: list[float]) -> str:
    return " < ".join(g for _, g in sorted(zip(values, groups)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep")
    p.add_argument("pairs", nargs="+", metavar="BEFORE:AFTER")
    p.add_argument("--by", default="forward", help="the table column whose values are ranked")
    a = p.parse_args()
    pairs = [tuple(pair.split(":")) for pair in a.pairs]
    if any(len(pair) != 2 for pair in pairs):
        print(f"error: each pair is BEFORE:AFTER, got {a.pairs}", file=sys.stderr)
        return 2
    table = subprocess.run([sys.executable, "-m", "launchers", "table", a.sweep, "--format", "json"],
                           capture_output=True, text=True)  # fmt: skip
    if table.returncode:
        print(table.stderr.strip(), file=sys.stderr)
        return table.returncode
    rows = [r for r in json.loads(table.stdout) if r.get("status") == "done"]
    print("| columns | seed | Spearman rho | order before | order after |\n|---|---|---|---|---|")
    for before, after in pairs:
        cells: dict = defaultdict(dict)  # seed -> group -> (before, after)
        for r in rows:
            if isinstance(r.get(before), float) and isinstance(r.get(after), float):
                cells[r["seed"]][r[a.by]] = (r[before], r[after])
        groups = sorted(set.intersection(*(set(c) for c in cells.values()))) if cells else []
        if len(groups) < 2:
            print(f"error: fewer than 2 {a.by} values have both {before} and {after} in every seed", file=sys.stderr)
            return 1
        rhos = []
        for seed, cell in sorted(cells.items()):
            b, f = [cell[g][0] for g in groups], [cell[g][1] for g in groups]
            rhos.append(spearman(b, f))
            print(f"| {before} → {after} | {seed} | {rhos[-1]:.2f} | {order(groups, b)} | {order(groups, f)} |")
        mb = [statistics.fmean(c[g][0] for c in cells.values()) for g in groups]
        ma = [statistics.fmean(c[g][1] for c in cells.values()) for g in groups]
        spread = f" (per seed {statistics.fmean(rhos):.2f} ± {statistics.pstdev(rhos):.2f})" if len(rhos) > 1 else ""
        print(f"| {before} → {after} | mean of {len(cells)} | {spearman(mb, ma):.2f}{spread} | {order(groups, mb)} "
              f"| {order(groups, ma)} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
