"""Stochastic forward processes end to end: config switch, the U-Net's theta input, training randomness, sampling."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

from lintrans import config as cfg
from lintrans import sampling
from lintrans.errors import UsageError
from lintrans.loss import per_sample_loss
from lintrans.step import step_randomness
from lintrans.unet import UNet
from tests.configs import tiny
from tests.conftest import make_process

TINY_NET = {"in_channels": 1, "model_channels": 8, "channel_mult": (1, 1), "num_res_blocks": 1, "attention_levels": ()}


def config_for(forward: str, condition: bool):
    config = tiny.get_config()
    config.model.forward = forward
    config.model.condition_on_theta = condition
    return config


@pytest.mark.parametrize(
    "forward, condition, theta_dim",
    [("heat_random_scale", True, 1), ("heat_random_scale", False, 0), ("random_choice", True, 1), ("heat", True, 0)],
)
def test_condition_on_theta_sets_the_networks_theta_input(forward, condition, theta_dim):
    config = config_for(forward, condition)
    cfg.validate(config)
    assert cfg.model_args(config)["theta_dim"] == theta_dim


def test_condition_on_theta_is_validated_and_old_runs_read_it_as_false():
    values = json.loads(cfg.to_json(config_for("heat_random_scale", True)))
    values["model"]["condition_on_theta"] = "yes"  # a hand-edited config.json (the ConfigDict refuses a str)
    config = cfg.from_json(json.dumps(values))
    with pytest.raises(UsageError, match=r"config\.model\.condition_on_theta must be true or false, got 'yes'"):
        cfg.validate(config)
    old = tiny.get_config()
    del old.model["condition_on_theta"]  # a run directory written before the key existed
    assert cfg.model_args(old)["theta_dim"] == 0


def randomise(net: UNet) -> UNet:
    """Zero-initialised layers (every block starts as identity) get weights, so that theta can show."""
    with torch.no_grad():
        for param in net.parameters():
            if not param.any():
                param.normal_(std=0.1)
    return net


def test_unet_uses_theta_only_when_conditioned():
    torch.manual_seed(0)
    conditioned = randomise(UNet(**TINY_NET, theta_dim=1)).eval()
    x, k = torch.randn(2, 1, 8, 8), torch.tensor([3, 3])
    same_x = x[:1].expand(2, -1, -1, -1)
    out = conditioned(same_x, k, torch.tensor([[0.5], [1.5]]))
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(UsageError, match="conditioned on theta"):
        conditioned(x, k, None)

    plain = randomise(UNet(**TINY_NET)).eval()
    assert not any(key.startswith("theta_mlp") for key in plain.state_dict())  # old checkpoints load strictly
    torch.testing.assert_close(plain(x, k, torch.tensor([[0.5], [1.5]])), plain(x, k, None))


def test_step_randomness_draws_theta_last_for_the_global_batch():
    process = make_process("random_choice", (1, 6, 6), K=5)
    args = (7, 11, 8, (1, 6, 6), 5, True, True)
    plain, drawn = step_randomness(*args), step_randomness(*args, process.sample_theta)
    assert "theta" not in plain and "theta" not in step_randomness(*args, make_process("heat").sample_theta)
    for key, value in plain.items():
        assert torch.equal(drawn[key], value), key  # theta does not shift the other draws
    assert drawn["theta"].shape == (8, 1)
    assert torch.equal(drawn["theta"], step_randomness(*args, process.sample_theta)["theta"])


class SpyModel(nn.Module):
    """Zero residual; records the theta of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.thetas: list[Tensor | None] = []

    def forward(self, u: Tensor, k: Tensor, theta: Tensor | None = None) -> Tensor:
        self.thetas.append(theta)
        return torch.zeros_like(u)


@pytest.mark.parametrize("name", ["heat_random_scale", "random_choice_separable"])
def test_two_ranks_at_batch_b_equal_one_rank_at_2b(name):
    """Each sample's loss depends only on its own row of the global draws, theta included."""
    process = make_process(name, (1, 6, 6), K=5)
    rnd = step_randomness(3, 0, 8, (1, 6, 6), 5, False, False, process.sample_theta)
    x0 = torch.rand(8, 1, 6, 6)
    model = randomise(UNet(**{**TINY_NET, "in_channels": 1}, theta_dim=1)).eval()

    def loss(rows: slice) -> Tensor:
        return per_sample_loss(model, process, x0[rows], rnd["k"][rows], rnd["noise"][rows], 0.01, rnd["theta"][rows])

    with torch.no_grad():
        torch.testing.assert_close(torch.cat([loss(slice(0, 4)), loss(slice(4, 8))]), loss(slice(0, 8)))


def test_sampling_uses_the_priors_theta_on_the_whole_reverse_path():
    process = make_process("heat_random_scale", (1, 6, 6), K=4)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 6, 6)
    theta = sampling.draw_theta(process, 3, gen)
    u_K = sampling.prior(process, x0, 0.0, gen, theta)
    torch.testing.assert_close(u_K, process(x0, torch.full((3,), 4), theta))
    model = SpyModel()
    sampling.reverse(model, u_K, process.K, 0.01, gen, theta=theta)
    assert len(model.thetas) == 4 and all(t is theta for t in model.thetas)
    shared = sampling.draw_theta(process, 5, gen, share=True)
    assert shared.shape == (5, 1) and bool((shared == shared[0]).all())
    assert sampling.draw_theta(make_process("heat"), 5, gen) is None
