"""The Python API (``lintrans.sweeps``): typed DataFrames, no torch, no writes, the CLI's own rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from launchers.sweep import load
from launchers.trial import write_spec
from lintrans.atomic import write_json
from tests.conftest import ROOT, env, table_rows

# What a notebook does, run as a user who may not write the runs folder: every frame, as JSON.
NOTEBOOK = """\
import json, sys
import lintrans.sweeps as ls
s = ls.load(sys.argv[1], sys.argv[2])
frames = {"trials": s.trials(), "status": s.status(), "table": s.table()}
print(json.dumps({"torch": "torch" in sys.modules,
                  "dtypes": {k: {c: str(t) for c, t in f.dtypes.items()} for k, f in frames.items()},
                  "table": json.loads(frames["table"].to_json(orient="records", default_handler=str))}))
"""


def test_importing_the_api_imports_neither_torch_nor_pandas():
    code = "import sys, lintrans.sweeps; print(sorted({'torch', 'pandas'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd="/", env=env(), capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def fake_sweep(base: Path) -> tuple[Path, Path]:
    """Two trials as a finished ``run`` leaves them (spec, status, one ELBO record), one pending; no training."""
    sweep, runs = base / "api.yaml", base / "runs"
    sweep.write_text(f"name: api\nconfig: {ROOT}/tests/configs/tiny.py\naxes:\n  model.forward: [heat, identity]\n"
                     "  model.K: [3]\n")  # fmt: skip
    loaded = load(sweep, runs, check_forwards=False)
    done = loaded.trials()[0]
    write_spec(loaded, done)
    write_json(done.run_dir / "status.json", {"state": "done", "step": 10, "n_iters": 10, "wall_s": 12.5,
                                              "attempt": 1, "updated": "2026-01-02T03:04:05.000+00:00"})  # fmt: skip
    write_json(done.run_dir / "records" / "elbo-api-x-ckpt0.json", {"mode": "elbo", "metrics": {"nll_bpd": 3.25}})
    return sweep, runs


def test_a_notebook_reads_a_runs_folder_it_cannot_write_as_the_table_does(tmp_path):
    base = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own tmp folders are private to root
    try:
        sweep, runs = fake_sweep(base)
        subprocess.run(["chmod", "-R", "a-w,a+rX", str(base)], check=True)
        before = sorted((str(p), p.stat().st_mtime_ns) for p in base.rglob("*"))
        as_user = [] if os.geteuid() else ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        cmd = [*as_user, sys.executable, "-c", NOTEBOOK, str(sweep), str(runs)]
        result = subprocess.run(cmd, cwd="/", env=env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert sorted((str(p), p.stat().st_mtime_ns) for p in base.rglob("*")) == before  # nothing written
        seen = json.loads(result.stdout)
        assert not seen["torch"]
        assert seen["dtypes"]["trials"] == {"trial": "string", "forward": "string", "K": "int64", "seed": "int64",
                                            "run_dir": "object"}  # fmt: skip
        status_types = seen["dtypes"]["status"]
        assert (status_types["state"], status_types["wall_s"], status_types["attempt"]) == (
            "category",
            "float64",
            "int64",
        )
        assert status_types["updated"].startswith("datetime64") and status_types["updated"].endswith("UTC]")
        table_types = seen["dtypes"]["table"]
        assert (table_types["status"], table_types["nll_bpd"], table_types["steps"]) == (
            "category",
            "float64",
            "float64",
        )
        cli = table_rows(runs, str(sweep))
        frame = seen["table"]
        assert [c for c in frame[0] if c != "run_dir"] == list(cli[0])  # the CLI's columns, in its order
        assert [(r["trial"], r["status"], r["nll_bpd"]) for r in frame] == [
            (r["trial"], r["status"], r["nll_bpd"]) for r in cli
        ]
        assert frame[0]["nll_bpd"] == 3.25 and frame[0]["run_dir"] == str(runs / "sweeps" / "api" / frame[0]["trial"])
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(base)], check=True)
        shutil.rmtree(base)
