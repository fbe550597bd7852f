"""bench/quickstart.py, the main job timed at two revisions, in its short variant (``--quick``)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import IN_CI, ROOT, env


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def test_the_quickstart_bench_runs_each_revision_in_its_own_checkout_and_compares_rankings(tmp_path):
    if not (ROOT / ".git").exists():
        if IN_CI:
            pytest.fail("the quickstart bench needs a git checkout (CI=true)")
        pytest.skip("needs a git checkout: the bench checks out revisions")
    head = git("rev-parse", "HEAD")
    worktrees = git("worktree", "list", "--porcelain")
    bench = subprocess.Popen([sys.executable, "bench/quickstart.py", "--quick", "--rev", head, "--base", head],
                             cwd=ROOT, env=env(LINTRANS_BENCH_RESULTS=str(tmp_path)), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        out, _ = bench.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(bench.pid, signal.SIGTERM)  # the bench removes its checkouts on SIGTERM; its trials end with it
        out, _ = bench.communicate(timeout=60)
        pytest.fail(f"bench/quickstart.py --quick ran over 900 s:\n{out[-3000:]}")
    assert bench.returncode == 0, out[-3000:]
    data = json.loads((tmp_path / "quickstart.json").read_text())
    assert data["revisions"] == {"rev": head, "base": head} and data["same_ranking"] is True
    assert data["speedup"]["min"] > 0 and all(len(w) == 1 and w[0] > 0 for w in data["walls_s"].values())
    for tables in data["tables"].values():
        rows = tables[0]
        assert sorted(r["forward"] for r in rows) == ["constant_velocity", "heat"]
        assert all(r["status"] == "done" and math.isfinite(r["nll_bpd"]) for r in rows)
    assert f"Speed-up of `{head}` over `{head}`" in (tmp_path / "quickstart.md").read_text()
    assert git("worktree", "list", "--porcelain") == worktrees  # its checkouts are gone again
