"""Import a run trained by IHDM's own code into a lintrans run directory.

    lintrans import-ihdm RUN_DIR --config CONFIG --workdir NEW_RUN [--config.x.y=value ...]
    python -m lintrans.ihdm RUN_DIR --config CONFIG --workdir NEW_RUN [--checkpoint N] [--ihdm_config JSON]

RUN_DIR is an IHDM (or seed-fork) run directory; its ``checkpoints-meta/checkpoint.pth`` is read
(``--checkpoint N``: ``checkpoints/checkpoint_N.pth``) with ``weights_only=True`` and only numpy's
scalar/dtype globals allowed, so nothing in it can run code. CONFIG is a lintrans config file
describing the same model (forward process ``heat``, IHDM's K, sigma, blur sigmas and U-Net
shape). When an IHDM config exported as JSON is found (``--ihdm_config``, default
``RUN_DIR/ihdm_config.json``), its function-fixing keys must equal CONFIG's, or the import is
refused with one line; without one, only the network's tensor shapes are checked.

NEW_RUN (a new directory) gets ``config.json``, ``source.json`` and
``checkpoints-meta/checkpoint.pth`` with the raw weights, the EMA weights and update count, the
Adam moments (re-indexed to lintrans's parameter order) and IHDM's step. Then, as for any run:

    python sample.py --workdir NEW_RUN                        # EMA samples, IHDM's function exactly
    python evaluate.py --workdir NEW_RUN --mode=elbo ...
    python train.py --config CONFIG --workdir NEW_RUN --config.training.n_iters=N   # resumes at IHDM's step

IHDM keeps no RNG state or data position, so the resumed run draws lintrans's data order from
IHDM's step on. Exit codes: 0 imported, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags

from lintrans import cmdline
from lintrans import config as cfg
from lintrans.errors import UsageError

# IHDM config key -> lintrans config key, for everything that fixes what the network computes.
SAME_KEYS = {
    "model.K": "model.K",
    "model.sigma": "model.sigma",
    "model.blur_sigma_min": "model.blur_sigma_min",
    "model.blur_sigma_max": "model.blur_sigma_max",
    "model.model_channels": "model.model_channels",
    "model.channel_mult": "model.channel_mult",
    "model.num_res_blocks": "model.num_res_blocks",
    "model.attention_levels": "model.attention_levels",
    "model.num_heads": "model.num_heads",
    "model.num_head_channels": "model.num_head_channels",
    "model.use_scale_shift_norm": "model.use_scale_shift_norm",
    "model.conv_resample": "model.conv_resample",
    "data.image_size": "data.image_size",
    "data.num_channels": "data.num_channels",
    "optim.optimizer": "optim.optimizer",
}
# IHDM settings lintrans's U-Net does not build (value IHDM must have had).
IHDM_REQUIRED = {
    "model.resblock_updown": False,
    "model.use_fp16": False,
    "model.normalization": "GroupNorm",
    "model.nonlinearity": "swish",
    "model.conditional": True,
    "data.centered": False,
}
# lintrans settings an IHDM run implies (IHDM's ResBlocks return skip(x) + h, unscaled).
LINTRANS_REQUIRED = {"model.forward": "heat", "model.rescale_resblocks": False, "optim.optimizer": "Adam"}


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "New lintrans run directory to create.", flag_values=fv)
    flags.DEFINE_integer(
        "checkpoint", 0, "0 = RUN_DIR/checkpoints-meta/checkpoint.pth, N = RUN_DIR/checkpoints/checkpoint_N.pth",
        flag_values=fv,
    )  # fmt: skip
    flags.DEFINE_string(
        "ihdm_config", None, "IHDM's config as JSON (default: RUN_DIR/ihdm_config.json where it exists).",
        flag_values=fv,
    )  # fmt: skip


def _get(tree: dict | ml_collections.ConfigDict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    """Equal as IHDM and lintrans mean them: lists and tuples alike, 20 == 20.0."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def _flag(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def check_lintrans_config(config: ml_collections.ConfigDict) -> None:
    """CONFIG must describe what every IHDM run is: heat, unscaled ResBlocks, Adam."""
    for key, want in LINTRANS_REQUIRED.items():
        if not _same(_get(config, key), want):
            raise UsageError(
                f"config.{key}={_get(config, key)!r} cannot describe an IHDM run (IHDM: {want!r}); "
                f"pass --config.{key}={_flag(want)}"
            )


def load_ihdm_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read the IHDM config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"the IHDM config {path} is not a JSON object")
    return data


