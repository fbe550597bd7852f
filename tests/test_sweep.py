"""Sweep files without a cluster: validation before anything is written, expansion, ids, search spaces."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from launchers import cli, status
from launchers.sweep import SHOWN_CHARS, Trial, load
from launchers.trial import write_spec
from lintrans.records import RUNS_ENV
from tests.conftest import ROOT, assert_one_line, env, lintrans, run

HEAD = "name: b\nconfig: tests/configs/tiny.py\n"
BAD = {
    "unknown key": (HEAD + "axes:\n  model.K: [2]\nbogus: 1\n", ":5: bogus: unknown key; valid: axes, backend"),
    "wrong type": (HEAD + "axes:\n  model.K: [2, ten]\n", ":4: axes.model.K.1: wrong type for 'model.K'"),
    "empty axis": (HEAD + "axes:\n  model.K: []\n", ":4: axes.model.K: an axis is a non-empty list"),
    "unknown backend": (HEAD + "backend: pbs\naxes:\n  model.K: [2]\n", ":3: backend: unknown backend 'pbs'"),
    "unknown forward": (HEAD + "axes:\n  model.forward: [heat, warp]\n", ":4: axes.model.forward.1: unknown forward"),
    "unknown config key": (HEAD + "axes:\n  model.nope: [1]\n", ":4: axes.model.nope.0: unknown config key"),
    "impossible K": (HEAD + "axes:\n  model.K: [3, 0]\n", ":4: axes.model.K.1: config.model.K must be"),
    "bad yaml": ("name: b\naxes: [unclosed\n", ":3: not valid YAML"),
    "nan sigma": (HEAD + "axes:\n  model.sigma: [.nan]\n", ":4: axes.model.sigma.0: nan is not a finite number"),
    "inf sigma": (HEAD + "axes:\n  model.sigma: [.inf]\n", ":4: axes.model.sigma.0: inf is not a finite number"),
    "negative cpus": (HEAD + "axes:\n  model.K: [2]\nresources: {cpus: -4}\n", ":5: resources.cpus: Input should be"),
    "negative gpus": (HEAD + "axes:\n  model.K: [2]\nresources: {gpus: -1}\n", ":5: resources.gpus: Input should be"),
    "zero time": (HEAD + "axes:\n  model.K: [2]\nresources: {time_min: 0}\n", ":5: resources.time_min: Input"),
    "zero parallelism": (HEAD + "axes:\n  model.K: [2]\nslurm: {array_parallelism: 0}\n", "slurm.array_parallelism"),
    "negative slots": (HEAD + "axes:\n  model.K: [2]\nlocal: {slots: -3}\n", ":5: local.slots: Input should be"),
    "duplicate values": (HEAD + "axes:\n  model.K: [3, 3]\n", ":4: axes.model.K: duplicate values 3"),
    "duplicate key": (HEAD + "axes:\n  model.K: [3]\n  model.K: [4]\n", ":5: axes.model.K: duplicate key"),
    "seed axis": (HEAD + "axes:\n  seed: [1, 2]\n", ":4: axes.seed: 'seed' is reserved"),
    "signal delay": (
        HEAD + "axes:\n  model.K: [2]\nresources: {time_min: 1}\nslurm: {signal_delay_s: 600}\n",
        ":6: slurm.signal_delay_s: 600 s must be below the time limit (resources.time_min: 1 min)",
    ),
    "asha grace": (
        HEAD + "axes:\n  training.n_iters: [40, 20]\nray: {asha: {grace_period: 20}}\n",
        ":5: ray.asha.grace_period: 20 steps must be below the shortest trial's training.n_iters (20)",
    ),
    "zero log_freq": (HEAD + "axes:\n  training.log_freq: [0]\n", "config.training.log_freq must be an integer >= 1"),
    "eval num_test": (
        HEAD + "axes:\n  model.K: [2]\nevaluations:\n  - {mode: elbo, num_test: abc}\n",
        ":6: evaluations.0.num_test: Input should be a valid integer, got 'abc'",
    ),
    "eval batch": (
        HEAD + "axes:\n  model.K: [2]\nevaluations:\n  - {mode: fid, batch_size: -5}\n",
        ":6: evaluations.0.batch_size: Input should be greater than or equal to 1",
    ),
    "eval metric": (
        HEAD + "axes:\n  model.K: [2]\nevaluations:\n  - {mode: fid, metric: fid_inception}\n",
        ":6: evaluations.0.dataset_name_cleanfid: fid_inception needs reference statistics",
    ),
    "eval unknown key": (
        HEAD + "axes:\n  model.K: [2]\nevaluations:\n  - {mode: elbo, num_tests: 3}\n",
        ":6: evaluations.0.num_tests: unknown evaluation key",
    ),
    "dense too big": (
        HEAD + "axes:\n  model.forward: [random_fixed]\n  model.K: [100000]\n",
        "forward process 'random_fixed' would store",
    ),
    "distribution in grid": (HEAD + "axes:\n  optim.lr: {loguniform: [1e-4, 1e-2]}\n", "a distribution needs search"),
    "loguniform low": (
        HEAD + "axes:\n  optim.lr: {loguniform: [0, 1]}\nsearch: {method: random, n_trials: 2}\n",
        ":4: axes.optim.lr: loguniform: low must be > 0",
    ),
    "uniform order": (
        HEAD + "axes:\n  optim.lr: {uniform: [2, 1]}\nsearch: {method: random, n_trials: 2}\n",
        ":4: axes.optim.lr: uniform: low (2.0) must be below high (1.0)",
    ),
    "reserved sbatch": (HEAD + "axes:\n  model.K: [2]\nslurm: {additional: {mem: 3G}}\n", "mem: set from resources"),
    "shell in partition": (HEAD + "axes:\n  model.K: [2]\nslurm: {partition: 'a;b'}\n", ":5: slurm.partition"),
    "config that raises": (
        "name: b\nconfig: tests/configs/broken.py\naxes:\n  model.K: [2]\n",
        ":2: config: cannot load",
    ),
    "missing config": (
        "name: b\nconfig: nope/conf.py\naxes:\n  model.K: [2]\n",
        f":2: config: config file not found: nope/conf.py, neither against the sweep file's folder "
        f"(TMP/nope/conf.py) nor against lintrans's root ({ROOT}/nope/conf.py)",
    ),
    "missing python_path": (HEAD + "python_path: [lib]\naxes:\n  model.K: [2]\n", ":3: python_path.0: no such folder"),
}


@pytest.fixture(autouse=True)
def _broken_config():
    path = ROOT / "tests" / "configs" / "broken.py"
    path.write_text("def get_config():\n    raise RuntimeError('boom')\n")
    yield
    path.unlink(missing_ok=True)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sweep_files(tmp_path, capsys, case):
    text, needle = BAD[case]
    needle = needle.replace("TMP", str(tmp_path.resolve()))  # where a relative path in the file was looked up
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(text)
    for dry in ([], ["--dry-run"]):  # --dry-run runs every check a real run does
        code, _, err = run_cli(capsys, "--runs-dir", str(tmp_path / "runs"), "run", str(sweep), *dry)
        assert_one_line(code, err, f"{sweep}{needle}" if needle.startswith(":") else needle)
        assert not (tmp_path / "runs").exists()  # nothing submitted, nothing written


def test_a_runs_folder_that_is_a_file_or_not_writable_is_one_line(tmp_path, capsys):
    file = tmp_path / "runs-file"
    file.write_text("precious")
    for runs in (file, file / "below"):
        code, _, err = run_cli(capsys, "--runs-dir", str(runs), "run", "tests/sweeps/tiny.yaml")
        assert_one_line(code, err, f"runs folder {runs} cannot be created: {file} is a file, not a folder")
    assert file.read_text() == "precious"
    locked = Path(tempfile.mkdtemp(dir="/tmp")) / "locked"  # pytest's own tmp folders are private to root
    locked.mkdir()
    locked.parent.chmod(0o755)
    locked.chmod(0o555)
    # as an unprivileged user (root writes anywhere): ``nobody`` where the tests run as root
    as_user = [] if os.geteuid() else [shutil.which("setpriv") or "setpriv", "--reuid=65534", "--regid=65534",
                                       "--clear-groups"]  # fmt: skip
    result = subprocess.run([*as_user, sys.executable, "-m", "launchers", "--runs-dir", str(locked), "run",
                             "tests/sweeps/tiny.yaml"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert_one_line(result.returncode, result.stderr, f"runs folder {locked} is not writable by this user")
    assert list(locked.iterdir()) == []
    shutil.rmtree(locked.parent)


def test_grid_larger_than_max_trials_is_refused(tmp_path, capsys):
    sweep = tmp_path / "huge.yaml"
    axes = "".join(f"  {k}: {list(range(1, 101))}\n" for k in ("model.K", "training.n_iters", "training.log_freq"))
    sweep.write_text(HEAD + "axes:\n" + axes)
    code, _, err = run_cli(capsys, "--runs-dir", str(tmp_path / "runs"), "run", str(sweep), "--dry-run")
    assert_one_line(code, err, "1,000,000 trials is more than --max-trials=10,000")
    assert load(sweep, tmp_path, max_trials=2_000_000).size == 1_000_000  # raising the cap lets it through


def test_sbatch_only_is_the_sbatch_backend_and_goes_with_no_other(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--runs-dir", str(tmp_path), "run", "tests/sweeps/tiny.yaml", "--sbatch-only",
                           "--backend", "local")  # fmt: skip
    assert_one_line(code, err, "--sbatch-only means --backend sbatch; it cannot go with --backend local")
    code, out, _ = run_cli(capsys, "--runs-dir", str(tmp_path), "run", "tests/sweeps/tiny.yaml", "--sbatch-only",
                           "--dry-run")  # fmt: skip
    assert code == 0 and "#SBATCH --array=0-5%" in out and "would be submitted to sbatch" in out


def test_expansion_is_deterministic_and_dry_run_writes_nothing(tmp_path, capsys):
    a = run_cli(capsys, "--runs-dir", str(tmp_path), "run", "tests/sweeps/tiny.yaml", "--dry-run")
    b = run_cli(capsys, "--runs-dir", str(tmp_path), "run", "tests/sweeps/tiny.yaml", "--dry-run")
    assert a[0] == 0 and a[1] == b[1]
    assert "6 of 6 trials would be submitted" in a[1]
    assert not any(tmp_path.iterdir())
    trials = load(ROOT / "tests/sweeps/tiny.yaml", tmp_path).trials()
    assert [t.label for t in trials][:2] == ["forward=heat K=3 seed=0", "forward=heat K=5 seed=0"]
    assert len({t.id for t in trials}) == 6 and all(t.run_dir.parent == tmp_path / "sweeps" / "tiny" for t in trials)


def test_ids_are_stable_across_edits_that_add_values(tmp_path):
    before = {t.label: t.id for t in load(ROOT / "tests/sweeps/tiny.yaml", tmp_path).trials()}
    grown = tmp_path / "tiny.yaml"
    text = (ROOT / "tests/sweeps/tiny.yaml").read_text().replace("model.K: [3, 5]", "model.K: [3, 5, 7]")
    grown.write_text(text)
    after = {t.label: t.id for t in load(grown, tmp_path).trials()}
    assert len(after) == 9 and all(after[label] == tid for label, tid in before.items())


def test_random_search_gives_the_same_trials_every_time(tmp_path):
    sweep = tmp_path / "random.yaml"
    body = (
        "axes:\n  optim.lr: {loguniform: [1e-4, 1e-2]}\n  model.K: {randint: [2, 9]}\n"
        "  model.forward: {choice: [heat, identity]}\n"
    )
    sweep.write_text(HEAD + body + "seeds: [0, 1]\nsearch: {method: random, n_trials: 5, seed: 3}\n")
    first, second = load(sweep, tmp_path).trials(), load(sweep, tmp_path).trials()
    assert [t.id for t in first] == [t.id for t in second] and len(first) == 10
    assert all(1e-4 <= t.overrides["optim.lr"] <= 1e-2 and 2 <= t.overrides["model.K"] < 9 for t in first)
    sweep.write_text(sweep.read_text().replace("seed: 3", "seed: 4"))
    assert {t.id for t in load(sweep, tmp_path).trials()}.isdisjoint({t.id for t in first})


def test_shipped_sweeps_validate():
    for path in sorted((ROOT / "sweeps").glob("*.yaml")) + sorted((ROOT / "tests" / "sweeps").glob("*.yaml")):
        sweep = load(path)
        assert sweep.size >= 1, path


# --------------------------------------------------------------------------- any working directory

# Two rows of the README's quickstart table: the repository's sweeps keep the ids of their run folders.
QUICKSTART_IDS = {"forward=heat K=10 seed=0": "4dd88a49f4", "forward=constant_deceleration K=20 seed=0": "7cf5b899b5"}


def test_the_repositorys_sweeps_keep_their_files_and_ids_from_any_directory(tmp_path, monkeypatch):
    here = {t.label: t.id for t in load("sweeps/quickstart.yaml", check_forwards=False).trials()}
    monkeypatch.chdir(tmp_path)
    sweep = load(ROOT / "sweeps" / "quickstart.yaml", check_forwards=False)
    assert {t.label: t.id for t in sweep.trials()} == here
    assert {label: here[label] for label in QUICKSTART_IDS} == QUICKSTART_IDS
    assert sweep.config == ROOT / "configs" / "mnist5k" / "default_mnist5k_configs.py"  # lintrans's root
    assert sweep.runs_dir == ROOT / "runs"  # its runs_dir: ../runs, against the sweep file's folder


OWN_CONFIG = """\
import own_beside_sweep
import own_library
from configs.mnist5k import default_mnist5k_configs


