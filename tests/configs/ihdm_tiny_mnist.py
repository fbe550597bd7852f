"""The lintrans twin of /work/shared/ihdm_reference/ihdm_tiny_mnist_run (IHDM's MNIST config, tiny).

IHDM's default MNIST values with ``model_channels=32``, ``channel_mult=(1, 2)``,
``num_res_blocks=1``, ``attention_levels=(1,)``, ``K=10``, batch 8 and warm-up 1, as in that run's
``ihdm_config.json``; the embedded ``mnist5k`` digits stand in for MNIST (no download here).
"""

from configs.mnist import default_mnist_configs


def get_config():
    config = default_mnist_configs.get_default_configs()
    config.data.dataset = "mnist5k"
    t = config.training
    t.batch_size = 8
    t.n_iters = 5
    t.log_freq = 5
    t.eval_freq = 1000
    t.sampling_freq = 0
    t.snapshot_freq = 1000
    t.snapshot_freq_for_preemption = 5
    t.mixed_precision = "no"
    config.eval.batch_size = 50
    config.eval.num_batches = 1
    m = config.model
    m.K = 10
    m.model_channels = 32
    m.channel_mult = (1, 2)
    m.num_res_blocks = 1
    m.attention_levels = (1,)
    config.optim.warmup = 1
    return config
