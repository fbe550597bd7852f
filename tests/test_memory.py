"""eval.max_batch_bytes: the measured memory of a network call, the largest batch that fits, and results that
do not depend on the budget (lintrans.memory, lintrans.device.ChunkedNetwork); and the process keeping the
memory of freed tensors (lintrans.procenv.keep_freed_memory)."""

from __future__ import annotations

import platform

import pytest
import torch

from lintrans.device import ChunkedNetwork, inference_network
from lintrans.errors import UsageError
from lintrans.eval_spec import EvalSpec
from lintrans.evaluation import evaluate
from lintrans.memory import call_peak_bytes, largest_batch
from lintrans.run import load_model
from tests.conftest import make_process, run


@pytest.fixture(scope="module")
def loaded(trained_tiny):
    return load_model(trained_tiny, 0, torch.device("cpu"))


def test_a_calls_peak_grows_with_its_batch_and_the_budget_sets_the_chunk(loaded):
    cpu, net, process = torch.device("cpu"), loaded.model.eval(), loaded.process
    one, two, eight = (call_peak_bytes(net, process, b, cpu) for b in (1, 2, 8))
    per_sample = two - one
    assert 0 < per_sample and one < two < eight  # activations, not weights: they scale with the batch
    assert abs((eight - one) - 7 * per_sample) <= 0.1 * 7 * per_sample  # about linear
    fixed = one - per_sample
    assert largest_batch(net, process, cpu, fixed + 3 * per_sample) == 3
    with pytest.raises(UsageError, match=r"eval.max_batch_bytes=10 is below what one sample's network call needs"):
        largest_batch(net, process, cpu, 10)


def test_a_chunked_network_answers_as_the_whole_batch_does(loaded):
    net = loaded.model.eval()
    u, k = torch.rand(7, *loaded.process.shape), torch.randint(1, loaded.process.K + 1, (7,))
    with torch.no_grad():
        whole, chunked = net(u, k), ChunkedNetwork(net, 3)(u, k)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


class _ScaleByTheta(torch.nn.Module):
    def forward(self, u, k, theta):
        return u * theta.view(-1, 1, 1, 1) + k.view(-1, 1, 1, 1)


def test_each_chunk_gets_its_own_samples_theta():
    """A stochastic process's network sees each sample's own theta (heat_random_scale's blur scale)."""
    process = make_process("heat_random_scale")
    theta = process.sample_theta(5, torch.Generator().manual_seed(0))
    u, k = torch.rand(5, *process.shape), torch.arange(5)
    net = _ScaleByTheta()
    torch.testing.assert_close(ChunkedNetwork(net, 2)(u, k, theta), net(u, k, theta))
    assert isinstance(inference_network(net, False, torch.device("cpu"), max_bytes=1 << 30, process=process),
                      ChunkedNetwork)  # fmt: skip


def test_an_evaluation_under_a_memory_budget_gives_the_same_bound_and_says_its_batch(trained_tiny, loaded):
    cpu, net = torch.device("cpu"), loaded.model.eval()
    one, two = (call_peak_bytes(net, loaded.process, b, cpu) for b in (1, 2))
    budget = (one - (two - one)) + 4 * (two - one)  # four samples per call
    spec = {"mode": "elbo", "num_test": 10, "num_train": 50, "batch_size": 10}
    whole = evaluate(trained_tiny, EvalSpec.parse({**spec, "param_name": "whole"}), device=cpu)
    small = evaluate(
        trained_tiny, EvalSpec.parse({**spec, "param_name": "small", "max_batch_bytes": budget}), device=cpu
    )
    assert whole["evaluation"]["network_batch"] is None and small["evaluation"]["network_batch"] == 4
    assert small["metrics"]["nll_bpd"] == pytest.approx(whole["metrics"]["nll_bpd"], rel=1e-6)


# A network call's pattern: tensors of 4-16 MB, 120 MB live at once, all freed, then allocated again.
# Prints the minor page faults of five repeats per page they allocate.
REALLOCATE = """
import resource, sys, torch
from lintrans.procenv import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
sizes = [2**20 * (i % 4 + 1) for i in range(12)]
def work():
    tensors = [torch.ones(n) for n in sizes]
    return sum(float(t[-1]) for t in tensors)
work()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    work()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (5 * sum(sizes) * 4 / 4096))
"""


def test_keeping_freed_memory_spares_the_page_faults_of_allocating_it_again():
    """glibc hands large freed blocks back to the kernel, so allocating them again faults on every page."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")

    def faults_per_page(mode: str) -> float:
        done = run(["-c", REALLOCATE, mode], timeout=120)
        assert done.returncode == 0, done.stderr
        return float(done.stdout.strip().splitlines()[-1])

    default, kept = faults_per_page("default"), faults_per_page("keep")
    print(f"minor faults per page allocated: default {default:.3f}, kept {kept:.3f}")
    if default < 0.15:  # huge pages always on, or another allocator preloaded: little to spare here
        pytest.skip(f"this process faults on only {default:.2f} of the pages it allocates again by default")
    assert kept < default / 2  # glibc 2.36: 0.23-0.49 by default, 0.05-0.06 kept
