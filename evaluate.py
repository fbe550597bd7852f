"""Evaluate a lintrans checkpoint: FID or negative ELBO (flags as in the IHDM README).

    python evaluate.py --workdir runs/mnist5k/default --checkpoint 0 --mode=fid --num_gen=5000 \
        --experiment_name=experiment1 --param_name=default
    python evaluate.py --workdir runs/cifar10/default --dataset_name=cifar10 --experiment_name=experiment1 \
        --param_name=default --mode=fid --delta=0.013 --dataset_name_cleanfid=cifar10 --dataset_split=train \
        --batch_size=128 --num_gen=50000
    python evaluate.py --workdir ... --mode=elbo --delta=0.013 [--num_test=100 --num_train=1000]

The run directory says what the model is (its config.json); ``--config`` (with overrides) is
optional and, where given, must agree with it.

Custom clean-fid statistics (then evaluate with --dataset_name_cleanfid=NAME --dataset_split=custom):

    python evaluate.py --save_stats --custom_name=NAME --dataset_path=<image folder> [--cleanfid_mode=clean]

Compute nodes without internet: fetch clean-fid's Inception weights (and named statistics) first,

    python evaluate.py --prefetch [--prefetch_from=<local copy>] [--dataset_name_cleanfid=cifar10 --resolution=32]

Each evaluation writes ``<workdir>/records/<mode>-<experiment>-<param>-ckpt<N>.json`` and adds a
row to ``runs/<dataset_name>/evaluation_results/<experiment>/summary.{csv,md}`` (runs root:
``$LINTRANS_RUNS_DIR``); the run's trackers (``config.logging.backends``) get every metric of its
records as its final metrics. Exit codes: 0 done, 2 bad input (one line on stderr).
"""

import sys
import typing

from absl import flags

from lintrans import cmdline
from lintrans.errors import UsageError
from lintrans.eval_spec import EvalSpec, SpecError

DEFINE = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}
CLI_DEFAULTS = {"mode": "fid"}  # IHDM's evaluate.py evaluates FID unless told otherwise


def define_spec_flags(fv: flags.FlagValues) -> None:
    """One flag per :class:`EvalSpec` field, with its default and description."""
    for name, info in EvalSpec.fields().items():
        kinds = [t for t in typing.get_args(info.annotation) or (info.annotation,) if t is not type(None)]
        kind = typing.get_origin(kinds[0]) or kinds[0]
        if kind is typing.Annotated:
            kind = typing.get_args(kinds[0])[0]
        define = DEFINE.get(kind, flags.DEFINE_string)  # Literal choices are strings
        default = CLI_DEFAULTS.get(name, None if info.is_required() else info.default)
        define(name, default, info.description, flag_values=fv)


def spec_from_flags(fv: flags.FlagValues) -> EvalSpec:
    values = {name: fv[name].value for name in EvalSpec.fields() if fv[name].value is not None}
    try:
        return EvalSpec.parse(values)
    except SpecError as exc:
        raise UsageError(f"--{exc.field}={values.get(exc.field)!r}: {exc}") from None


def prefetch(fv: flags.FlagValues) -> None:
    from lintrans import fid

    print(f"Inception weights: {fid.prefetch_inception(fv.prefetch_from)}")
    if fv.dataset_name_cleanfid:
        if fv.resolution is None:
            raise UsageError("--prefetch with --dataset_name_cleanfid needs --resolution (the image size)")
        name, mode, split = fv.dataset_name_cleanfid, fv.cleanfid_mode, fv.dataset_split
        print(f"statistics: {fid.ensure_reference_stats(name, fv.resolution, mode, split)}")


def save_stats(fv: flags.FlagValues) -> None:
    import torch

    from lintrans import fid

    if not fv.custom_name or not fv.dataset_path:
        raise UsageError("--save_stats needs --custom_name and --dataset_path")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = fid.save_custom_stats(fv.custom_name, fv.dataset_path, fv.cleanfid_mode, device, fv.batch_size)
    print(f"custom statistics '{fv.custom_name}' ({fv.cleanfid_mode}): {path}")


def main(argv: list[str]) -> int:
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "Run directory holding the checkpoints.", flag_values=fv)
    define_spec_flags(fv)
    flags.DEFINE_bool("save_stats", False, "Compute custom Inception statistics of --dataset_path.", flag_values=fv)
    flags.DEFINE_string("custom_name", None, "Name of the custom statistics (--save_stats).", flag_values=fv)
    flags.DEFINE_string("dataset_path", None, "Image folder of the custom statistics (--save_stats).", flag_values=fv)
    flags.DEFINE_bool("prefetch", False, "Fetch clean-fid's Inception weights (and statistics).", flag_values=fv)
    flags.DEFINE_string("prefetch_from", None, "--prefetch: a local copy or URL of the weights.", flag_values=fv)
    flags.DEFINE_integer("resolution", None, "--prefetch: image size of the named statistics.", flag_values=fv)
    args = cmdline.parse(argv, fv, config_required=False, doc=__doc__)
    if fv.prefetch:
        return prefetch(fv)
    if fv.save_stats:
        return save_stats(fv)
    if fv.workdir is None:
        raise UsageError("--workdir is required (except with --prefetch or --save_stats)")
    spec = spec_from_flags(fv)
    from lintrans.evaluation import evaluate

    try:
        record = evaluate(fv.workdir, spec, config=args.config)
    except SpecError as exc:
        raise UsageError(f"--{exc.field}: {exc}") from None
    from lintrans import records, trackers

    run = record["run"]
    trackers.summarise(fv.workdir, run["overrides"], records.metrics(fv.workdir), run["steps"])
    metrics = ", ".join(f"{k}={v:.6g}" for k, v in record["metrics"].items())
    print(f"{metrics} (checkpoint {run['checkpoint']}, step {run['steps']}, {record['wall_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(cmdline.entry(main))
