"""Shared shape of the image-folder configs (LSUN church, FFHQ, AFHQ): IHDM's large-image settings."""

from configs.mnist import default_mnist_configs


def get_image_folder_config(dataset: str, path: str, size: int, channels: int, mult: tuple, attention: tuple):
    config = default_mnist_configs.get_default_configs()
    config.training.batch_size = 64
    config.training.sampling_freq = 10000
    data = config.data
    data.dataset = dataset
    data.path = path
    data.image_size = size
    data.num_channels = 3
    data.random_flip = True
    data.num_workers = 4
    model = config.model
    model.K = 200
    model.blur_sigma_max = float(size)
    model.blur_sigma_min = 0.5
    model.model_channels = channels
    model.channel_mult = mult
    model.attention_levels = attention
    model.num_res_blocks = 2
    model.dropout = 0.1
    return config
