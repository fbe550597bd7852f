"""Install lintrans as a user would, then run one trial with the console command.

An unprivileged user (the current one, or ``nobody`` / a throw-away user when the tests run as
root) gets a copy of the repository it owns, a new venv, ``pip install -e '.[slurm]' -c
requirements.txt`` (the ranges in pyproject.toml, held to the lock), and runs a one-trial local
sweep end to end with ``lintrans``. Slow (pip installs torch): a few minutes.
"""

from __future__ import annotations

import json
import math
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import IN_CI, ROOT, copy_tracked

THROWAWAY_USER = "lintrans-install-test"
PASS_ENV = ("LANG", "LC_ALL", "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
# Run as the user: a Python >= 3.11 with venv, that the user can really execute.
PY_CHECK = (
    "import os, sys, venv, ensurepip\n"
    "sys.exit(not (sys.version_info >= (3, 11) and os.access(sys.executable, os.X_OK)))"
)
SWEEP = """\
name: install
config: tests/configs/tiny.py
axes:
  model.forward: [heat]
seeds: [0]
overrides:
  training.n_iters: 3
evaluations:
  - {mode: elbo, num_test: 20, num_train: 50}
resources: {cpus: 1, gpus: 0, time_min: 10}
local: {slots: 1}
"""
# What the venv must not hold (dev extras), and what it must (runtime and the slurm extra).
ABSENT = ("pytest", "ruff", "hypothesis")
PRESENT = ("lintrans", "torch", "torchvision", "ml_collections", "clean-fid", "mlxtend", "pydantic", "submitit")
VERSIONS = (
    "import json, sys\nfrom importlib.metadata import PackageNotFoundError, version\nout = {}\n"
    "for name in sys.argv[1:]:\n    try:\n        out[name] = version(name)\n"
    "    except PackageNotFoundError:\n        out[name] = None\nprint(json.dumps(out))"
)


def unusable(why: str) -> None:
    if IN_CI:
        pytest.fail(f"{why} (CI=true: the install test must run)")
    pytest.skip(why)


class User:
    """Runs commands as one unprivileged user with an exact environment (``env -i``)."""

    def __init__(self, home: Path, tmp: Path) -> None:
        self.created = False
        self.prefix: list[str] = []
        if os.geteuid() != 0:
            self.pw = pwd.getpwuid(os.geteuid())
        else:
            self.pw = self._root_pick()
            setpriv, runuser = shutil.which("setpriv"), shutil.which("runuser")
            if setpriv:
                self.prefix = [setpriv, f"--reuid={self.pw.pw_uid}", f"--regid={self.pw.pw_gid}", "--clear-groups"]
            elif runuser:
                self.prefix = [runuser, "-u", self.pw.pw_name, "--"]
            else:
                self.remove()
                unusable("running as root without setpriv or runuser: cannot switch to an unprivileged user")
        self.home, self.tmp = home, tmp
        self.path = "/usr/local/bin:/usr/bin:/bin"

    def _root_pick(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam("nobody")
        except KeyError:
            pass
        useradd = shutil.which("useradd")
        if useradd is None:
            unusable("running as root, no user 'nobody' and no useradd: no unprivileged user to install as")
        subprocess.run([useradd, "--system", "--no-create-home", THROWAWAY_USER], check=True, capture_output=True)
        self.created = True
        return pwd.getpwnam(THROWAWAY_USER)

    def remove(self) -> None:
        if self.created:
            subprocess.run(["userdel", THROWAWAY_USER], check=False, capture_output=True)

    def own(self, path: Path) -> None:
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", f"{self.pw.pw_uid}:{self.pw.pw_gid}", str(path)], check=True)

    def run(self, args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        env = {k: os.environ[k] for k in os.environ if k in PASS_ENV or k.startswith("PIP_")}
        env.update(HOME=str(self.home), TMPDIR=str(self.tmp), PATH=self.path, USER=self.pw.pw_name,
                   PIP_NO_CACHE_DIR="1", PYTHONUNBUFFERED="1")  # fmt: skip
        cmd = [*self.prefix, "env", "-i", *(f"{k}={v}" for k, v in env.items()), *args]
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def tail(result: subprocess.CompletedProcess, n: int = 3000) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-n:]}\n--- stderr\n{result.stderr[-n:]}"


def test_pip_install_as_user_then_one_local_trial():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        unusable("needs git and a git checkout to copy the tracked files")
    top = Path(tempfile.mkdtemp(prefix="lintrans-install-"))
    user = None
    try:
        src, home, tmp, runs, venv = top / "src", top / "home", top / "tmp", top / "runs", top / "venv"
        for d in (src, home, tmp):
            d.mkdir()
        copy_tracked(src)
        (top / "sweep.yaml").write_text(SWEEP)
        user = User(home, tmp)
        user.own(top)

        python = next(
            (p for p in (shutil.which("python3.11"), "/usr/bin/python3.11", "/usr/bin/python3", shutil.which("python3"))
             if p and user.run([p, "-c", PY_CHECK], cwd=src, timeout=60).returncode == 0),
            None,
        )  # fmt: skip
        if python is None:
            unusable(f"no Python >= 3.11 with venv that user {user.pw.pw_name} can run")

        r = user.run([python, "-m", "venv", str(venv)], cwd=src, timeout=300)
        assert r.returncode == 0, tail(r)
        user.path = f"{venv}/bin:{user.path}"
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        r = user.run([*pip, "--upgrade", "pip"], cwd=src, timeout=600)
        assert r.returncode == 0, tail(r)
        r = user.run([*pip, "-e", ".[slurm]", "-c", "requirements.txt"], cwd=src, timeout=2400)
        assert r.returncode == 0, tail(r)

        # Exactly the lock, no dev tools.
        pins = dict(
            line.split("#")[0].strip().split("==")
            for line in (src / "requirements.txt").read_text().splitlines()
            if "==" in line.split("#")[0]
        )
        r = user.run(["python", "-c", VERSIONS, *pins, *PRESENT], cwd=src, timeout=120)
        assert r.returncode == 0, tail(r)
        versions = json.loads(r.stdout)
        assert all(versions[name] is not None for name in PRESENT), versions
        assert {name: versions[name] for name in ABSENT} == dict.fromkeys(ABSENT), versions
        wrong = {
            name: (got, pins[name]) for name, got in versions.items() if name in pins and got not in (None, pins[name])
        }
        assert not wrong, f"installed (got, lock): {wrong}"
        assert not (venv / "bin" / "pytest").exists() and not (venv / "bin" / "ruff").exists()

        r = user.run(["lintrans", "--help"], cwd=src, timeout=120)
        assert r.returncode == 0 and "run" in r.stdout and "table" in r.stdout, tail(r)

        sweep = str(top / "sweep.yaml")
        r = user.run(["lintrans", "--runs-dir", str(runs), "run", sweep, "--backend", "local"], cwd=src, timeout=900)
        logs = "\n".join(p.read_text()[-3000:] for p in runs.glob("sweeps/install/*/train.log"))
        assert r.returncode == 0, f"{tail(r)}\n--- train.log\n{logs}"
        statuses = list(runs.glob("sweeps/install/*/status.json"))
        assert len(statuses) == 1, statuses
        assert json.loads(statuses[0].read_text())["state"] == "done", statuses[0].read_text()

        r = user.run(["lintrans", "--runs-dir", str(runs), "status", sweep], cwd=src, timeout=120)
        assert r.returncode == 0 and "done 1" in r.stdout, tail(r)
        print(f"as {user.pw.pw_name}: pip install -e '.[slurm]' -c requirements.txt; lintrans run/status:\n{r.stdout}")
        r = user.run(["lintrans", "--runs-dir", str(runs), "table", sweep, "--format", "json"], cwd=src, timeout=120)
        assert r.returncode == 0, tail(r)
        rows = json.loads(r.stdout)
        assert len(rows) == 1 and rows[0]["status"] == "done", rows
        nll = rows[0]["nll_bpd"]
        assert isinstance(nll, float) and math.isfinite(nll) and nll > 0, rows[0]
    finally:
        shutil.rmtree(top, ignore_errors=True)
        if user is not None:
            user.remove()
