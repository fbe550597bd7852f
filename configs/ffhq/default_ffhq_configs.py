"""FFHQ from an image folder (config.data.path), resized and centre-cropped to 128x128."""

from configs.mnist import default_mnist_configs


def get_config():
    config = default_mnist_configs.get_default_configs()
    config.training.batch_size = 64
    config.training.sampling_freq = 10000
    data = config.data
    data.dataset = "FFHQ"
    data.path = "data/ffhq"
    data.image_size = 128
    data.num_channels = 3
    data.random_flip = True
    data.num_workers = 4
    model = config.model
    model.K = 200
    model.blur_sigma_max = float(128)
    model.blur_sigma_min = 0.5
    model.model_channels = 128
    model.channel_mult = (1, 2, 3, 4, 5)
    model.attention_levels = (3, 4, 5)
    model.num_res_blocks = 2
    model.dropout = 0.1
    return config
