"""``lintrans import-ihdm``: a run written by IHDM's own code becomes a lintrans run with IHDM's exact function.

The fixture (read-only, /work/shared/ihdm_reference) holds an IHDM run directory after 5 training
steps and IHDM's outputs for fixed inputs: the raw and EMA networks in eval mode and the heat
forward process at every level. After the import, lintrans must reproduce them, sample, and
resume training from IHDM's step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample
from lintrans import ihdm, ihdm_checkpoint
from lintrans.config import model_args
from lintrans.errors import UsageError
from lintrans.model import build_model
from lintrans.run import load_model
from lintrans.unet import AttentionBlock
from tests.configs import ihdm_tiny_mnist
from tests.conftest import ROOT, assert_one_line, env

REFERENCE = Path(os.environ.get("LINTRANS_IHDM_REFERENCE", "/work/shared/ihdm_reference"))
IHDM_RUN = REFERENCE / "ihdm_tiny_mnist_run"
OUTPUTS = REFERENCE / "ihdm_tiny_mnist_reference.pt"
CONFIG = "tests/configs/ihdm_tiny_mnist.py"
TOL = 1e-6

pytestmark = pytest.mark.skipif(not OUTPUTS.is_file(), reason=f"IHDM reference fixture not found in {REFERENCE}")


def python(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``python <args>`` from the repository root, one thread (2 shared cores: more threads only spin)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """The fixture imported with ``python -m lintrans.ihdm`` into a fresh run directory."""
    workdir = tmp_path_factory.mktemp("imported") / "run"
    result = python(["-m", "lintrans.ihdm", str(IHDM_RUN), f"--config={CONFIG}", f"--workdir={workdir}"])
    assert result.returncode == 0, result.stderr
    assert "step 5" in result.stdout
    return workdir


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(OUTPUTS, weights_only=True)


def test_network_and_ema_reproduce_ihdm(imported, reference):
    worst = {}
    for ema, key in ((False, "model_out"), (True, "ema_out")):
        loaded = load_model(imported, ema=ema)
        assert not loaded.model.training and loaded.step == reference["step"] == 5
        with torch.no_grad():
            out = loaded.model(reference["x"], reference["k"])
        worst[key] = (out - reference[key]).abs().max().item()
    print(f"max |lintrans - IHDM|: {worst}")
    assert max(worst.values()) < TOL, worst
    assert (reference["model_out"] - reference["ema_out"]).abs().max() > 1e-3  # the two really differ


def test_heat_matches_ihdm_at_every_level(imported, reference):
    process = load_model(imported).process
    x, blurred = reference["x"], reference["heat_T_k_x"]
    assert len(blurred) == process.K + 1 == 11
    worst = max((process(x, torch.full((len(x),), k)).double() - blurred[k]).abs().max().item() for k in range(11))
    print(f"max |T(k)x - IHDM| over k=0..10: {worst:.3g}")
    assert worst < TOL


def test_checkpoint_holds_lintrans_keys(imported):
    state = torch.load(imported / "checkpoints-meta" / "checkpoint.pth", weights_only=True)
    for key in ("model", "ema", "ema_num_updates", "optimizer", "step", "epoch", "data_position", "world_size",
                "rng", "config"):  # fmt: skip
        assert key in state, key
    assert state["step"] == 5 and state["ema_num_updates"] == 5
    assert len(state["optimizer"]["state"]) == len(state["model"])  # Adam moments for every parameter
    assert (imported / "config.json").is_file()


def test_sample_from_imported_run(imported, capsys):
    out = imported.parent / "samples"
    code = sample.main(["sample.py", f"--workdir={imported}", "--batch_size=2", f"--outdir={out}"])
    assert code == 0
    assert (out / "samples.png").is_file() and (out / "samples.npz").is_file()


def test_training_resumes_from_ihdm_step(imported, tmp_path):
    workdir = tmp_path / "resumed"
    shutil.copytree(imported, workdir)
    before = torch.load(workdir / "checkpoints-meta" / "checkpoint.pth", weights_only=True)
    target = before["step"] + 10
    result = python(["train.py", f"--config={CONFIG}", f"--workdir={workdir}", f"--config.training.n_iters={target}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 5" in result.stderr + result.stdout
    after = torch.load(workdir / "checkpoints-meta" / "checkpoint.pth", weights_only=True)
    assert after["step"] == 15 and after["ema_num_updates"] == 15
    assert all(torch.isfinite(v).all() for v in [*after["model"].values(), *after["ema"].values()])
    assert max((after["model"][k] - before["model"][k]).abs().max() for k in after["model"]) > 1e-5


# --------------------------------------------------------------------------- bad input


def call(argv: list[str], capsys) -> tuple[int, str]:
    code = ihdm.main(["lintrans import-ihdm", *argv])
    return code, capsys.readouterr().err


def test_missing_run_dir(tmp_path, capsys):
    code, err = call([str(tmp_path / "nope"), f"--config={CONFIG}", f"--workdir={tmp_path / 'new'}"], capsys)
    assert_one_line(code, err, "IHDM run directory not found")
    code, err = call([f"--config={CONFIG}", f"--workdir={tmp_path / 'new'}"], capsys)
    assert_one_line(code, err, "RUN_DIR is required")


class RunsCode:
    """Unpickling this would run a shell command: the importer must refuse before that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_foreign_pickle_global_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "evil"
    (run_dir / "checkpoints-meta").mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": {}, "model": {}, "step": 0, "ema": RunsCode(marker)},
               run_dir / "checkpoints-meta" / "checkpoint.pth")  # fmt: skip
    code, err = call([str(run_dir), f"--config={CONFIG}", f"--workdir={tmp_path / 'new'}"], capsys)
    assert_one_line(code, err, "refusing to unpickle")
    assert "system" in err and not marker.exists()
    assert not (tmp_path / "new").exists()


