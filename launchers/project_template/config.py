"""This project's config: lintrans's defaults for its embedded MNIST digits, made tiny (seconds per trial).

``lintrans run`` imports it with the sweep file's folder on ``sys.path``, so it imports this
project's modules by name; add folders in the sweep file's ``python_path:``.
"""

import my_processes  # noqa: F401 - registers "edge_decay" (config.model.forward)

from configs.mnist5k import default_mnist5k_configs


def get_config():
    config = default_mnist5k_configs.get_config()
    config.training.batch_size = 8
    config.training.log_freq = 5
    config.training.eval_freq = 10
    config.training.sampling_freq = 0
    config.training.snapshot_freq = 1000
    config.training.snapshot_freq_for_preemption = 10
    config.eval.batch_size = 50
    config.eval.num_batches = 1
    model = config.model
    model.K = 5
    model.model_channels = 8
    model.channel_mult = (1, 1, 1)
    model.num_res_blocks = 1
    model.attention_levels = ()
    return config
