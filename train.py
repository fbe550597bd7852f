"""Train (or resume) a lintrans model.

    python train.py --config configs/mnist5k/default_mnist5k_configs.py --workdir runs/mnist5k/default \
        --config.model.forward=heat --config.training.n_iters=2000
    python train.py --workdir runs/mnist5k/default      # resume, as the run was configured

A run directory carries its config: resuming needs no ``--config``; where one is given, it must
agree with the run on the model and the data (training lengths and frequencies may change).

The same command runs under ``torchrun --nproc_per_node=N``, ``mpirun -np N`` and ``srun``.
Exit codes: 0 done, 2 bad input, 3 non-finite loss, 75 preempted (checkpoint written, requeue).
"""

import sys

from absl import flags

from lintrans import cmdline


def parse(argv: list[str]) -> cmdline.Parsed:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, samples, tensorboard).", flag_values=fv)
    args = cmdline.parse(argv, fv, config_required=False, required=("workdir",), doc=__doc__)
    if args.config is None:  # resume: the run directory says what it is
        from lintrans.errors import UsageError
        from lintrans.run import CONFIG, Run

        run = Run(fv.workdir)
        if not (run.workdir / CONFIG).is_file():
            raise UsageError(f"--config is required to start a run (--workdir {fv.workdir} holds no {CONFIG})")
        source = run.source()
        args.config, args.overrides = run.config(), source.get("overrides", {})
        args.config_file = source.get("config_file", str(run.workdir / CONFIG))
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    from lintrans.training_loop import run_cli

    return run_cli(args.config, args.flags.workdir, args.config_file, args.overrides)


if __name__ == "__main__":
    sys.exit(cmdline.entry(main))
