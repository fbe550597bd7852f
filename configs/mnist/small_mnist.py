"""IHDM's small MNIST model: 64 channels, mult (1, 1, 1), K = 50."""

from configs.mnist import default_mnist_configs


def get_config():
    config = default_mnist_configs.get_default_configs()
    model = config.model
    model.blur_sigma_max = 20.0
    model.blur_sigma_min = 0.5
    model.model_channels = 64
    model.channel_mult = (1, 1, 1)
    model.K = 50
    config.training.snapshot_freq_for_preemption = 100
    config.training.sampling_freq = 1000
    return config
