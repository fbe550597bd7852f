"""Train (or resume) a lintrans model.

    python train.py --config configs/mnist5k/default_mnist5k_configs.py --workdir runs/mnist5k/default \
        --config.model.forward=heat --config.training.n_iters=2000

The same command runs under ``torchrun --nproc_per_node=N``, ``mpirun -np N`` and ``srun``.
Exit codes: 0 done, 2 bad input, 3 non-finite loss, 75 preempted (checkpoint written, requeue).
"""

from absl import flags
from ml_collections import config_flags

from lintrans import cli
from lintrans.training_loop import run

config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, samples, tensorboard).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    return run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
