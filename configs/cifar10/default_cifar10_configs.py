"""IHDM's CIFAR-10 configuration (values from the IHDM reference configs)."""

from configs.mnist import default_mnist_configs


def get_config():
    return get_default_configs()


def get_default_configs():
    config = default_mnist_configs.get_default_configs()
    config.training.sampling_freq = 10000
    config.training.snapshot_freq_for_preemption = 10000
    data = config.data
    data.dataset = "CIFAR10"
    data.image_size = 32
    data.num_channels = 3
    model = config.model
    model.K = 200
    model.blur_sigma_max = 24.0
    model.blur_sigma_min = 0.5
    model.model_channels = 128
    model.channel_mult = (1, 2, 2, 2)
    model.attention_levels = (2, 3)
    model.num_res_blocks = 4
    model.dropout = 0.1
    return config
