"""Per-trial control: ``cancel --trial``, ``rerun --trial | --failed | --stale [--from-scratch]``.

They go through the submission path ``run`` takes (:mod:`launchers.submission`) with a subset of the
trials, so every backend does them as it does ``run`` and ``cancel``; these tests drive the local and
foreground backends.
"""

from __future__ import annotations

import json
from pathlib import Path

from launchers.sweep import load
from launchers.trial import write_spec
from tests.conftest import assert_usage_error, lintrans, start_run, status_of, table_rows, wait_until


def two_trials(folder: Path, n_iters: int = 2) -> str:
    sweep = folder / "two.yaml"
    sweep.write_text("name: two\nconfig: tests/configs/tiny.py\naxes:\n  model.forward: [heat, identity]\n"
                     f"overrides: {{training.n_iters: {n_iters}, training.snapshot_freq_for_preemption: 2}}\n"
                     "local: {slots: 2}\n")  # fmt: skip
    return str(sweep)


def test_a_trial_id_the_sweep_has_not_is_one_line_naming_it_and_status(tmp_path):
    sweep = two_trials(tmp_path)
    for command in (["cancel", sweep, "--trial", "0123456789"], ["rerun", sweep, "--trial", "0123456789"]):
        result = lintrans(tmp_path, *command)
        assert_usage_error(result, "no trial '0123456789' in sweep two; `lintrans status")
    assert_usage_error(lintrans(tmp_path, "rerun", sweep), "rerun takes one of --trial ID..., --failed, --stale")
    assert_usage_error(lintrans(tmp_path, "rerun", sweep, "--failed", "--stale"), "rerun takes one of")
    assert not (tmp_path / "sweeps").exists()  # refused before anything was written


def test_rerun_resumes_the_failed_ones_and_from_scratch_keeps_the_old_folder(tmp_path):
    sweep = two_trials(tmp_path)
    first = lintrans(tmp_path, "run", sweep, "--backend", "foreground")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    heat, identity = (t.run_dir for t in load(sweep, tmp_path, check_forwards=False).trials())
    failed = {**status_of(heat), "state": "failed", "reason": "simulated", "resumable": False}
    (heat / "status.json").write_text(json.dumps(failed))  # a failure `run` leaves alone
    untouched = (identity / "status.json").stat().st_mtime_ns
    assert "skip (failed; --retry-failed" in lintrans(tmp_path, "run", sweep, "--dry-run").stdout

    again = lintrans(tmp_path, "rerun", sweep, "--failed", "--backend", "foreground")
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert status_of(heat)["state"] == "done" and status_of(heat)["attempt"] == 2
    assert status_of(heat)["resumed_from"] == 2  # from its checkpoint
    assert (identity / "status.json").stat().st_mtime_ns == untouched  # only the failed one

    done = lintrans(tmp_path, "rerun", sweep, "--trial", identity.name, "--backend", "foreground")
    assert done.returncode == 0 and f"{identity.name} is done; `rerun --from-scratch`" in done.stdout
    scratch = lintrans(tmp_path, "rerun", sweep, "--trial", identity.name, "--from-scratch", "--backend", "foreground")
    assert scratch.returncode == 0, scratch.stdout[-2000:] + scratch.stderr[-2000:]
    kept = identity.with_name(f"{identity.name}.old-1")
    assert status_of(kept)["attempt"] == 1 and status_of(identity)["attempt"] == 1
    assert status_of(identity)["state"] == "done" and status_of(identity)["resumed_from"] == 0
    assert (heat / "status.json").stat().st_mtime_ns < (identity / "status.json").stat().st_mtime_ns
    shown = lintrans(tmp_path, "status", sweep).stdout
    assert "stale" not in shown and "2 trials (done 2)" in shown  # the kept folder is neither a trial nor stale
    assert [r["trial"] for r in table_rows(tmp_path, sweep)] == [heat.name, identity.name]


def test_cancel_trial_stops_that_trial_only(tmp_path):
    sweep = two_trials(tmp_path, n_iters=400)
    proc, _ = start_run(tmp_path, sweep, "two", "--backend", "local", steps=1)
    heat, identity = (t.run_dir for t in load(sweep, tmp_path, check_forwards=False).trials())
    try:
        wait_until("both trials running", lambda: all(status_of(t).get("state") == "running" for t in (heat, identity)),
                   300)  # fmt: skip
        cancelled = lintrans(tmp_path, "cancel", sweep, "--trial", identity.name)
        assert "local: cancelled 1 trial" in cancelled.stdout, cancelled.stdout + cancelled.stderr
        wait_until("the cancelled trial to stop", lambda: status_of(identity).get("state") == "preempted", 120)
        assert status_of(heat)["state"] == "running"
    finally:
        lintrans(tmp_path, "cancel", sweep)
        proc.communicate(timeout=120)
    assert status_of(heat)["state"] == "preempted"


def test_rerun_stale_submits_the_trials_whose_older_version_is_stale(tmp_path):
    """Through the sbatch backend, which writes each submitted trial's script and runs nothing."""
    config = tmp_path / "config.py"
    config.write_text("from tests.configs import tiny\n\n\ndef get_config():\n    return tiny.get_config()\n")
    sweep = two_trials(tmp_path)
    Path(sweep).write_text(Path(sweep).read_text().replace("tests/configs/tiny.py", "config.py"))
    loaded = load(sweep, tmp_path, check_forwards=False)
    heat = loaded.trials()[0]
    write_spec(loaded, heat)  # an older version of the heat trial only
    config.write_text(config.read_text().replace("return tiny.get_config()", "c = tiny.get_config()\n    "
                                                 "c.model.dropout = 0.1\n    return c"))  # fmt: skip
    new_heat, new_identity = load(sweep, tmp_path, check_forwards=False).trials()
    result = lintrans(tmp_path, "rerun", sweep, "--stale", "--backend", "sbatch")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (new_heat.run_dir / "launch.json").is_file() and not new_identity.run_dir.exists()
    assert not (heat.run_dir / "launch.json").exists()
