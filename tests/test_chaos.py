"""The chaos soak's short variant (bench/chaos.py runs the long one): faults mixed at random while a
local sweep runs, then the same numbers as a calm run of it."""

from __future__ import annotations

import json

from tests.conftest import run


def test_a_short_chaos_soak_ends_with_the_calm_runs_weights(tmp_path):
    soak = run(["bench/chaos.py", "--trials", "4", "--chaos-s", "40", "--seed", "1", "--out", str(tmp_path)],
               timeout=900)  # fmt: skip
    assert soak.returncode == 0, soak.stdout[-3000:] + soak.stderr[-3000:]
    res = json.loads((tmp_path / "chaos.json").read_text())
    assert res["checks"] and all(v is True for v in res["checks"].values()), res["checks"]
    assert set(res["faults"]) | set(res["missed"]) == set(res["kinds"]), res  # every class drawn at least once
    assert res["faults"].get("kill9", 0) + res["faults"].get("kill_launcher", 0) >= 1, res
    assert "| kill9 |" in (tmp_path / "chaos.md").read_text()
