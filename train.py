"""Train (or resume) a lintrans model.

    python train.py --config configs/mnist5k/default_mnist5k_configs.py --workdir runs/mnist5k/default \
        --config.model.forward=heat --config.training.n_iters=2000

The same command runs under ``torchrun --nproc_per_node=N``, ``mpirun -np N`` and ``srun``.
Exit codes: 0 done, 2 bad input, 3 non-finite loss, 75 preempted (checkpoint written, requeue).
"""

import sys

from absl import flags

from lintrans import cli


def parse(argv: list[str]) -> cli.Parsed:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, samples, tensorboard).", flag_values=fv)
    return cli.parse(argv, fv, config_required=True, required=("workdir",), doc=__doc__)


def main(argv: list[str]) -> int:
    args = parse(argv)
    from lintrans.training_loop import run_cli

    return run_cli(args.config, args.flags.workdir, args.config_file, args.overrides)


if __name__ == "__main__":
    sys.exit(cli.entry(main))
