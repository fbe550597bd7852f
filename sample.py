"""Sample from a trained lintrans model (flags as in the IHDM README).

    python sample.py --workdir runs/mnist5k/default --checkpoint 0 --batch_size=9 [--same_init | --share_noise]
    python sample.py --workdir runs/mnist5k/default --interpolate --num_points=20

The network is rebuilt from the run directory's own config (``--config``, if given, must agree).
The prior is the run's ``config.sampling.prior``: a ``gaussian`` run reads its stored fit and no data set.
The network runs in the run's ``training.mixed_precision`` (bf16 autocast where the device has it, under
``auto``) unless ``--precision`` says otherwise; the reverse process itself stays fp32.
Writes ``samples.png`` (final grid), ``prior.png`` (u_K), ``process.gif`` (reverse process) and
``samples.npz`` into ``--outdir`` (default ``<workdir>/samples/sample_<mode>_ckpt<N>``).
"""

import sys
from pathlib import Path

from absl import flags

from lintrans import cmdline
from lintrans.errors import UsageError


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "Run directory holding the checkpoints.", flag_values=fv)
    flags.DEFINE_integer(
        "checkpoint", 0, "0 = latest (checkpoints-meta), N = checkpoints/checkpoint_N.pth", flag_values=fv
    )
    flags.DEFINE_integer("batch_size", 16, "Number of samples.", flag_values=fv)
    flags.DEFINE_bool("same_init", False, "Share the prior state u_K, vary the sampling noise.", flag_values=fv)
    flags.DEFINE_bool("share_noise", False, "Share the sampling noise, vary the prior state.", flag_values=fv)
    flags.DEFINE_bool("interpolate", False, "Interpolate between two prior states (shared noise).", flag_values=fv)
    flags.DEFINE_integer("num_points", 10, "Points on the interpolation path.", flag_values=fv)
    flags.DEFINE_float(
        "delta", None, "Sampling noise (default: the run's sampling.delta or 1.25 sigma).", flag_values=fv
    )
    flags.DEFINE_integer("seed", 0, "Seed of the prior images and the noise.", flag_values=fv)
    flags.DEFINE_string("outdir", None, "Output folder.", flag_values=fv)
    flags.DEFINE_bool("raw", False, "Use the raw weights instead of the EMA weights.", flag_values=fv)
    flags.DEFINE_integer(
        "max_batch_bytes", None,
        "Peak memory of one network call in bytes (default: the run's eval.max_batch_bytes; 0: no limit).",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_enum(
        "precision", "train", ["train", "auto", "no", "bf16"],
        "The network's precision: train (the run's training.mixed_precision), auto, no (fp32) or bf16.",
        flag_values=fv,
    )  # fmt: skip


def main(argv: list[str]) -> int:
    fv = flags.FlagValues()
    define_flags(fv)
    args = cmdline.parse(argv, fv, config_required=False, required=("workdir",), doc=__doc__)
    if sum([fv.same_init, fv.share_noise, fv.interpolate]) > 1:
        raise UsageError("--same_init, --share_noise and --interpolate exclude each other; pick one")
    n = fv.num_points if fv.interpolate else fv.batch_size
    if n < (2 if fv.interpolate else 1):
        raise UsageError(f"need at least {2 if fv.interpolate else 1} samples, got {n}")
    if fv.delta is not None and not 0 <= fv.delta < float("inf"):
        raise UsageError(f"--delta must be a finite number >= 0, got {fv.delta}")
    if fv.max_batch_bytes is not None and fv.max_batch_bytes < 0:
        raise UsageError(f"--max_batch_bytes must be an integer >= 0 (0: no limit), got {fv.max_batch_bytes}")

    import numpy as np
    import torch

    from lintrans import datasets, images, sampling
    from lintrans.atomic import write_atomic
    from lintrans.config import max_batch_bytes, sampling_delta
    from lintrans.device import inference_network, precision_name, use_bf16_for_run
    from lintrans.run import Run, load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(fv.workdir, fv.checkpoint, device, ema=not fv.raw, config=args.config)
    process = loaded.process
    bf16 = use_bf16_for_run(fv.precision, loaded.config.training.mixed_precision, device)
    fit = Run(fv.workdir).configured_prior(loaded.config)
    train_set = None if fit is not None else datasets.load(loaded.config)[0]  # a Gaussian prior needs no data
    delta = sampling_delta(loaded.config) if fv.delta is None else fv.delta
    prior = sampling.prior_for(process, delta, device, fit=fit, train_set=train_set, seed=fv.seed)

    gen = torch.Generator(device=device).manual_seed(fv.seed)
    draws = 2 if fv.interpolate else (1 if fv.same_init else n)
    # A stochastic process: one theta per sample, shared along an interpolation path and by a shared u_K.
    theta = sampling.draw_theta(process, n, gen, share=fv.interpolate or fv.same_init)
    u_K = prior.draw(draws, gen, None if theta is None else theta[:draws])
    if fv.interpolate:
        u_K = sampling.interpolate(u_K[0], u_K[1], n)
    elif fv.same_init:
        u_K = u_K.expand(n, *u_K.shape[1:]).contiguous()
    share = fv.share_noise or fv.interpolate
    budget = max_batch_bytes(loaded.config) if fv.max_batch_bytes is None else fv.max_batch_bytes
    net = inference_network(loaded.model, bf16, device, max_bytes=budget, process=process)
    final, frames = sampling.reverse(net, u_K, process.K, delta, gen, share_noise=share, num_frames=50, theta=theta)

    mode = "interpolate" if fv.interpolate else "same_init" if fv.same_init else "share_noise" if share else "random"
    out = Path(fv.outdir or Path(fv.workdir) / "samples" / f"sample_{mode}_ckpt{fv.checkpoint}")
    nrow = n if fv.interpolate else None
    images.save_grid(out / "samples.png", final.cpu(), nrow)
    images.save_grid(out / "prior.png", u_K.cpu(), nrow)
    images.save_gif(out / "process.gif", frames, nrow)
    arrays = {"samples": final.cpu().numpy(), "prior": u_K.cpu().numpy(), "trajectory": torch.stack(frames).numpy()}
    write_atomic(out / "samples.npz", lambda f: np.savez_compressed(f, **arrays))
    print(f"{mode}: {n} samples from {loaded.path} (delta={delta:g}, {precision_name(bf16)}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cmdline.entry(main))
