"""Shared helpers: run the project's entry points as a user would, from the repository root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = "tests/configs/tiny.py"
IN_CI = os.environ.get("CI", "").lower() == "true"
# Modules that start SLURM or Ray clusters. Under ``pytest -n 2`` (scripts/test.sh) they run one
# after another in one worker, never beside each other (one Ray per machine: `ray.init` finds a
# running one; SLURM job ids, and so srun's ports, repeat between clusters), while the other worker
# trains beside them: their trials mostly take one core and wait on SLURM's clock.
CLUSTER_MODULES = ("test_multinode", "test_ray", "test_slurm", "test_slurm_cluster")


def _scope(nodeid: str) -> str:
    """The unit one xdist worker runs whole: the cluster modules together, else the module."""
    module = nodeid.split("::", 1)[0]
    return "clusters" if Path(module).stem in CLUSTER_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduling by :func:`_scope` (a module stays on one worker: module fixtures are built once)."""
    from xdist.scheduler import LoadScopeScheduling

    class ClusterScopeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return ClusterScopeScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The cluster tests first, so that their worker starts on the longest unit (scopes go out in order)."""
    items.sort(key=lambda item: _scope(item.nodeid) != "clusters")  # stable: the order within stays


@pytest.fixture(autouse=True, scope="session")
def _in_repository_root():
    """Entry points are called in-process with the paths a user types from the repository root."""
    previous = os.getcwd()
    os.chdir(ROOT)
    yield
    os.chdir(previous)


@pytest.fixture(autouse=True, scope="session")
def _feature_cache(tmp_path_factory) -> Iterator[None]:
    """Evaluations keep training-set features (:mod:`lintrans.feature_cache`) in a folder of the session, not
    in the home folder; the processes the tests start inherit it."""
    from lintrans.feature_cache import CACHE_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("feature-cache")))
        yield


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), **extra)
    return e


def run(args: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run ``python <args>`` in the repository root and capture its output."""
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout, **kw
    )


def lintrans(runs: Path, *args: str, timeout: float = 900, extra_env: dict | None = None, **kw):
    """``lintrans --runs-dir RUNS ARGS`` as a user runs it (a separate process, from the repository root)."""
    cmd = [sys.executable, "-m", "launchers", "--runs-dir", str(runs), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(**(extra_env or {})), capture_output=True, text=True,
                          timeout=timeout, **kw)  # fmt: skip


def copy_tracked(dest: Path) -> None:
    """The repository as a fresh clone would hold it: tracked (and new, not ignored) files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    for name in filter(None, listed.stdout.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def status_of(trial: Path) -> dict:
    try:
        return json.loads((trial / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def trial_dirs(runs: Path, sweep: str) -> list[Path]:
    return sorted(p.parent for p in (runs / "sweeps" / sweep).glob("*/trial.json"))


def wait_until(what: str, check, timeout: float, every: float = 0.5, describe=None):
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds (never a timing assert).

    ``describe`` (no arguments, returns text) says what the wait saw, in the failure message: a wait
    that times out on CI is otherwise a message with nothing to go on."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{described(describe)}")
        time.sleep(every)


def described(describe) -> str:
    """``describe()`` on a line of its own, or why it could not say (the timeout stays the failure)."""
    if describe is None:
        return ""
    try:
        return f"\n{describe()}"
    except Exception as exc:  # noqa: BLE001 - a scheduler that does not answer must not hide the timeout
        return f"\n(could not say what the wait saw: {exc!r})"


def start_run(runs: Path, sweep_file: str, sweep: str, *args: str, steps: int = 10) -> tuple[subprocess.Popen, Path]:
    """Start ``lintrans run SWEEP_FILE ARGS`` in the background; return it and its (first) trial once that
    trial has trained ``steps`` steps."""
    cmd = [sys.executable, "-m", "launchers", "--runs-dir", str(runs), "run", sweep_file, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trial = wait_until("the trial directory", lambda: next(iter(trial_dirs(runs, sweep)), None), 300)
    wait_until("training progress", lambda: (status_of(trial).get("step") or 0) >= steps, 600)
    return proc, trial


def table_rows(runs: Path, sweep_file: str, **kw) -> list[dict]:
    result = lintrans(runs, "table", sweep_file, "--format", "json", **kw)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def train_args(workdir: Path, *overrides: str, config: str = TINY) -> list[str]:
    return ["train.py", f"--config={config}", f"--workdir={workdir}", *overrides]


def assert_one_line(code: int, err: str, needle: str) -> None:
    """Bad input: exit code 2 and exactly one line on stderr that says ``needle``, no traceback."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def assert_usage_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert_one_line(result.returncode, result.stderr, needle)


