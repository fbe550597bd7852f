"""IHDM's MNIST configuration (values from the IHDM reference configs), plus lintrans keys."""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
    return get_default_configs()


def get_default_configs():
    config = ml_collections.ConfigDict()
    config.seed = 42
    config.device = "auto"  # auto (CUDA where available, else CPU), cpu, or cuda (fails if there is none)

    config.training = training = ml_collections.ConfigDict()
    training.batch_size = 128  # global batch, split over DDP ranks
    training.n_iters = 1300001
    training.snapshot_freq = 50000
    training.log_freq = 50
    training.eval_freq = 100
    training.sampling_freq = 1000
    training.snapshot_freq_for_preemption = 10000  # checkpoints-meta/checkpoint.pth
    training.num_samples = 36
    training.mixed_precision = (
        "auto"  # auto: bf16 where the device has it (CUDA, AVX512-BF16/AMX), else fp32; "no"; "bf16"
    )
    # torch.compile the network: auto (evaluations on CUDA, where it wins; training eager), on (both), off
    training.compile = "auto"

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.delta = placeholder(float)  # sampling noise; None means 1.25 * model.sigma
    # u_K's prior: "data" (IHDM: T(K) u_0' for a training image u_0') or "gaussian" (N(mu, Sigma + delta^2 I)
    # fitted to T(K) u_0 once, stored in the run directory: sampling then needs no data set)
    sampling.prior = "data"
    sampling.prior_rank = 256  # gaussian, where d^2 float64s exceed model.max_dense_bytes: top eigenpairs kept

    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.batch_size = 256
    evaluate.num_batches = 4  # held-out batches averaged for the periodic eval loss
    # sampling's and the evaluations' network calls: at most the samples whose peak memory fits this many
    # bytes at a time (measured on the device, lintrans.memory); 0: the whole batch at once
    evaluate.max_batch_bytes = 0

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "MNIST"
    data.path = ""  # default: data/<dataset>
    data.image_size = 28
    data.num_channels = 1
    data.random_flip = False
    data.uniform_dequantization = False
    data.num_workers = 0

    config.model = model = ml_collections.ConfigDict()
    model.forward = "heat"  # key of lintrans.forward.FORWARD_PROCESSES
    model.K = 100
    model.sigma = 0.01
    model.blur_sigma_max = 20.0
    model.blur_sigma_min = 0.5
    model.max_dense_bytes = 2**31  # refuse a forward process that would store more than this
    model.forward_seed = placeholder(int)  # random processes; None: config.seed
    model.product_step = 0.1  # random_rotation_product(_separable): rotation per factor
    # Stochastic processes draw a parameter theta per sample, independent of the image:
    model.blur_scale_min = 0.5  # heat_random_scale: blur widths scaled by theta ~ Uniform[min, max]
    model.blur_scale_max = 1.5
    model.num_choices = 3  # random_choice(_separable): theta ~ Uniform{0..M-1} picks one of M random map families
    model.condition_on_theta = False  # the U-Net also sees theta (embedded like the level); no effect if deterministic
    model.dropout = 0.1
    model.model_channels = 128
    model.channel_mult = (1, 2, 2)
    model.conv_resample = True
    model.num_heads = 1
    model.num_head_channels = -1
    model.attention_levels = (2,)
    model.ema_rate = 0.999
    model.num_res_blocks = 4
    model.use_scale_shift_norm = False
    # IHDM's configs set skip_rescale=True, but IHDM's U-Net never reads it: its ResBlocks return
    # skip(x) + h. lintrans builds that function; True divides each ResBlock's output by sqrt(2).
    model.rescale_resblocks = False

    config.logging = logging = ml_collections.ConfigDict()
    logging.backends = ("tensorboard",)  # experiment trackers, any of: tensorboard, mlflow, wandb
    logging.mlflow_uri = placeholder(str)  # None: a file store in the run directory (<workdir>/mlruns)

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = "Adam"
    optim.weight_decay = 0.0
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.warmup = 5000
    optim.grad_clip = 1.0
    return config
