"""Evaluate a checkpoint (FID or negative ELBO) and record the result.

:func:`evaluate` is what ``evaluate.py`` runs and what the sweep launcher calls in-process after
training: it checks every input before the expensive part (a bad flag after an hour of sampling
helps nobody), evaluates the EMA weights on the run's device, writes the record into the run
directory and into the seed's ``runs/<dataset>/evaluation_results/<experiment>/`` folder
(:mod:`lintrans.records`), and returns it.

``metric="auto"`` picks ``fid_mnist_features`` for mnist5k (offline, the project's digit
features) unless clean-fid reference statistics are named with ``dataset_name_cleanfid``, and
``fid_inception`` otherwise.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from lintrans import checkpoint as ckpt
from lintrans import datasets, records, sampling
from lintrans.config import check_matches_run, sampling_delta, to_json, validate
from lintrans.errors import UsageError, choices
from lintrans.forward import ForwardProcess, create_forward
from lintrans.training_loop import model_state

MODES = ("elbo", "fid")
METRIC_CHOICES = ("auto", "fid_inception", "fid_mnist_features")


def resolve_metric(metric: str, dataset: str, dataset_name_cleanfid: str | None) -> str:
    if metric not in METRIC_CHOICES:
        raise UsageError(f"unknown --metric '{metric}'; valid: {choices(METRIC_CHOICES)}")
    if metric != "auto":
        return metric
    return "fid_mnist_features" if dataset == "mnist5k" and not dataset_name_cleanfid else "fid_inception"


def subset(dataset, n: int | None, seed: int) -> Tensor:
    """All images of ``dataset`` as one float tensor, or ``n`` of them drawn without replacement by ``seed``."""
    idx = torch.arange(len(dataset))
    if n is not None and n < len(dataset):
        idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return dataset.batch(idx)


def sample_producer(model, process: ForwardProcess, train_set, delta: float, seed: int, device: torch.device):
    """``produce(n)``: ``n`` samples of the reverse process from IHDM's prior over training images."""
    gen = torch.Generator(device=device).manual_seed(seed)
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
    position = 0

    def produce(n: int) -> Tensor:
        nonlocal position
        idx = order[(position + torch.arange(n)) % len(order)]
        position += n
        u_K = sampling.prior(process, train_set.batch(idx).to(device), delta, gen)
        final, _ = sampling.reverse(model, u_K, process.K, delta, gen)
        return final

    return produce


def run_fid(
    model, process, train_set, test_set, *, metric, delta, num_gen, batch_size, seed, device, reference
) -> tuple[dict, dict]:
    from lintrans import fid

    produce = sample_producer(model, process, train_set, delta, seed, device)
    stream = fid.BatchStream(produce, num_gen, batch_size, desc="generate")
    mode = reference["cleanfid_mode"]
    if metric == "fid_mnist_features":
        score = fid.fid_mnist_features(stream, test_set.images, num_gen, batch_size, device, mode)
        info = fid.features_info()
        breakdown = {"feature_extractor": {k: info[k] for k in ("held_out_accuracy", "feature_dim", "sha256")}}
    else:
        name, res, split = (reference[k] for k in ("dataset_name_cleanfid", "resolution", "dataset_split"))
        score = fid.fid_inception(stream, name, res, split, num_gen, batch_size, device, mode)
        breakdown = {"statistics": str(fid.stats_file(name, res, mode, split)), "weights": str(fid.inception_file())}
    return {metric: score}, {"num_gen": num_gen, **breakdown}


def run_elbo(
    model, process, train_set, test_set, *, config, delta, batch_size, num_train, num_test, seed, device
) -> tuple[dict, dict]:
    from lintrans.elbo import negative_elbo

    train_x0 = subset(train_set, num_train, seed)
    test_x0 = subset(test_set, num_test, seed + 1)
    result = negative_elbo(
        model,
        process,
        train_x0,
        test_x0,
        sigma=float(config.model.sigma),
        delta=delta,
        batch_size=batch_size,
        device=device,
        generator=torch.Generator().manual_seed(seed),
        progress=True,
    )
    return {"nll_bpd": result["bpd"], "nll_nats": result["nll_nats"]}, result


