"""A config that registers its own forward process without touching the package."""

import torch

from configs.mnist5k import default_mnist5k_configs
from lintrans.forward import ScalarProcess, register_forward


@register_forward("half_fade")
class HalfFade(ScalarProcess):
    """``T(k) = (1 - k / 2K) I``: fades to half intensity at K."""

    @staticmethod
    def coefficients(k: torch.Tensor, K: int) -> torch.Tensor:
        return 1.0 - k / (2 * K)


def get_config():
    config = default_mnist5k_configs.get_config()
    config.model.forward = "half_fade"
    config.model.K = 4
    config.model.model_channels = 8
    config.model.channel_mult = (1, 1, 1)
    config.model.num_res_blocks = 1
    config.model.attention_levels = ()
    config.training.batch_size = 8
    config.training.n_iters = 5
    config.training.sampling_freq = 0
    config.eval.num_batches = 1
    return config