def weights(workdir: Path, key: str = "model") -> dict[str, torch.Tensor]:
    state = torch.load(workdir / "checkpoints-meta" / "checkpoint.pth", weights_only=True)
    return state[key]


PROCESS_PARAMS = {
    "blur_sigma_min": 0.5,
    "blur_sigma_max": 4.0,
    "forward_seed": 3,
    "product_step": 0.1,
    "blur_scale_min": 0.5,
    "blur_scale_max": 1.5,
    "num_choices": 3,
}


def make_process(name: str, shape: tuple[int, int, int] = (1, 6, 6), K: int = 7, max_bytes: int = 2**31, **params):
    """A forward process from plain values, with test defaults for whatever parameters its class reads."""
    from lintrans.forward import create_forward, process_class

    given = {**PROCESS_PARAMS, **params}
    return create_forward(name, K, shape, max_bytes, **{k: given[k] for k in process_class(name).config_keys})


# Same data, levels and noise per sample; dropout off; SGD so the update is linear in the
# gradient. Averaging two half-batch gradients instead of one full-batch gradient only changes
# float32 summation order (~1e-7 relative); 5 SGD steps at lr 0.05 keep that below 1e-5.
# fp32 is pinned: these tests test DDP, and ``auto`` picks bf16 on CPUs with AVX512-BF16 or AMX,
# whose rounding is 2^-8 relative (tests/test_training.py has the one bf16 DDP test, with its bound).
DDP_CONFIG = {
    "optim.optimizer": "SGD",
    "optim.lr": 0.05,
    "optim.warmup": 0,
    "training.n_iters": 5,
    "training.batch_size": 16,
    "training.mixed_precision": "no",
}
DDP_OVERRIDES = [f"--config.{key}={value}" for key, value in DDP_CONFIG.items()]
DDP_ATOL = 1e-5


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[key] - b[key]).abs().max().item() for key in a)
    assert worst <= atol, worst
    moved = max((a[key] - b[key]).abs().max().item() for key in a if "out." in key)
    assert moved <= atol


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory) -> Path:
    """The tiny mnist5k model (data prior) trained 150 steps: far enough from its initial weights for
    evaluations to mean something."""
    workdir = tmp_path_factory.mktemp("trained_tiny") / "run"
    result = run(train_args(workdir, "--config.training.n_iters=150", "--config.training.snapshot_freq=150"))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> dict:
    """The reference of the DDP-equivalence tests: one process at the same global batch."""
    workdir = tmp_path_factory.mktemp("single")
    result = run(train_args(workdir, *DDP_OVERRIDES))
    assert result.returncode == 0, result.stderr
    return weights(workdir)


def initial_weights() -> dict[str, torch.Tensor]:
    """The tiny config's weights before any step (what the DDP tests' 5 steps move from)."""
    from lintrans.config import model_args
    from lintrans.model import build_model
    from tests.configs import tiny

    config = tiny.get_config()
    return build_model(model_args(config), config.seed).state_dict()


# Secrets a user's environment holds (tracker and cloud tokens): a run must write none of them anywhere.
CANARIES = {
    "WANDB_API_KEY": "canary-wandb-7f3a91",
    "MLFLOW_TRACKING_TOKEN": "canary-mlflow-52be07",
    "AWS_SECRET_ACCESS_KEY": "canary-aws-c4d118",
    "LINTRANS_SERVICE_TOKEN": "canary-token-9e0f6a",  # a LINTRANS_* name is recorded, unless it looks secret
}


def assert_no_canary(*folders: Path) -> None:
    """No file under ``folders`` (run directories, logs, scripts, stores) holds a canary value."""
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                leaked = [name for name, value in CANARIES.items() if value.encode() in data]
                assert not leaked, f"{path} holds the value of {leaked}"


@contextmanager
def lock_held_elsewhere(path: Path) -> Iterator[None]:
    """``path``'s ``flock`` held by another process (as a running trial holds its lock) inside the block."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, time\n"
                               f"fd = os.open({str(path)!r}, os.O_CREAT | os.O_RDWR)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


def require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("ray is not installed (CI=true)")
        pytest.skip("ray not installed")


def require(tool: str) -> str:
    """Path of an external tool; missing is a failure under CI=true, a skip elsewhere."""
    path = shutil.which(tool)
    if path is None:
        if IN_CI:
            pytest.fail(f"{tool} is not installed (CI=true: .ci/run must install it)")
        pytest.skip(f"{tool} not installed")
    return path
