"""Bad input: exit code 2, one line naming the value and the valid choices, no traceback (in-process)."""

from __future__ import annotations

import pytest

import evaluate
import sample
import train
from lintrans import cmdline, config, procenv
from lintrans.distributed import detect, first_host
from lintrans.errors import UsageError
from tests.conftest import TINY, assert_one_line

CASES = {
    "unknown process": (["--config.model.forward=warp"], "unknown forward process 'warp'"),
    "K < 1": (["--config.model.K=0"], "config.model.K must be an integer >= 1, got 0"),
    "sigma < 0": (["--config.model.sigma=-0.5"], "config.model.sigma must be a finite number >= 0"),
    "sigma nan": (["--config.model.sigma=nan"], "config.model.sigma must be a finite number >= 0"),
    "image size": (["--config.data.image_size=32"], "but the config asks for (1, 32, 32)"),
    "missing data folder": (
        ["--config.data.dataset=FFHQ", "--config.data.path=/nonexistent/ffhq"],
        "/nonexistent/ffhq",
    ),
    "unknown data set": (["--config.data.dataset=imagenet"], "unknown data set 'imagenet'"),
    "bad override": (["--config.model.K=abc"], "--config.model.K=abc: invalid literal for int()"),
    "unknown key": (["--config.model.nope=1"], "unknown config key 'nope'"),
    "log_freq 0": (["--config.training.log_freq=0"], "config.training.log_freq must be an integer >= 1, got 0"),
    "eval_freq 0": (["--config.training.eval_freq=0"], "config.training.eval_freq must be an integer >= 1"),
    "snapshot 0": (["--config.training.snapshot_freq_for_preemption=0"], "snapshot_freq_for_preemption must be"),
    "eval batch 0": (["--config.eval.batch_size=0"], "config.eval.batch_size must be an integer >= 1"),
    "huge K": (["--config.model.K=1000000000"], "forward process 'heat' would store 3.73 GiB for K=1000000000"),
    "huge separable": (
        ["--config.model.forward=random_fixed_separable", "--config.model.K=10000000"],
        "forward process 'random_fixed_separable' would store 58.41 GiB",
    ),
    "unknown precision": (["--config.training.mixed_precision=fp8"], "unknown config.training.mixed_precision 'fp8'"),
    "unknown device": (["--config.device=tpu"], "unknown config.device 'tpu'; valid: auto, cpu, cuda"),
    "cuda without cuda": (["--config.device=cuda"], "CUDA unavailable"),
}


