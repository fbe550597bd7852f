"""A trial's id is what it runs: the resolved config and the source of a user's forward process, never a path.

Editing a value gives new trials (the old folders show as ``stale``; ``run`` runs the new ones, the
table shows their numbers); renaming the config file, or editing a value an axis overrides, changes
nothing; folders named by the earlier scheme stay their trial's folder while they ran its config.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from launchers import status
from launchers.sweep import legacy_trial_id, load
from launchers.trial import spec_of
from lintrans.atomic import write_json
from tests.conftest import lintrans, status_of, table_rows

PROCESS = """\
import torch

from lintrans.forward import ScalarProcess, register_forward


@register_forward("fade_{tag}")
class Fade(ScalarProcess):
    @staticmethod
    def coefficients(k: torch.Tensor, K: int) -> torch.Tensor:
        return 1.0 - k / (FACTOR * K)


FACTOR = 2
"""

CONFIG = """\
import fade_{tag}  # registers fade_{tag}
from tests.configs import tiny


def get_config():
    config = tiny.get_config()
    config.model.dropout = 0.0
    config.training.eval_freq = 1
    return config
"""


def project(folder: Path, tag: str, forwards: str = "[heat, fade_{tag}]") -> Path:
    """A sweep beside its config and its own forward process module (``fade_<tag>``, a name no other test uses)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"fade_{tag}.py").write_text(PROCESS.format(tag=tag))
    (folder / "config.py").write_text(CONFIG.format(tag=tag))
    sweep = folder / "sweep.yaml"
    sweep.write_text(f"name: ident\nconfig: config.py\naxes:\n  model.forward: {forwards.format(tag=tag)}\n"
                     "  model.K: [3]\noverrides: {training.n_iters: 2, training.snapshot_freq_for_preemption: 2}\n"
                     "local: {slots: 1}\n")  # fmt: skip
    return sweep


@pytest.fixture
def clean_imports(monkeypatch):
    """Each test imports its project's modules afresh, and leaves nothing of them behind."""
    monkeypatch.setattr(sys, "path", [*sys.path])
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("fade_", "lintrans_config_")):
            sys.modules.pop(name)


def ids(sweep: Path, runs: Path) -> dict[str, str]:
    return {t.label: t.id for t in load(sweep, runs, check_forwards=False).trials()}


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_renaming_or_moving_the_config_keeps_every_id(tmp_path, clean_imports):
    sweep = project(tmp_path / "a", "move", "[heat]")
    before = ids(sweep, tmp_path / "runs")
    moved = tmp_path / "b" / "elsewhere"
    shutil.copytree(tmp_path / "a", moved)
    (moved / "config.py").rename(moved / "renamed.py")
    edit(moved / "sweep.yaml", "config: config.py", "config: renamed.py")
    assert ids(moved / "sweep.yaml", tmp_path / "runs") == before


def test_a_value_changes_the_ids_unless_an_axis_overrides_it(tmp_path, clean_imports):
    sweep = project(tmp_path, "value", "[heat, identity]")
    runs = tmp_path / "runs"
    before = ids(sweep, runs)
    edit(tmp_path / "config.py", "eval_freq = 1", "eval_freq = 1\n    config.model.K = 9")
    assert ids(sweep, runs) == before  # model.K is an axis: every trial sets it
    edit(tmp_path / "config.py", "dropout = 0.0", "dropout = 0.1")
    after = ids(sweep, runs)
    assert after.keys() == before.keys() and not set(after.values()) & set(before.values())


def test_editing_a_forward_process_changes_only_its_trials(tmp_path, clean_imports):
    sweep = project(tmp_path, "src")
    runs = tmp_path / "runs"
    before = ids(sweep, runs)
    edit(tmp_path / "fade_src.py", "FACTOR = 2", "FACTOR = 3")
    after = ids(sweep, runs)
    assert after["forward=heat K=3 seed=42"] == before["forward=heat K=3 seed=42"]
    assert after["forward=fade_src K=3 seed=42"] != before["forward=fade_src K=3 seed=42"]


def test_an_edited_config_shows_the_old_folders_stale_with_what_differs(tmp_path, clean_imports):
    sweep = project(tmp_path, "stale", "[heat, identity]")
    runs = tmp_path / "runs"
    loaded = load(sweep, runs, check_forwards=False)
    for t in loaded.trials():  # as `run` leaves them, before training
        t.run_dir.mkdir(parents=True)
        write_json(t.run_dir / "trial.json", spec_of(loaded, t))
    edit(tmp_path / "config.py", "dropout = 0.0", "dropout = 0.1")
    listing = sorted(p.name for p in (runs / "sweeps" / "ident").iterdir())
    result = lintrans(runs, "status", str(sweep))
    assert result.returncode == 0, result.stderr
    new = load(sweep, runs, check_forwards=False).trials()
    for t in new:
        assert f"{t.id}  {t.label}" in result.stdout and "pending" in result.stdout
    stale_lines = [line for line in result.stdout.splitlines() if "  stale  " in line]
    assert len(stale_lines) == 2 and all("differs: model.dropout 0→0.1" in line for line in stale_lines)
    assert "2 trials (pending 2); 2 stale folders" in result.stdout
    as_json = json.loads(lintrans(runs, "status", str(sweep), "--format", "json").stdout)
    assert [r["differs"] for r in as_json if r["state"] == "stale"] == [{"model.dropout": [0.0, 0.1]}] * 2
    assert sorted(p.name for p in (runs / "sweeps" / "ident").iterdir()) == listing  # status wrote nothing