def _check_fid_reference(metric, config, dataset_name_cleanfid, dataset_split, cleanfid_mode, num_gen, batch_size):
    """Fail on bad FID input now, before a model is loaded or a sample generated; returns the reference."""
    from lintrans import fid

    fid.check_fid_args(num_gen, batch_size, cleanfid_mode)
    if metric == "fid_mnist_features":
        if config.data.dataset != "mnist5k":
            raise UsageError(
                f"fid_mnist_features is defined for the mnist5k data set only, not {config.data.dataset}; "
                "use --metric=fid_inception"
            )
        if dataset_name_cleanfid:
            raise UsageError("--dataset_name_cleanfid names Inception statistics; it needs --metric=fid_inception")
        fid.require_file(fid.FEATURES_FILE, "digit feature weights", fid.FEATURES_HINT)
        return {"reference": "mnist5k held-out digits", "cleanfid_mode": cleanfid_mode}
    if not dataset_name_cleanfid:
        raise UsageError(
            "fid_inception needs reference statistics: --dataset_name_cleanfid=<clean-fid name> with "
            "--dataset_split=train|test, or custom ones (--save_stats first, then --dataset_split=custom)"
        )
    resolution = int(config.data.image_size)
    fid.ensure_reference_stats(dataset_name_cleanfid, resolution, cleanfid_mode, dataset_split)
    fid.require_file(fid.inception_file(), "Inception weights", fid.PREFETCH_HINT)
    return {
        "dataset_name_cleanfid": dataset_name_cleanfid,
        "dataset_split": dataset_split,
        "resolution": resolution,
        "cleanfid_mode": cleanfid_mode,
    }


def evaluate(
    config,
    workdir: str | Path,
    *,
    mode: str,
    checkpoint: int = 0,
    delta: float | None = None,
    batch_size: int = 256,
    num_gen: int = 5000,
    experiment_name: str = "default",
    param_name: str = "default",
    dataset_name: str | None = None,
    dataset_name_cleanfid: str | None = None,
    dataset_split: str = "train",
    cleanfid_mode: str = "clean",
    metric: str = "auto",
    overrides: dict | None = None,
    num_train: int | None = None,
    num_test: int | None = None,
    seed: int = 0,
) -> dict:
    """Evaluate checkpoint ``checkpoint`` (0 = latest) of the run in ``workdir``; returns the record written.

    ``num_train``/``num_test`` limit the images the ELBO uses (seeded subsets, recorded), ``seed``
    fixes the prior images and the sampling noise; everything else follows the seed's flags.
    """
    start = time.perf_counter()
    if mode not in MODES:
        raise UsageError(f"unknown --mode '{mode}'; valid: {choices(MODES)}")
    records.check_name(experiment_name, "--experiment_name")
    records.check_name(param_name, "--param_name")
    dataset_name = records.check_name(dataset_name or config.data.dataset, "--dataset_name")
    validate(config)
    check_matches_run(config, workdir)
    if batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {batch_size}")
    for flag, n in (("--num_train", num_train), ("--num_test", num_test)):
        if n is not None and n < 1:
            raise UsageError(f"{flag} must be at least 1, got {n}")
    delta = sampling_delta(config) if delta is None else float(delta)
    if not math.isfinite(delta) or delta < 0:
        raise UsageError(f"--delta must be a finite number >= 0, got {delta}")
    path = ckpt.resolve(workdir, checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    process = create_forward(config).to(device)
    reference = {}
    if mode == "fid":
        metric = resolve_metric(metric, config.data.dataset, dataset_name_cleanfid)
        reference = _check_fid_reference(
            metric, config, dataset_name_cleanfid, dataset_split, cleanfid_mode, num_gen, batch_size
        )
    train_set, test_set = datasets.load(config)
    steps = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    model = model_state(path, config, device)

    if mode == "fid":
        metrics, breakdown = run_fid(
            model,
            process,
            train_set,
            test_set,
            metric=metric,
            delta=delta,
            num_gen=num_gen,
            batch_size=batch_size,
            seed=seed,
            device=device,
            reference=reference,
        )
        evaluation = {"metric": metric, "num_gen": num_gen, **reference}
    else:
        metrics, breakdown = run_elbo(
            model,
            process,
            train_set,
            test_set,
            config=config,
            delta=delta,
            batch_size=batch_size,
            num_train=num_train,
            num_test=num_test,
            seed=seed,
            device=device,
        )
        evaluation = {"metric": "nll_bpd", "num_train": breakdown["num_train"], "num_test": breakdown["num_test"]}

    record = {
        "mode": mode,
        "experiment": experiment_name,
        "param": param_name,
        "dataset_name": dataset_name,
        "run": run_identity(config, workdir, path, checkpoint, steps, delta, overrides),
        "evaluation": {**evaluation, "batch_size": batch_size, "seed": seed},
        "metrics": metrics,
        "breakdown": breakdown,
        "wall_s": round(time.perf_counter() - start, 3),
        **records.environment(_device_name(device)),
    }
    records.write_record(workdir, record)
    records.publish(record, dataset_name)
    return record


def run_identity(config, workdir, path: Path, checkpoint: int, steps: int, delta: float, overrides) -> dict:
    """Everything that tells this run from another one in a table of results."""
    return {
        "workdir": str(Path(workdir).resolve()),
        "dataset": config.data.dataset,
        "forward": config.model.get("forward", "heat"),
        "K": int(config.model.K),
        "sigma": float(config.model.sigma),
        "delta": delta,
        "seed": int(config.seed),
        "steps": steps,
        "checkpoint": checkpoint,
        "checkpoint_path": str(path.resolve()),
        "overrides": dict(overrides or {}),
        "config": json.loads(to_json(config)),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(device)
