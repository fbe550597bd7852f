"""A researcher's own project, as the README's "Use it in your own project" tells it, far from the repository.

lintrans is installed (a real, non-editable ``pip install``) into a fresh venv that cannot see the
repository: the source copy it was built from is deleted before anything runs, and no
``PYTHONPATH`` is set. Then ``lintrans init`` writes a project, and from ``/`` the project's sweep
runs on the local backend, ``status`` and ``table`` read it: every trial done, the project's own
forward process among them. The venv borrows the heavy dependencies (torch, ...) from the
environment running the tests through a ``.pth`` file, so that nothing is downloaded and the test
takes about a minute; tests/test_install.py installs them from the lock instead. Runs everywhere,
CI included: it needs nothing beyond Python's ``venv`` and git.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.conftest import copy_tracked


def test_init_then_run_status_table_from_root_with_an_installed_lintrans(tmp_path):
    venv, src, project = tmp_path / "venv", tmp_path / "src", tmp_path / "x" / "myproj"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    ours = sysconfig.get_paths()
    # The running environment's packages, after the venv's own (a path line: its .pth files, the
    # repository's editable install among them, are not read).
    Path(site, "dependencies.pth").write_text(
        "".join(f"{p}\n" for p in dict.fromkeys([ours["purelib"], ours["platlib"]]))
    )
    clean = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path), "LANG": "C.UTF-8"}

    def call(*args: str | Path, cwd: Path = Path("/"), timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run([str(a) for a in args], cwd=cwd, env=clean, capture_output=True, text=True,
                                timeout=timeout)  # fmt: skip
        assert result.returncode == 0, (
            f"{args}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
        return result

    copy_tracked(src)
    call(python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", src, cwd=tmp_path)
    shutil.rmtree(src)
    where = call(python, "-c", "import configs, launchers, lintrans; print(launchers.__file__, configs.__file__)")
    installed = [Path(f).resolve().is_relative_to(venv.resolve()) for f in where.stdout.split()]
    assert installed == [True, True], where.stdout  # the venv's copies, not the repository's

    call("lintrans", "init", "x/myproj", cwd=tmp_path)
    sweep = project / "sweep.yaml"
    run = call("lintrans", "run", sweep, "--backend", "local", timeout=600)
    logs = "".join(p.read_text()[-2000:] for p in project.glob("runs/sweeps/myproj/*/train.log"))
    assert "progress: 2/2 finished" in run.stdout, f"{run.stdout}\n{logs}"
    status = call("lintrans", "status", sweep)
    assert "sweep myproj: 2 trials (done 2)" in status.stdout, status.stdout
    rows = json.loads(call("lintrans", "table", sweep, "--format", "json").stdout)
    assert sorted((r["forward"], r["status"]) for r in rows) == [("edge_decay", "done"), ("heat", "done")], rows
    assert all(math.isfinite(r["nll_bpd"]) for r in rows), rows
    # the runs beside the sweep file, not in the working directory
    assert {p.parent.name for p in project.glob("runs/sweeps/myproj/*/trial.json")} == {r["trial"] for r in rows}
