"""bench/gpu.sh, the prepared GPU script, runs its code paths on this CPU (``--device cpu --quick``)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from tests.conftest import ROOT, assert_one_line, env


def gpu_sh(*args: str, out) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "bench/gpu.sh", *args, "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=env(PYTHON=sys.executable))  # fmt: skip


def test_the_gpu_script_runs_on_the_cpu(tmp_path):
    result = gpu_sh("--device", "cpu", "--quick", "--tar", str(tmp_path / "all.tgz"), out=tmp_path / "out")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("train", "sampling", "elbo_precision"):
        data = json.loads((tmp_path / "out" / f"gpu_cpu_{name}.json").read_text())
        assert data["quick"] is True and (tmp_path / "out" / f"gpu_cpu_{name}.md").is_file()
    train = json.loads((tmp_path / "out" / "gpu_cpu_train.json").read_text())
    assert {(r["precision"], r["compile"]) for r in train["results"]} == {("fp32", False), ("bf16", False)}
    assert all(r["img_per_s"] > 0 and 0 < r["fraction_of_peak"] for r in train["results"])
    assert "ddp_nccl: skipped" in result.stdout and "vs_ihdm: skipped" in result.stdout
    assert (tmp_path / "all.tgz").stat().st_size > 0


def test_bad_arguments_and_a_missing_gpu_exit_2(tmp_path):
    bad = gpu_sh("--device", "tpu", out=tmp_path)
    assert_one_line(bad.returncode, bad.stderr, "--device 'tpu'; valid: cuda, cpu")
    if not torch.cuda.is_available():
        missing = gpu_sh(out=tmp_path)
        assert_one_line(missing.returncode, missing.stderr, "CUDA is not available here")
