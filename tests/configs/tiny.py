"""A tiny mnist5k model for fast tests: 8 channels, attention only in the 7x7 middle block."""

from configs.mnist5k import default_mnist5k_configs


def get_config():
    config = default_mnist5k_configs.get_config()
    config.training.batch_size = 8
    config.training.n_iters = 10
    config.training.log_freq = 5
    config.training.eval_freq = 1000
    config.training.sampling_freq = 0
    config.training.snapshot_freq = 1000
    config.training.snapshot_freq_for_preemption = 5
    config.eval.batch_size = 50
    config.eval.num_batches = 1
    model = config.model
    model.K = 5
    model.model_channels = 8
    model.channel_mult = (1, 1, 1)
    model.num_res_blocks = 1
    model.attention_levels = ()
    model.dropout = 0.0
    return config