def get_config():
    config = default_mnist5k_configs.get_config()
    config.model.K = own_beside_sweep.K
    config.model.model_channels = own_library.WIDTH
    config.model.channel_mult = (1,)
    config.model.attention_levels = ()
    config.training.batch_size = 4
    return config
"""


@pytest.fixture
def own_project(tmp_path, monkeypatch) -> Iterator[Path]:
    """A project outside the repository: a config beside the sweep file that imports a module beside the sweep
    file and one from its python_path; the process imports nothing of it before the test (sys.path restored)."""
    monkeypatch.setattr(sys, "path", [*sys.path])
    project, lib = tmp_path / "project", tmp_path / "lib"
    (project / "conf").mkdir(parents=True)
    lib.mkdir()
    (project / "own_beside_sweep.py").write_text("K = 4\n")
    (lib / "own_library.py").write_text("WIDTH = 4\n")
    (project / "conf" / "mine.py").write_text(OWN_CONFIG)
    (project / "sweep.yaml").write_text(
        "name: own\nconfig: conf/mine.py\npython_path: [../lib]\naxes:\n  model.forward: [heat]\n"
        "overrides: {training.n_iters: 2, training.snapshot_freq_for_preemption: 2}\n"
    )
    yield project
    for name in ("own_beside_sweep", "own_library"):
        sys.modules.pop(name, None)


def test_a_sweep_resolves_its_paths_against_its_folder_and_the_trial_imports_alike(own_project, tmp_path, monkeypatch):
    """Loaded from elsewhere, the sweep finds its config, imports its modules and puts its runs beside itself;
    the trial process, started from ``/`` with nothing of the project on its path, trains that same config."""
    monkeypatch.chdir(tmp_path / "lib")
    monkeypatch.delenv(RUNS_ENV, raising=False)
    sweep = load(own_project / "sweep.yaml")
    assert (sweep.config, sweep.runs_dir) == (own_project / "conf" / "mine.py", own_project / "runs")
    assert (sweep.base.model.K, sweep.base.model.model_channels) == (4, 4)
    (trial,) = sweep.trials()
    monkeypatch.chdir(tmp_path)
    assert load(Path("project/sweep.yaml")).trials()[0].id == trial.id  # the id does not depend on the cwd
    write_spec(sweep, trial)
    spec = json.loads((trial.run_dir / "trial.json").read_text())
    assert spec["config"] == str((own_project / "conf" / "mine.py").resolve())
    assert spec["python_path"] == [str(own_project.resolve()), str((tmp_path / "lib").resolve()), str(ROOT)]
    done = subprocess.run([sys.executable, "-m", "launchers.trial", str(trial.run_dir)], cwd="/", env=env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trained = json.loads((trial.run_dir / "config.json").read_text())["model"]
    assert (trained["K"], trained["model_channels"]) == (4, 4)


def test_runs_go_by_flag_then_sweep_file_then_environment_then_beside_the_sweep_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "in" / "s.yaml"
    sweep.parent.mkdir()
    sweep.write_text(HEAD + "axes:\n  model.K: [2]\n")
    monkeypatch.delenv(RUNS_ENV, raising=False)
    assert load(sweep, check_forwards=False).runs_dir == tmp_path / "in" / "runs"
    monkeypatch.setenv(RUNS_ENV, str(tmp_path / "env"))
    assert load(sweep, check_forwards=False).runs_dir == tmp_path / "env"
    sweep.write_text(HEAD + "runs_dir: ../file\naxes:\n  model.K: [2]\n")
    assert load(sweep, check_forwards=False).runs_dir == tmp_path / "file"
    assert load(sweep, tmp_path / "flag", check_forwards=False).runs_dir == tmp_path / "flag"


@pytest.fixture
def _forget_init_project(monkeypatch):
    """What loading an ``init`` project leaves in this process: its folder on sys.path, its module, its process."""
    from lintrans.forward import FORWARD_PROCESSES

    monkeypatch.setattr(sys, "path", [*sys.path])
    yield
    sys.modules.pop("my_processes", None)
    FORWARD_PROCESSES.pop("edge_decay", None)


@pytest.mark.usefixtures("_forget_init_project")
def test_init_writes_a_project_that_validates_and_never_overwrites(tmp_path, capsys):
    import torch

    from lintrans.forward import create_forward

    project = tmp_path / "myproj"
    code, out, _ = run_cli(capsys, "init", str(project))
    assert code == 0 and f"next: lintrans run {project / 'sweep.yaml'}" in out
    assert sorted(p.name for p in project.iterdir()) == ["config.py", "my_processes.py", "sweep.yaml"]
    sweep = load(project / "sweep.yaml")  # every check of `run`: the project's own process is registered
    assert sweep.name == "myproj" and sweep.runs_dir == project / "runs"
    assert [t.label for t in sweep.trials()] == ["forward=heat seed=0", "forward=edge_decay seed=0"]
    process = create_forward("edge_decay", 5, (1, 4, 4))
    x, k = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 3])
    expected = torch.stack([process.matrix(int(level)) @ image.flatten() for level, image in zip(k, x)])
    assert torch.allclose(process(x, k).flatten(1), expected)  # T(k) as forward applies it is matrix(k)
    for target, why in ((project, "is not empty"), (project / "sweep.yaml", "exists and is not a folder")):
        code, _, err = run_cli(capsys, "init", str(target))
        assert_one_line(code, err, f"{target} {why}; give a new or empty folder")
    assert (project / "sweep.yaml").read_text().startswith("# lintrans's heat process")


def test_floats_in_scientific_notation_are_numbers(tmp_path):
    sweep = tmp_path / "sci.yaml"
    sweep.write_text(HEAD + "axes:\n  optim.lr: [1e-3, 2E-4]\n")
    assert [t.overrides["optim.lr"] for t in load(sweep, tmp_path).trials()] == [1e-3, 2e-4]


def test_reading_a_sweep_never_imports_torch(tmp_path):
    """``status``, ``table`` and ``cancel`` on a login node, and the SLURM task's submitit process, stay torch-free.

    torch costs seconds of import per process: every poll of ``status`` and every SLURM task paid
    it. ``run`` checks the forward processes (torch) before it submits anything; the others only read.
    """
    code = (
        "import sys\n"
        "from launchers import cli\n"
        "import launchers.backends.slurm, launchers.backends.local, launchers.backends.ray\n"
        "sweep = 'sweeps/quickstart.yaml'\n"
        "for argv in (['status', sweep], ['table', sweep, '--format', 'json'], ['cancel', sweep]):\n"
        f"    assert cli.main(['--runs-dir', {str(tmp_path)!r}, *argv]) == 0, argv\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
    )
    done = run(["-c", code])
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- property-based

KEYS = ["model.K", "model.sigma", "training.n_iters", "optim.lr", "model.forward", "data.random_flip", "nope.x"]
VALUES = st.one_of(
    st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.booleans(),
    st.none(), st.lists(st.integers(-2, 2), max_size=3),
)  # fmt: skip
SECTIONS = {
    "resources": st.dictionaries(st.sampled_from(["gpus", "cpus", "mem_gb", "time_min", "nodes", "bogus"]), VALUES),
    "slurm": st.dictionaries(st.sampled_from(["array_parallelism", "max_requeues", "partition", "setup", "x"]), VALUES),
    "local": st.dictionaries(st.sampled_from(["slots", "max_restarts", "y"]), VALUES),
    "evaluations": st.lists(
        st.dictionaries(st.sampled_from(["mode", "num_test", "batch_size", "metric", "z"]), VALUES)
    ),
    "seeds": st.lists(VALUES, max_size=3),
}


@st.composite
def malformed_sweeps(draw) -> dict:
    data = {"name": "fuzz", "config": "tests/configs/tiny.py", "axes": {"model.K": [2]}}
    axes = draw(st.dictionaries(st.sampled_from(KEYS), st.lists(VALUES, max_size=3), max_size=3))
    if axes:
        data["axes"] = axes
    for key, strategy in SECTIONS.items():
        if draw(st.booleans()):
            data[key] = draw(strategy)
    return data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=malformed_sweeps())
# JSON escapes U+10000 as a surrogate pair, which YAML reads back as two lone surrogates
@example(data={"name": "fuzz", "config": "tests/configs/tiny.py", "axes": {"model.K": ["\U00010000"]}})
def test_malformed_sweep_files_exit_2_with_one_line(tmp_path_factory, capsys, data):
    """Whatever a sweep file holds: a valid sweep (dry run, exit 0) or exit 2 with one line; runs/ untouched."""
    folder = tmp_path_factory.mktemp("fuzz")
    sweep = folder / "fuzz.yaml"
    sweep.write_text(json.dumps(data))  # JSON is YAML
    code, _, err = run_cli(capsys, "--runs-dir", str(folder / "runs"), "run", str(sweep), "--dry-run")
    assert "Traceback" not in err
    assert code in (0, 2), err
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: {sweep}"), err
    assert not (folder / "runs").exists()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from([*KEYS[:-1], "training.log_freq", "eval.batch_size", "model.ema_rate"]), value=VALUES)
@example(key="model.forward", value="\r")  # a control character in the value must not split the error line
def test_override_values_never_give_a_traceback(tmp_path_factory, capsys, key, value):
    """``train.py --config.<key>=<value>`` with any value: it trains (not here: refused before) or exits 2."""
    from lintrans import cmdline as lcli

    workdir = tmp_path_factory.mktemp("ov")
    text = json.dumps(value) if not isinstance(value, str) else value
    argv = ["train.py", "--config=tests/configs/tiny.py", f"--workdir={workdir}", f"--config.{key}={text}"]
    code = lcli.entry(_validate_only, argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and code in (0, 2), err
    if code == 2:
        assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert not any(workdir.iterdir())


def _validate_only(argv: list[str]) -> int:
    """train.py's edge up to (not including) training: parse, load, validate, build the forward process."""
    import train
    from lintrans import config as cfg
    from lintrans.forward import create_forward

    config = train.parse(argv).config
    cfg.validate(config)
    create_forward(**cfg.forward_args(config))
    return 0


