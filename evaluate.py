"""Evaluate a lintrans checkpoint: FID or negative ELBO (flags as in the IHDM README).

    python evaluate.py --config configs/mnist5k/default_mnist5k_configs.py --workdir runs/mnist5k/default \
        --checkpoint 0 --mode=fid --num_gen=5000 --experiment_name=experiment1 --param_name=default
    python evaluate.py --config configs/cifar10/default_cifar10_configs.py --workdir runs/cifar10/default \
        --dataset_name=cifar10 --experiment_name=experiment1 --param_name=default --mode=fid \
        --delta=0.013 --dataset_name_cleanfid=cifar10 --dataset_split=train --batch_size=128 --num_gen=50000
    python evaluate.py ... --mode=elbo --delta=0.013 [--num_test=100 --num_train=1000]

Custom clean-fid statistics (then evaluate with --dataset_name_cleanfid=NAME --dataset_split=custom):

    python evaluate.py --save_stats --custom_name=NAME --dataset_path=<image folder> [--cleanfid_mode=clean]

Compute nodes without internet: fetch clean-fid's Inception weights (and named statistics) first,

    python evaluate.py --prefetch [--prefetch_from=<local copy>] [--config=... --dataset_name_cleanfid=cifar10]

Each evaluation writes ``<workdir>/records/<mode>-<experiment>-<param>-ckpt<N>.json`` and adds a
row to ``runs/<dataset_name>/evaluation_results/<experiment>/summary.{csv,md}`` (runs root:
``$LINTRANS_RUNS_DIR``). Exit codes: 0 done, 2 bad input (one line on stderr).
"""

from absl import flags
from ml_collections import config_flags

from lintrans import cli
from lintrans.errors import UsageError

config_flags.DEFINE_config_file("config", None, "Configuration file of the run.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory holding the checkpoints.")
flags.DEFINE_integer("checkpoint", 0, "0 = latest (checkpoints-meta), N = checkpoints/checkpoint_N.pth")
flags.DEFINE_string("mode", "fid", "fid or elbo.")
flags.DEFINE_string("metric", "auto", "FID flavour: auto, fid_inception or fid_mnist_features.")
flags.DEFINE_float("delta", None, "Sampling noise (default: config.sampling.delta or 1.25 sigma).")
flags.DEFINE_integer("batch_size", 256, "Batch size of sample generation and of the ELBO.")
flags.DEFINE_integer("num_gen", 5000, "Number of samples generated for FID.")
flags.DEFINE_integer("num_train", None, "ELBO: training images in the prior term (default: all).")
flags.DEFINE_integer("num_test", None, "ELBO: test images evaluated (default: all).")
flags.DEFINE_integer("seed", 0, "Seed of the prior images, the sampling noise and the ELBO subsets.")
flags.DEFINE_string("dataset_name", None, "Results go to runs/<dataset_name>/ (default: config.data.dataset).")
flags.DEFINE_string("experiment_name", "default", "A suite of evaluations, e.g. a sweep over delta.")
flags.DEFINE_string("param_name", "default", "What makes this evaluation different within the experiment.")
flags.DEFINE_string("dataset_name_cleanfid", None, "Reference statistics, clean-fid naming (fid_inception).")
flags.DEFINE_string("dataset_split", "train", "clean-fid split of the statistics; 'custom' for --save_stats ones.")
flags.DEFINE_string("cleanfid_mode", "clean", "clean or legacy_tensorflow.")
flags.DEFINE_bool("save_stats", False, "Compute custom Inception statistics of --dataset_path as --custom_name.")
flags.DEFINE_string("custom_name", None, "Name of the custom statistics (--save_stats).")
flags.DEFINE_string("dataset_path", None, "Image folder of the custom statistics (--save_stats).")
flags.DEFINE_bool("prefetch", False, "Fetch clean-fid's Inception weights (and --dataset_name_cleanfid statistics).")
flags.DEFINE_string("prefetch_from", None, "--prefetch: a local copy or URL of the weights (default: clean-fid's URL).")
FLAGS = flags.FLAGS


def prefetch() -> None:
    from lintrans import fid

    if FLAGS.dataset_name_cleanfid and FLAGS.config is None:
        raise UsageError("--prefetch with --dataset_name_cleanfid needs --config (for the image size)")
    print(f"Inception weights: {fid.prefetch_inception(FLAGS.prefetch_from)}")
    if FLAGS.dataset_name_cleanfid:
        res = int(FLAGS.config.data.image_size)
        name, mode, split = FLAGS.dataset_name_cleanfid, FLAGS.cleanfid_mode, FLAGS.dataset_split
        print(f"statistics: {fid.ensure_reference_stats(name, res, mode, split)}")


def save_stats() -> None:
    import torch

    from lintrans import fid

    if not FLAGS.custom_name or not FLAGS.dataset_path:
        raise UsageError("--save_stats needs --custom_name and --dataset_path")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = fid.save_custom_stats(FLAGS.custom_name, FLAGS.dataset_path, FLAGS.cleanfid_mode, device, FLAGS.batch_size)
    print(f"custom statistics '{FLAGS.custom_name}' ({FLAGS.cleanfid_mode}): {path}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {argv[1:]}; flags look like --name=value")
    if FLAGS.prefetch:
        return prefetch()
    if FLAGS.save_stats:
        return save_stats()
    if FLAGS.config is None or FLAGS.workdir is None:
        raise UsageError("--config and --workdir are required (except with --prefetch or --save_stats)")
    from lintrans.evaluation import evaluate

    record = evaluate(
        FLAGS.config,
        FLAGS.workdir,
        mode=FLAGS.mode,
        checkpoint=FLAGS.checkpoint,
        delta=FLAGS.delta,
        batch_size=FLAGS.batch_size,
        num_gen=FLAGS.num_gen,
        experiment_name=FLAGS.experiment_name,
        param_name=FLAGS.param_name,
        dataset_name=FLAGS.dataset_name,
        dataset_name_cleanfid=FLAGS.dataset_name_cleanfid,
        dataset_split=FLAGS.dataset_split,
        cleanfid_mode=FLAGS.cleanfid_mode,
        metric=FLAGS.metric,
        overrides=config_flags.get_override_values(FLAGS["config"]),
        num_train=FLAGS.num_train,
        num_test=FLAGS.num_test,
        seed=FLAGS.seed,
    )
    metrics = ", ".join(f"{k}={v:.6g}" for k, v in record["metrics"].items())
    run = record["run"]
    print(f"{metrics} (checkpoint {run['checkpoint']}, step {run['steps']}, {record['wall_s']:.1f} s)")


if __name__ == "__main__":
    cli.run(main)
