"""Sample from a trained lintrans model (flags as in the IHDM README).

    python sample.py --config configs/mnist5k/default_mnist5k_configs.py \
        --workdir runs/mnist5k/default --checkpoint 0 --batch_size=9 [--same_init | --share_noise]
    python sample.py ... --interpolate --num_points=20

Writes ``samples.png`` (final grid), ``prior.png`` (u_K), ``process.gif`` (reverse process) and
``samples.npz`` into ``--outdir`` (default ``<workdir>/samples/sample_<mode>_ckpt<N>``).
"""

from pathlib import Path

import numpy as np
import torch
from absl import flags
from ml_collections import config_flags

from lintrans import checkpoint, cli, datasets, images, sampling
from lintrans.atomic import write_atomic
from lintrans.config import check_matches_run, sampling_delta, validate
from lintrans.errors import UsageError
from lintrans.forward import create_forward
from lintrans.training_loop import model_state

config_flags.DEFINE_config_file("config", None, "Configuration file of the run.", lock_config=False)
flags.DEFINE_string("workdir", None, "Run directory holding the checkpoints.")
flags.DEFINE_integer("checkpoint", 0, "0 = latest (checkpoints-meta), N = checkpoints/checkpoint_N.pth")
flags.DEFINE_integer("batch_size", 16, "Number of samples.")
flags.DEFINE_bool("same_init", False, "Share the prior state u_K, vary the sampling noise.")
flags.DEFINE_bool("share_noise", False, "Share the sampling noise, vary the prior state.")
flags.DEFINE_bool("interpolate", False, "Interpolate between two prior states (shared noise).")
flags.DEFINE_integer("num_points", 10, "Points on the interpolation path.")
flags.DEFINE_float("delta", None, "Sampling noise (default: config.sampling.delta or 1.25 sigma).")
flags.DEFINE_integer("seed", 0, "Seed of the prior images and the noise.")
flags.DEFINE_string("outdir", None, "Output folder.")
flags.DEFINE_bool("raw", False, "Use the raw weights instead of the EMA weights.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    config = FLAGS.config
    if FLAGS.delta is not None:
        config.sampling.delta = FLAGS.delta
    validate(config)
    check_matches_run(config, FLAGS.workdir)
    if sum([FLAGS.same_init, FLAGS.share_noise, FLAGS.interpolate]) > 1:
        raise UsageError("--same_init, --share_noise and --interpolate exclude each other; pick one")
    n = FLAGS.num_points if FLAGS.interpolate else FLAGS.batch_size
    if n < (2 if FLAGS.interpolate else 1):
        raise UsageError(f"need at least {2 if FLAGS.interpolate else 1} samples, got {n}")
    path = checkpoint.resolve(FLAGS.workdir, FLAGS.checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    process = create_forward(config).to(device)
    model = model_state(path, config, device, ema=not FLAGS.raw)
    train_set, _ = datasets.load(config)
    delta = sampling_delta(config)

    gen = torch.Generator(device=device).manual_seed(FLAGS.seed)
    pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(FLAGS.seed))
    draws = 2 if FLAGS.interpolate else (1 if FLAGS.same_init else n)
    x0 = datasets.batches(train_set, [pick[:draws]]).__next__().to(device)
    u_K = sampling.prior(process, x0, delta, gen)
    if FLAGS.interpolate:
        u_K = sampling.interpolate(u_K[0], u_K[1], n)
    elif FLAGS.same_init:
        u_K = u_K.expand(n, *u_K.shape[1:]).contiguous()
    share = FLAGS.share_noise or FLAGS.interpolate
    final, frames = sampling.reverse(model, u_K, process.K, delta, gen, share_noise=share, num_frames=50)

    mode = (
        "interpolate" if FLAGS.interpolate else "same_init" if FLAGS.same_init else "share_noise" if share else "random"
    )
    ckpt = FLAGS.checkpoint
    out = Path(FLAGS.outdir or Path(FLAGS.workdir) / "samples" / f"sample_{mode}_ckpt{ckpt}")
    nrow = n if FLAGS.interpolate else None
    images.save_grid(out / "samples.png", final.cpu(), nrow)
    images.save_grid(out / "prior.png", u_K.cpu(), nrow)
    images.save_gif(out / "process.gif", frames, nrow)
    arrays = {"samples": final.cpu().numpy(), "prior": u_K.cpu().numpy(), "trajectory": torch.stack(frames).numpy()}
    write_atomic(out / "samples.npz", lambda f: np.savez_compressed(f, **arrays))
    print(f"{mode}: {n} samples from {path} (delta={delta:g}) -> {out}")


if __name__ == "__main__":
    cli.run(main)