def test_config_that_disagrees(tmp_path, capsys):
    code, err = call([str(IHDM_RUN), f"--config={CONFIG}", "--config.model.K=20", f"--workdir={tmp_path / 'n'}"],
                     capsys)  # fmt: skip
    assert_one_line(code, err, "model.K=20 (IHDM: 10)")
    assert "--config.model.K=10" in err
    code, err = call([str(IHDM_RUN), f"--config={CONFIG}", "--config.model.rescale_resblocks=True",
                      f"--workdir={tmp_path / 'n'}"], capsys)  # fmt: skip
    assert_one_line(code, err, "model.rescale_resblocks")
    assert not (tmp_path / "n").exists()


def test_network_mismatch_names_first_key(tmp_path, capsys):
    """Without IHDM's JSON config only the tensors can tell: the first offending key is named."""
    run_dir = tmp_path / "bare"
    (run_dir / "checkpoints-meta").mkdir(parents=True)
    shutil.copy(IHDM_RUN / "checkpoints-meta" / "checkpoint.pth", run_dir / "checkpoints-meta" / "checkpoint.pth")
    argv = [str(run_dir), f"--config={CONFIG}", f"--workdir={tmp_path / 'n'}"]
    code, err = call([*argv, "--config.model.model_channels=64"], capsys)
    assert_one_line(code, err, "IHDM key time_embed.0.weight has shape (128, 32), lintrans level_mlp.0.weight needs")
    code, err = call([*argv, "--config.model.attention_levels=()"], capsys)
    assert_one_line(code, err, "IHDM key input_blocks.3.1.norm.weight has no place in the lintrans network")
    code, err = call([*argv, "--config.model.num_res_blocks=2"], capsys)
    assert_one_line(code, err, "IHDM key input_blocks.2.0.op.weight has no place")


def test_missing_ihdm_key_is_named():
    config = ihdm_tiny_mnist.get_config()
    model = build_model(model_args(config), 0)
    state = ihdm_checkpoint.load(IHDM_RUN / "checkpoints-meta" / "checkpoint.pth")
    del state["model"]["module.out.2.bias"]
    with pytest.raises(UsageError, match=r"no IHDM key out\.2\.bias for lintrans out\.2\.bias"):
        ihdm_checkpoint.convert(state, model, Path("ckpt"))


def test_key_map_is_one_to_one_and_complete():
    model = build_model(model_args(ihdm_tiny_mnist.get_config()), 0)
    mapping = ihdm_checkpoint.key_map(model)
    assert list(mapping) == list(model.state_dict())
    assert len(set(mapping.values())) == len(mapping)
    assert mapping["down.1.0.op.weight"] == "input_blocks.2.0.op.weight"
    assert mapping["upsamplers.1.conv.weight"] == "output_blocks.1.2.conv.weight"
    assert mapping["middle.0.out_norm.weight"] == "middle_block.0.out_layers.0.weight"


def test_legacy_attention_order_is_reordered_exactly():
    """IHDM's legacy order splits heads before q|k|v; the reordered rows give the same attention."""
    torch.manual_seed(0)
    C, heads, T = 8, 2, 5
    block = AttentionBlock(C, heads, -1)
    legacy_w, legacy_b = torch.randn(3 * C, C, 1), torch.randn(3 * C)
    proj_w = torch.randn(C, C, 1)
    x = torch.randn(3, C, 1, T)
    # The legacy computation, written from its definition: rows grouped per head as (q, k, v).
    h = torch.nn.functional.conv1d(block.norm(x).reshape(3, C, T), legacy_w, legacy_b)
    q, k, v = h.reshape(3 * heads, 3 * C // heads, T).split(C // heads, dim=1)
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / (C // heads) ** 0.5, dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(3, C, T)
    want = x + torch.nn.functional.conv1d(a, proj_w).reshape(x.shape)
    with torch.no_grad():
        block.qkv.weight.copy_(ihdm_checkpoint.legacy_qkv_to_new(legacy_w, heads))
        block.qkv.bias.copy_(ihdm_checkpoint.legacy_qkv_to_new(legacy_b, heads))
        block.proj.weight.copy_(proj_w)
        block.proj.bias.zero_()
        got = block(x)
    print(f"max |got - want| {(got - want).abs().max():.3g} of max |want| {want.abs().max():.3g}")
    assert (got - want).abs().max() < 1e-5 * want.abs().max()  # fp32 sums in another order: 5e-7 here
