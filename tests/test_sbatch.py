"""Golden files of the generated sbatch text (as submitit's own tests do): every option a sweep can set."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from launchers.backends.slurm import SlurmBackend, resources, sbatch_text
from launchers.sweep import load
from tests.conftest import ROOT

GOLDEN = ROOT / "tests" / "golden"
SWEEP = "tests/sweeps/cluster_options.yaml"


def normalised(text: str, runs: Path) -> str:
    return text.replace(sys.executable, "<python>").replace(str(runs), "<runs>").replace(str(ROOT), "<repo>")


def check(name: str, text: str) -> None:
    """Compare with tests/golden/<name>; LINTRANS_UPDATE_GOLDEN=1 rewrites it (then review the diff)."""
    path = GOLDEN / name
    if os.environ.get("LINTRANS_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; review, then rerun with LINTRANS_UPDATE_GOLDEN=1"


@pytest.fixture
def sweep(tmp_path):
    return load(SWEEP, tmp_path)


def test_submitit_script(sweep, tmp_path):
    check("cluster_options.submitit.sbatch", normalised(SlurmBackend().dry_run(sweep, sweep.trials()), tmp_path))


def test_plain_sbatch_script(sweep, tmp_path):
    text = sbatch_text(sweep, resources(sweep), 2, tmp_path / "m.manifest", tmp_path / "logs")
    check("cluster_options.sbatch", normalised(text, tmp_path))


def test_memory_goes_out_in_whole_megabytes(sweep):
    assert resources(sweep)["mem"] == "7680M"


def test_no_sweep_value_reaches_the_script(tmp_path):
    sweep = load("tests/sweeps/injection.yaml", tmp_path)
    text = sbatch_text(sweep, resources(sweep), 3, tmp_path / "m", tmp_path / "l")
    text += SlurmBackend().dry_run(sweep, sweep.trials())
    assert "touch" not in text and "pwned" not in text
