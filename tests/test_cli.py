"""Bad input: exit code 2, one line naming the value and the valid choices, no traceback."""

from __future__ import annotations

import pytest

from lintrans.distributed import detect, first_host
from tests.conftest import TINY, run, train_args

CASES = {
    "unknown process": (["--config.model.forward=warp"], "unknown forward process 'warp'"),
    "K < 1": (["--config.model.K=0"], "config.model.K must be an integer >= 1, got 0"),
    "sigma < 0": (["--config.model.sigma=-0.5"], "config.model.sigma must be a finite number >= 0"),
    "image size": (["--config.data.image_size=32"], "but the config asks for (1, 32, 32)"),
    "missing data folder": (
        ["--config.data.dataset=FFHQ", "--config.data.path=/nonexistent/ffhq"],
        "/nonexistent/ffhq",
    ),
    "unknown data set": (["--config.data.dataset=imagenet"], "unknown data set 'imagenet'"),
    "bad override": (["--config.model.K=abc"], "config.model.K"),
    "unknown key": (["--config.model.nope=1"], "unknown config key 'nope'"),
}


def assert_usage_error(result, needle: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_bad_input(tmp_path, case):
    overrides, needle = CASES[case]
    result = run(train_args(tmp_path, *overrides))
    assert_usage_error(result, needle)
    assert not (tmp_path / "checkpoints-meta").exists()


def test_missing_config_file(tmp_path):
    assert_usage_error(run(["train.py", "--config=configs/nope.py", f"--workdir={tmp_path}"]), "configs/nope.py")


def test_sample_missing_checkpoint(tmp_path):
    result = run(["sample.py", f"--config={TINY}", f"--workdir={tmp_path}", "--checkpoint=3"])
    assert_usage_error(result, "checkpoint 3 not found")


def test_unknown_process_lists_valid_names(tmp_path):
    result = run(train_args(tmp_path, "--config.model.forward=warp"))
    assert "valid: constant_deceleration, constant_velocity, heat, identity" in result.stderr


def test_first_host_of_slurm_nodelists():
    assert first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_host("node1,node2") == "node1"
    assert first_host("localhost") == "localhost"


def test_detect_launchers():
    assert (
        detect({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "5"}).launcher
        == "torchrun"
    )
    srun = detect(
        {
            "SLURM_PROCID": "3",
            "SLURM_NTASKS": "4",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "77",
            "SLURM_JOB_NODELIST": "n[2-3]",
        }
    )
    assert (srun.rank, srun.world_size, srun.local_rank, srun.master_addr, srun.master_port) == (3, 4, 1, "n2", 20077)
    single = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (single.world_size, single.launcher) == (1, "single")
