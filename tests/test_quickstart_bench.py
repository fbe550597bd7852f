"""bench/quickstart.py, the main job timed at two revisions, in its short variant (``--quick``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.conftest import ROOT, env


def test_the_quickstart_bench_runs_each_revision_in_its_own_checkout_and_compares_rankings(tmp_path):
    result = subprocess.run([sys.executable, "bench/quickstart.py", "--quick", "--base", "HEAD"], cwd=ROOT, timeout=900,
                            env=env(LINTRANS_BENCH_RESULTS=str(tmp_path)), capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "quickstart.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert data["revisions"] == {"rev": head, "base": head} and data["same_ranking"] is True
    assert data["speedup"]["min"] > 0 and all(len(w) == 1 and w[0] > 0 for w in data["walls_s"].values())
    for tables in data["tables"].values():
        rows = tables[0]
        assert sorted(r["forward"] for r in rows) == ["constant_velocity", "heat"]
        assert all(r["status"] == "done" and math.isfinite(r["nll_bpd"]) for r in rows)
    assert "Speed-up of `HEAD` over `HEAD`" in (tmp_path / "quickstart.md").read_text()
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "bench-quickstart-" not in worktrees  # the checkouts are removed