def call(main, argv: list[str], capsys) -> tuple[int, str]:
    code = cmdline.entry(main, argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_bad_input(tmp_path, capsys, case):
    overrides, needle = CASES[case]
    code, err = call(train.main, ["train.py", f"--config={TINY}", f"--workdir={tmp_path}", *overrides], capsys)
    assert_one_line(code, err, needle)
    assert not (tmp_path / "checkpoints-meta").exists()


def test_missing_config_file(tmp_path, capsys):
    assert_one_line(*call(train.main, ["train.py", "--config=configs/nope.py", f"--workdir={tmp_path}"], capsys),
                    "config file not found: configs/nope.py")  # fmt: skip


def test_config_file_that_raises_is_named(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    raise RuntimeError('boom')\n")
    code, err = call(train.main, ["train.py", f"--config={broken}", f"--workdir={tmp_path}"], capsys)
    assert_one_line(code, err, f"cannot load config file {broken}: RuntimeError: boom")


def test_workdir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    code, err = call(train.main, ["train.py", f"--config={TINY}", f"--workdir={target}"], capsys)
    assert_one_line(code, err, f"--workdir {target} is not a directory")
    assert target.read_text() == "x"


def test_missing_required_flags(tmp_path, capsys):
    assert_one_line(*call(train.main, ["train.py", f"--config={TINY}"], capsys), "--workdir is required")
    code, err = call(train.main, ["train.py", f"--workdir={tmp_path}"], capsys)
    assert_one_line(code, err, f"--config is required to start a run (--workdir {tmp_path} holds no config.json)")


def test_sample_missing_run(tmp_path, capsys):
    code, err = call(sample.main, ["sample.py", f"--workdir={tmp_path}", "--checkpoint=3"], capsys)
    assert_one_line(code, err, f"{tmp_path} is not a run directory: config.json is missing")


def test_evaluate_bad_flag_values(tmp_path, capsys):
    for flag, needle in (
        ("--mode=kid", "--mode='kid': Input should be 'elbo' or 'fid'"),
        ("--num_gen=1", "--num_gen=1: Input should be greater than or equal to 2"),
        ("--cleanfid_mode=tf", "--cleanfid_mode='tf': Input should be 'clean' or 'legacy_tensorflow'"),
        ("--param_name=../x", "--param_name='../x': String should match pattern"),
        ("--batch_size=-5", "--batch_size=-5: Input should be greater than or equal to 1"),
    ):
        assert_one_line(*call(evaluate.main, ["evaluate.py", f"--workdir={tmp_path}", flag], capsys), needle)


def test_unknown_process_lists_valid_names(tmp_path, capsys):
    _, err = call(train.main, ["train.py", f"--config={TINY}", f"--workdir={tmp_path}", "--config.model.forward=warp"],
                  capsys)  # fmt: skip
    assert "unknown forward process 'warp' (config.model.forward); valid: constant_deceleration," in err
    # every built-in one, in order (a test's own process registered earlier in this worker may sit among them)
    names = ("heat", "heat_random_scale", "identity", "pca_heat", "random_choice")
    assert all(f" {n}," in err for n in names) and sorted(names, key=err.index) == list(names)


def test_help_exits_zero(capsys):
    assert cmdline.entry(train.main, ["train.py", "--help"]) == 0
    assert "--workdir" in capsys.readouterr().out


def test_first_host_of_slurm_nodelists():
    assert first_host("rack[1-2]-node[01-04]") == "rack1-node01"  # was "rack1": a wrong MASTER_ADDR
    assert first_host("n[001-003]") == "n001"
    assert first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_host("node1,node2") == "node1"
    assert first_host("localhost") == "localhost"


def test_detect_launchers():
    torchrun = detect({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "5"})
    assert torchrun.launcher == "torchrun" and torchrun.local_world_size == 4
    srun = detect(
        {
            "SLURM_PROCID": "3",
            "SLURM_NTASKS": "4",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "77",
            "SLURM_JOB_NODELIST": "n[2-3]",
            "SLURM_TASKS_PER_NODE": "2(x2)",
            "SLURM_NODEID": "1",
        }
    )
    assert (srun.rank, srun.world_size, srun.local_rank, srun.master_addr, srun.master_port) == (3, 4, 1, "n2", 20077)
    assert srun.local_world_size == 2
    single = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert (single.world_size, single.launcher) == (1, "single")


def test_config_file_runs_once_and_overrides_are_typed_by_ml_collections(tmp_path):
    counter = tmp_path / "count"
    counting = tmp_path / "counting.py"
    counting.write_text(
        "from pathlib import Path\n\nfrom tests.configs import tiny\n\n\ndef get_config():\n"
        f"    count = Path({str(counter)!r})\n"
        "    count.write_text(count.read_text() + 'x' if count.exists() else 'x')\n"
        "    return tiny.get_config()\n"
    )
    argv = ["train.py", f"--config={counting}", f"--workdir={tmp_path}", "--config.model.K=3",
            "--config.model.channel_mult=(1,2)", "--config.sampling.delta", "0.5",
            "--noconfig.data.random_flip"]  # fmt: skip
    args = train.parse(argv)
    assert counter.read_text() == "x"
    assert args.config_file == str(counting)
    assert args.overrides == {"model.K": 3, "model.channel_mult": (1, 2), "sampling.delta": 0.5,
                              "data.random_flip": False}  # fmt: skip
    assert (args.config.model.K, args.config.model.channel_mult, args.config.sampling.delta) == (3, (1, 2), 0.5)
    assert args.config.data.random_flip is False
    same = config.load(counting, args.overrides)  # a sweep's trial with the same overrides: the same config
    assert config.to_json(same) == config.to_json(args.config)


def test_override_without_config_file_is_refused(tmp_path, capsys):
    code, err = call(train.main, ["train.py", f"--workdir={tmp_path}", "--config.model.K=3"], capsys)
    assert_one_line(code, err, "--config.model.K needs --config=FILE")


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, (0, 1)),
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (3, 4)),  # torchrun
        ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3"}, (2, 3)),  # Open MPI's mpirun
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, (1, 2)),  # MPICH / Intel MPI / srun --mpi=pmi2
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (0, 1)),  # a one-task batch script
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "1"}, (0, 1)),  # one task: SLURM's rank means nothing
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (1, 2)),  # srun with two tasks
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "RANK": "1", "WORLD_SIZE": "2"}, (1, 2)),  # torchrun in srun
        ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (1, 2)),
    ],
)
def test_rank_and_world_under_each_launcher(env, expected):
    assert procenv.rank_and_world(env) == expected
    assert procenv.rank(env) == expected[0] and procenv.is_rank0(env) == (expected[0] == 0)