def test_after_an_edit_run_runs_exactly_the_changed_trials_and_the_table_shows_their_numbers(tmp_path, clean_imports):
    sweep = project(tmp_path, "e2e")
    runs = tmp_path / "runs"
    first = lintrans(runs, "run", str(sweep), "--backend", "foreground")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    before = ids(sweep, runs)
    heat, fade = before["forward=heat K=3 seed=42"], before["forward=fade_e2e K=3 seed=42"]
    heat_status = (runs / "sweeps" / "ident" / heat / "status.json").stat().st_mtime_ns
    edit(tmp_path / "fade_e2e.py", "FACTOR = 2", "FACTOR = 4")
    new = ids(sweep, runs)["forward=fade_e2e K=3 seed=42"]
    shown = lintrans(runs, "status", str(sweep)).stdout
    assert f"{fade}  forward=fade_e2e K=3 seed=42  stale" in shown and "differs: forward process source" in shown
    assert f"{new}  forward=fade_e2e K=3 seed=42  pending" in shown
    again = lintrans(runs, "run", str(sweep), "--backend", "foreground")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"trial {new} done" in again.stdout and f"trial {heat}" not in again.stdout
    assert (runs / "sweeps" / "ident" / heat / "status.json").stat().st_mtime_ns == heat_status
    rows = table_rows(runs, str(sweep))
    assert [r["trial"] for r in rows] == [heat, new] and {r["status"] for r in rows} == {"done"}
    old_loss, new_loss = (status_of(runs / "sweeps" / "ident" / t)["eval_loss"] for t in (fade, new))
    assert rows[1]["eval_loss"] == new_loss != old_loss
    everything = json.loads(lintrans(runs, "table", str(sweep), "--include-stale", "--format", "json").stdout)
    assert [(r["trial"], r.get("stale_of")) for r in everything] == [(heat, None), (new, None), (fade, new)]


def test_a_folder_of_the_earlier_id_scheme_stays_its_trials_folder(tmp_path, clean_imports):
    """Named by the ``config:`` value and the overrides: while it ran the trial's config it is that
    trial's folder (done stays done, read-only commands write nothing); once the config changed, it is stale."""
    sweep = project(tmp_path, "legacy", "[heat]")
    runs = tmp_path / "runs"
    loaded = load(sweep, runs, check_forwards=False)
    (trial,) = loaded.trials()
    old = runs / "sweeps" / "ident" / legacy_trial_id(loaded.config_as_written, trial.overrides)
    old.mkdir(parents=True)
    spec = {k: v for k, v in spec_of(loaded, trial).items() if k not in ("resolved_config", "forward_source")}
    write_json(old / "trial.json", {**spec, "id": old.name})  # what the earlier code wrote
    write_json(old / "config.json", trial.resolved)  # what its trainer wrote
    write_json(old / "status.json", {"state": "done", "step": 2, "n_iters": 2, "eval_loss": 0.5})
    assert [t.run_dir for t in load(sweep, runs, check_forwards=False).trials()] == [old]
    result = lintrans(runs, "status", str(sweep))
    assert f"{old.name}  forward=heat K=3 seed=42  done" in result.stdout and "stale" not in result.stdout
    assert [(r["trial"], r["eval_loss"]) for r in table_rows(runs, str(sweep))] == [(old.name, 0.5)]
    assert sorted(p.name for p in old.iterdir()) == ["config.json", "status.json", "trial.json"]
    edit(tmp_path / "config.py", "dropout = 0.0", "dropout = 0.1")
    (new,) = load(sweep, runs, check_forwards=False).trials()
    assert new.run_dir != old
    (other,) = status.stale(load(sweep, runs, check_forwards=False), [new])
    assert other.folder == old and other.differs == {"model.dropout": (0.0, 0.1)}  # from its config.json


def test_how_a_run_is_logged_and_keys_added_at_their_neutral_value_name_no_trial(tmp_path):
    """Trackers are not what a trial computes, and a key lintrans adds (sampling.prior, at "data") must not
    rename every trial: a run folder's config.json written before the key existed still matches."""
    from launchers.sweep import trial_id
    from lintrans import config as cfg

    sweep = load("sweeps/quickstart.yaml", tmp_path)
    trial = sweep.trials()[0]
    logged = json.loads(json.dumps(trial.resolved))
    logged["logging"]["backends"] = ["tensorboard", "mlflow"]
    assert trial_id(logged) == trial.id
    before = json.loads(json.dumps(trial.resolved))
    del before["sampling"]["prior"], before["sampling"]["prior_rank"], before["logging"]  # an older config.json
    assert cfg.identity(before) == cfg.identity(trial.resolved) and trial_id(before) == trial.id
    gaussian = json.loads(json.dumps(trial.resolved))
    gaussian["sampling"]["prior"] = "gaussian"  # away from its neutral value: another trial
    assert trial_id(gaussian) != trial.id


def test_the_fast_resolver_gives_what_applying_the_overrides_gives(tmp_path):
    """Sweep.resolver (each (key, value) converted once) against apply_overrides + resolved, trial by trial,
    with values ml_collections converts: an int into a float field, a list into a tuple field."""
    from lintrans import config as cfg

    path = tmp_path / "typed.yaml"
    path.write_text("name: typed\nconfig: tests/configs/tiny.py\naxes:\n  model.K: [3, 5]\n  optim.lr: [1, 2, 0.001]\n"
                    "  model.channel_mult: [[1, 2], [1, 1, 1]]\nseeds: [0, 1]\n")  # fmt: skip
    sweep = load(str(path), tmp_path)
    for trial in sweep.trials():
        direct = cfg.resolved(cfg.apply_overrides(sweep.base, sweep.run_overrides(trial.overrides)))
        assert trial.resolved == direct, trial.overrides
    assert {json.dumps(t.resolved["optim"]["lr"]) for t in sweep.trials()} == {"1.0", "2.0", "0.001"}