# ----------------------------------------------------------------------------------------- what status prints


def test_odd_values_stay_on_one_short_row_and_json_has_them_whole(tmp_path, capsys):
    long_value = "x" * 300
    trials = [Trial("a1", 0, {"data.note": "two\nlines\x1b[31m", "seed": 0}, tmp_path / "a1", ("data.note",)),
              Trial("b2", 1, {"data.note": long_value, "seed": 0}, tmp_path / "b2", ("data.note",))]  # fmt: skip
    assert trials[0].label == "note=two\\nlines\\x1b[31m seed=0"
    assert trials[1].label == f"note={'x' * (SHOWN_CHARS - 1)}… seed=0"
    seen = status.views(trials)
    status.print_trials(load("tests/sweeps/tiny.yaml", tmp_path, check_forwards=False), trials, seen)
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 4 and "\x1b" not in out  # header, two rows, the count
    assert max(len(line) for line in out.splitlines()) < 130, out
    assert [row["values"]["data.note"] for row in json.loads(status.as_json(trials, seen))] == [
        "two\nlines\x1b[31m",
        long_value,
    ]


def test_one_trial_is_one_trial_and_a_damaged_file_is_said_once(tmp_path, capsys):
    sweep = tmp_path / "one.yaml"
    sweep.write_text(HEAD + "axes:\n  model.K: [3]\n")
    code, out, _ = run_cli(capsys, "--runs-dir", str(tmp_path / "runs"), "run", str(sweep), "--dry-run")
    assert code == 0 and "dry run: 1 of 1 trial would be submitted to local" in out
    (trial,) = load(sweep, tmp_path / "runs").trials()
    trial.run_dir.mkdir(parents=True)
    (trial.run_dir / "status.json").write_text('{"state": "runn')
    (trial.run_dir / "trial.json").write_text("{}")
    result = lintrans(tmp_path / "runs", "status", str(sweep))
    assert result.returncode == 0 and "sweep b: 1 trial (" in result.stdout
    assert result.stderr.count("unreadable") == 1, result.stderr