RANK_VARIABLES = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
                  "PMIX_RANK", "PMIX_SIZE", "SLURM_PROCID", "SLURM_NTASKS")  # fmt: skip


@pytest.mark.parametrize("procid, ntasks, prints", [("1", "2", False), ("0", "2", True), ("3", "1", True)])
def test_say_prints_on_rank_0_only_under_slurm(monkeypatch, capsys, procid, ntasks, prints):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", procid)
    monkeypatch.setenv("SLURM_NTASKS", ntasks)
    cmdline.say("bad input")
    assert capsys.readouterr().err == ("error: bad input\n" if prints else "")


def test_detect_takes_ranks_from_procenv():
    pmix = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "5", "PMIX_RANK": "1"}  # srun --mpi=pmix
    info = detect(pmix)
    assert (info.launcher, info.rank, info.world_size) == ("srun", 1, 2)
    assert detect({"RANK": "0", "WORLD_SIZE": "1"}).launcher == "torchrun"


def test_a_node_list_that_cannot_be_read_is_refused_not_guessed():
    with pytest.raises(UsageError, match=r"cannot read the SLURM node list 'n\[1-': unbalanced brackets"):
        first_host("n[1-")


def test_an_unknown_sort_key_is_one_line_naming_the_metrics(tmp_path, capsys):
    from launchers import cli as launcher_cli

    code = launcher_cli.main(["--runs-dir", str(tmp_path), "table", "sweeps/quickstart.yaml", "--sort", "nll"])
    assert_one_line(code, capsys.readouterr().err, "unknown --sort 'nll'; valid: eval_loss, fid_inception,")
    assert launcher_cli.main(["--runs-dir", str(tmp_path), "table", "sweeps/quickstart.yaml", "--sort", "nll_bpd"]) == 0


def test_table_shows_a_short_set_of_columns_unless_asked_for_all(tmp_path, capsys):
    from launchers import cli as launcher_cli

    base = ["--runs-dir", str(tmp_path), "table", "sweeps/quickstart.yaml"]
    assert launcher_cli.main(base) == 0
    header = capsys.readouterr().out.splitlines()[0]  # nothing ran yet: no metric column
    assert header == "| trial | forward | K | seed | status | steps | wall_s | backend | job_id |", header
    assert launcher_cli.main([*base, "--columns", "all"]) == 0
    assert capsys.readouterr().out.startswith("| sweep | trial | forward | K | seed | status | reason |")
    assert launcher_cli.main([*base, "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("sweep,trial,")  # programs get every column