def check_ihdm_config(ihdm: dict, config: ml_collections.ConfigDict, where: Path) -> None:
    """Refuse, in one line, an IHDM config that differs from CONFIG where the function is fixed."""
    for key, want in IHDM_REQUIRED.items():
        try:
            got = _get(ihdm, key)
        except KeyError:
            continue
        if not _same(got, want):
            raise UsageError(f"the IHDM run ({where}) sets {key}={got!r}; lintrans's U-Net builds only {want!r}")
    differ = []
    for ihdm_key, key in SAME_KEYS.items():
        try:
            theirs = _get(ihdm, ihdm_key)
        except KeyError:
            continue  # older IHDM configs lack some keys; the tensor shapes are still checked
        if not _same(theirs, _get(config, key)):
            differ.append((key, theirs))
    if differ:
        shown = ", ".join(f"{key}={_get(config, key)!r} (IHDM: {theirs!r})" for key, theirs in differ)
        fix = " ".join(f"--config.{key}={_flag(theirs)}" for key, theirs in differ)
        raise UsageError(f"CONFIG disagrees with the IHDM run ({where}): {shown}; pass {fix}")


def legacy_attention(ihdm: dict | None) -> bool:
    """IHDM's ``use_new_attention_order=False`` orders qkv rows per head (IHDM's configs all say True)."""
    if ihdm is None:
        return False
    try:
        return not bool(_get(ihdm, "model.use_new_attention_order"))
    except KeyError:
        return False


def checkpoint_path(run_dir: Path, checkpoint: int) -> Path:
    if not run_dir.is_dir():
        raise UsageError(f"IHDM run directory not found: {run_dir}")
    if checkpoint < 0:
        raise UsageError(f"--checkpoint must be >= 0, got {checkpoint}")
    path = run_dir / "checkpoints-meta" / "checkpoint.pth" if checkpoint == 0 else (
        run_dir / "checkpoints" / f"checkpoint_{checkpoint}.pth")  # fmt: skip
    if not path.is_file():
        raise UsageError(f"IHDM checkpoint not found: {path} (RUN_DIR must hold IHDM's checkpoints-meta/)")
    return path


def run(argv: list[str]) -> int:
    """The command; raises :class:`UsageError` on bad input (see :func:`main`)."""
    fv = flags.FlagValues()
    define_flags(fv)
    args = cmdline.parse(argv, fv, config_required=True, required=("workdir",), positional=("RUN_DIR",), doc=__doc__)
    run_dir, config = Path(args.args[0]), args.config
    path = checkpoint_path(run_dir, fv.checkpoint)
    cfg.validate(config)
    check_lintrans_config(config)
    ihdm_json = Path(fv.ihdm_config) if fv.ihdm_config else run_dir / "ihdm_config.json"
    if fv.ihdm_config and not ihdm_json.is_file():
        raise UsageError(f"IHDM config not found: {ihdm_json}")
    ihdm_config = load_ihdm_config(ihdm_json) if ihdm_json.is_file() else None
    if ihdm_config is not None:
        check_ihdm_config(ihdm_config, config, ihdm_json)

    from lintrans.run import Run

    new = Run(Path(fv.workdir))
    if new.meta.is_file() or (new.workdir / "config.json").is_file():
        raise UsageError(f"--workdir {new.workdir} already holds a run; import into a new directory")

    from lintrans import ihdm_checkpoint
    from lintrans.model import build_model, load_weights, make_optimizer

    state = ihdm_checkpoint.load(path)
    model = build_model(cfg.model_args(config), config.seed)
    converted = ihdm_checkpoint.convert(state, model, path, legacy_attention=legacy_attention(ihdm_config))
    load_weights(model, converted.model, path)  # strict, again, through the loader training uses
    optimizer = make_optimizer(model.parameters(), **cfg.optim_args(config))
    optimizer.load_state_dict({"state": converted.optimizer_state, **_groups(optimizer)})
    checkpoint = {
        "model": model.state_dict(),
        "ema": converted.ema,
        "ema_num_updates": converted.ema_num_updates,
        "optimizer": optimizer.state_dict(),
        "step": converted.step,
        "epoch": None,  # IHDM keeps no data position: lintrans's data order resumes from the step
        "data_position": None,
        "world_size": 1,
        "rng": [],  # IHDM saves no RNG state; a resumed run seeds as a fresh one does
        "config": cfg.to_json(config),
        "imported_from": {"ihdm_checkpoint": str(path.resolve()), "ema_decay": converted.ema_decay},
    }
    new.check_writable()
    new.write_config(config, args.config_file, args.overrides)
    new.save(checkpoint)
    if ihdm_config is None:
        print(f"note: no IHDM config ({ihdm_json}); only the network's tensor shapes were checked against CONFIG, "
              "not K, sigma or the blur sigmas", file=sys.stderr)  # fmt: skip
    print(
        f"imported {path} (step {converted.step}, {len(converted.model)} tensors, EMA after "
        f"{converted.ema_num_updates} updates) -> {new.meta}"
    )
    return 0


def _groups(optimizer) -> dict:
    """lintrans's own parameter groups (CONFIG's betas, eps, weight decay; the lr is set every step)."""
    return {"param_groups": optimizer.state_dict()["param_groups"]}


def main(argv: list[str]) -> int:
    """``argv`` as ``sys.argv`` (program name first); returns the exit code, bad input as one line and 2."""
    return cmdline.entry(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