def test_the_follow_hint_keeps_the_runs_folder(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "--runs-dir", str(tmp_path / "mine"), "run", "tests/sweeps/tiny.yaml",
                           "--backend", "sbatch")  # fmt: skip
    assert code == 0
    assert f"follow with: lintrans --runs-dir {tmp_path / 'mine'} status tests/sweeps/tiny.yaml" in out


def test_global_flags_go_anywhere_and_a_backends_flag_only_with_its_backend(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "tests/sweeps/tiny.yaml", "--dry-run", "--runs-dir", str(tmp_path),
                           "--max-trials", "3")  # fmt: skip
    assert_one_line(code, err, "6 trials is more than --max-trials=3")
    code, _, err = run_cli(capsys, "--runs-dir", str(tmp_path), "run", "tests/sweeps/tiny.yaml", "--backend", "slurm",
                           "--gpus", "0", "--dry-run")  # fmt: skip
    assert_one_line(code, err, "--gpus is an option of the local backend; this run uses slurm")
    code, _, err = run_cli(capsys, "run", "tests/sweeps/tiny.yaml", "--ray-address", "auto", "--dry-run")
    assert_one_line(code, err, "--ray-address is an option of the ray backend; this run uses local")
    assert not tmp_path.joinpath("sweeps").exists()
    version = lintrans(tmp_path, "--version")
    assert version.returncode == 0 and re.fullmatch(r"lintrans \d+\.\d+\.\d+\n", version.stdout), version.stdout
