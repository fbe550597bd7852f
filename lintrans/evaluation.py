"""Evaluate a checkpoint (FID or negative ELBO) and record the result.

:func:`evaluate` takes an :class:`~lintrans.eval_spec.EvalSpec`, rebuilds the model from the run
directory alone, checks every input before the expensive part (a bad flag after an hour of
sampling helps nobody), evaluates the EMA weights, writes the record into the run directory and
into IHDM's ``runs/<dataset>/evaluation_results/<experiment>/`` folder
(:mod:`lintrans.records`), and returns it.

Samples come from the evaluation's ``prior``, by default the run's ``config.sampling.prior``: IHDM's
mixture over the training images, or the run's stored Gaussian fit (no data set needed to generate).
``prior=gaussian`` on a ``data`` run fits the Gaussian here, so one checkpoint gives FID under both
priors; metrics under another prior than the run's are named ``<metric>_<prior>_prior``. The ELBO
record holds both priors' ``L_K`` and their gap, and what ``T(K)`` leaves of the data
(:func:`lintrans.gaussian_prior.limit_summary`, from the stored fit, or for a ``data`` run one fitted
here the same way): breakdown terms, so ``elbo.limit_rank_99`` and the like are table columns outside
the brief view.

The network runs in the evaluation's ``precision``: by default FID's samples in the run's
``training.mixed_precision`` (bf16 autocast where the device has it) and the ELBO in fp32 (a bf16
network moved the bound by up to 0.01 bpd on mnist5k models, ``bench/elbo_precision.py`` and README;
``precision=bf16`` asks for it anyway). It is compiled where the run's ``training.compile`` says so
(``auto``: on CUDA). The reverse process, the squared errors and the bound's sums stay fp32/fp64.
The record's ``evaluation`` says which precision, compilation and prior produced it.

``metric="auto"`` picks ``fid_mnist_features`` for mnist5k (offline, the project's digit
features) unless clean-fid reference statistics are named with ``dataset_name_cleanfid``, and
``fid_inception`` otherwise.

Every FID evaluation also measures memorisation (:mod:`lintrans.memorisation`) on the first
``memorisation_samples`` of the samples the FID generated: each sample's distance to its nearest
training image in pixel space (``[0, 1]`` values, all channels) and in the FID's feature space,
and the share of samples whose nearest / second-nearest distance ratio is below 1/3 (in pixel
space, the literature's test). The metrics hold ``memorised_fraction``, ``nn_distance_pixel`` and
``nn_distance_feature`` (means), so they become table columns; the breakdown holds both spaces'
figures. The whole training set is compared with, streamed in chunks through the same feature
extractor: for ``fid_inception`` one Inception pass over the training set, made by the first
evaluation and read back by the others from :mod:`lintrans.feature_cache`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections
import torch
from torch import Tensor

from lintrans import datasets, records, sampling
from lintrans.config import max_batch_bytes, prior_fit_args, sampling_delta, sampling_prior, to_json
from lintrans.device import ChunkedNetwork, inference_network, precision_name, use_bf16_for_run, use_compile
from lintrans.eval_spec import EvalSpec
from lintrans.forward import ForwardProcess
from lintrans.gaussian_prior import GaussianFit, fit_limit, limit_summary
from lintrans.run import Run, load_model

# --------------------------------------------------------------------------- the two metrics


def subset(dataset, n: int | None, seed: int) -> Tensor:
    """All images of ``dataset`` as one float tensor, or ``n`` of them drawn without replacement by ``seed``."""
    idx = torch.arange(len(dataset))
    if n is not None and n < len(dataset):
        idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return dataset.batch(idx)


def sample_producer(
    model, process: ForwardProcess, prior: sampling.DataPrior | sampling.GaussianPrior, delta: float, seed: int,
    device: torch.device,
):  # fmt: skip
    """``produce(n)``: ``n`` samples of the reverse process from ``prior`` (the run's ``sampling.prior``).

    A stochastic process draws one ``theta`` per sample, used by its prior and its whole reverse path.
    """
    gen = torch.Generator(device=device).manual_seed(seed)

    def produce(n: int) -> Tensor:
        theta = sampling.draw_theta(process, n, gen)
        final, _ = sampling.reverse(model, prior.draw(n, gen, theta), process.K, delta, gen, theta=theta)
        return final

    return produce


# Training images per chunk of the memorisation comparison: bounds the (samples, chunk) distances.
MEMORISATION_CHUNK = 2048


def memorisation_key(train_set, metric: str, mode: str, batch_size: int, device: torch.device) -> dict:
    """What the features of the training set depend on: the key of their :mod:`lintrans.feature_cache` file.

    The images (their fingerprint), the metric, its mode and the extractor's weights; the batch and
    chunk sizes they were computed in; the code that prepares images for the extractor (``fid.py``,
    ``datasets.py``); the libraries that compute and resize; the device (the chip: other hardware
    rounds otherwise).
    """
    from lintrans import fid, provenance
    from lintrans.feature_cache import file_sha256

    return {
        "what": "memorisation training features",
        "images": train_set.fingerprint(),
        "metric": metric,
        "mode": mode,
        "weights": file_sha256(fid.weights_file(metric)),
        "batch_size": batch_size,
        "chunk": MEMORISATION_CHUNK,
        "code": {module.__name__: file_sha256(Path(module.__file__)) for module in (fid, datasets)},
        "versions": records.package_versions("torch", "torchvision", "clean-fid", "numpy", "Pillow"),
        "device": provenance.device_name(device),
    }


def run_memorisation(samples: Tensor, train_set, metric: str, mode: str, batch_size: int, device) -> tuple:
    """Memorisation metrics and breakdown of ``uint8`` samples against every image of ``train_set``.

    The training set's features come from :mod:`lintrans.feature_cache` when an earlier evaluation
    (another trial of the sweep, another checkpoint) computed them with the same
    :func:`memorisation_key`; computed here, they are kept there for the next one.
    """
    from lintrans import feature_cache, fid, memorisation

    extractor, resize = fid.extractor_for(metric, mode, device)
    pixels = samples.float() / 255.0
    pixel_nn = memorisation.NearestTwo(pixels.to(device))
    feature_nn = memorisation.NearestTwo(fid.features(pixels, extractor, resize, mode, batch_size, device).to(device))
    key = memorisation_key(train_set, metric, mode, batch_size, device)
    n = len(train_set)
    cached = feature_cache.read(key, n)
    computed: Tensor | None = None
    for start, x in zip(range(0, n, MEMORISATION_CHUNK), datasets.in_batches(train_set, MEMORISATION_CHUNK)):
        pixel_nn.update(x.to(device))
        if cached is not None:
            feats = cached[start : start + len(x)]
        else:
            feats = fid.features(x, extractor, resize, mode, batch_size, device).cpu()
            if computed is None:  # the first chunk tells the feature size
                computed = torch.empty((n, feats.shape[1]), dtype=feats.dtype)
            computed[start : start + len(x)] = feats
        feature_nn.update(feats.to(device))
    if cached is not None:
        done = "read from"
    else:
        done = "written to" if feature_cache.write(key, computed) else "computed, not kept in"
    print(f"memorisation: features of the {n} training images {done} {feature_cache.path_for(key)}", flush=True)
    pixel, feature = (memorisation.summary(*found.distances()[:2]) for found in (pixel_nn, feature_nn))
    metrics = {
        "memorised_fraction": pixel["memorised_fraction"],
        "nn_distance_pixel": pixel["nn_distance_mean"],
        "nn_distance_feature": feature["nn_distance_mean"],
    }
    breakdown = {
        "samples": len(samples),
        "train_images": len(train_set),
        "ratio_threshold": memorisation.RATIO,
        "pixel": pixel,
        "feature": {**feature, "extractor": metric},
    }
    return metrics, breakdown


def run_fid(
    model, process, train_set, test_set, spec: EvalSpec, delta: float, resolution: int, device,
    gaussian: GaussianFit | None = None,
) -> tuple:  # fmt: skip
    """FID of samples from the run's prior (``gaussian``, else IHDM's over ``train_set``) and memorisation."""
    from lintrans import fid

    prior = sampling.prior_for(process, delta, device, fit=gaussian, train_set=train_set, seed=spec.seed)
    produce = sample_producer(model, process, prior, delta, spec.seed, device)
    keep = min(spec.memorisation_samples, spec.num_gen)
    stream = fid.BatchStream(produce, spec.num_gen, spec.batch_size, desc="generate", keep=keep)
    if spec.metric == "fid_mnist_features":
        score = fid.fid_mnist_features(
            stream, test_set.images, spec.num_gen, spec.batch_size, device, spec.cleanfid_mode
        )
        info = fid.features_info()
        breakdown = {"feature_extractor": {k: info[k] for k in ("held_out_accuracy", "feature_dim", "sha256")}}
    else:
        name, split, mode = spec.dataset_name_cleanfid, spec.dataset_split, spec.cleanfid_mode
        score = fid.fid_inception(stream, name, resolution, split, spec.num_gen, spec.batch_size, device, mode)
        breakdown = {
            "statistics": str(fid.stats_file(name, resolution, mode, split)),
            "weights": str(fid.inception_file()),
        }
    memorised, memorisation = run_memorisation(
        stream.kept(), train_set, spec.metric, spec.cleanfid_mode, spec.batch_size, device
    )
    return {spec.metric: score, **memorised}, {"num_gen": spec.num_gen, **breakdown, "memorisation": memorisation}


def run_elbo(
    model, process, train_set, test_set, spec: EvalSpec, sigma: float, delta: float, device, *, prior: str,
    gaussian: GaussianFit,
) -> tuple:  # fmt: skip
    """The bound under ``prior``, both priors' ``L_K``, and what ``T(K)`` leaves of the data (from ``gaussian``)."""
    from lintrans.elbo import negative_elbo

    result = negative_elbo(
        model,
        process,
        subset(train_set, spec.num_train, spec.seed),
        subset(test_set, spec.num_test, spec.seed + 1),
        sigma=sigma,
        delta=delta,
        batch_size=spec.batch_size,
        device=device,
        generator=torch.Generator().manual_seed(spec.seed),
        progress=True,
        prior=prior,
        gaussian=gaussian,
    )
    breakdown = {**result, **limit_summary(gaussian, delta)}
    return {"nll_bpd": result["bpd"], "nll_nats": result["nll_nats"]}, breakdown


def _check_fid_files(spec: EvalSpec, resolution: int) -> dict:
    """Fail on missing weights or statistics now, before a model is loaded; returns the reference."""
    from lintrans import fid

    if spec.metric == "fid_mnist_features":
        fid.weights_file(spec.metric)
        return {"reference": "mnist5k held-out digits", "cleanfid_mode": spec.cleanfid_mode}
    fid.ensure_reference_stats(spec.dataset_name_cleanfid, resolution, spec.cleanfid_mode, spec.dataset_split)
    fid.weights_file(spec.metric)
    return {
        "dataset_name_cleanfid": spec.dataset_name_cleanfid,
        "dataset_split": spec.dataset_split,
        "resolution": resolution,
        "cleanfid_mode": spec.cleanfid_mode,
    }


def evaluate(
    workdir: str | Path,
    spec: EvalSpec,
    *,
    config: ml_collections.ConfigDict | None = None,
    device: torch.device | None = None,
) -> dict:
    """Evaluate ``spec.checkpoint`` of the run in ``workdir``; returns the record written.

    The run's own ``config.json`` says what the model is; ``config``, where given, must agree.
    """
    start = time.perf_counter()
    run = Run(Path(workdir))
    own = run.config()
    spec = spec.resolved(own.data.dataset)
    dataset_name = spec.dataset_name or own.data.dataset
    records.check_name(dataset_name, "dataset_name")
    delta = sampling_delta(own) if spec.delta is None else spec.delta
    resolution = int(own.data.image_size)
    reference = _check_fid_files(spec, resolution) if spec.mode == "fid" else {}
    run.check_writable(records.RECORDS)
    path = run.checkpoint_path(spec.checkpoint)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(run.workdir, spec.checkpoint, device, config=config)
    gaussian = run.configured_prior(own)
    train_set, test_set = datasets.load(own)
    bf16 = use_bf16_for_run(spec.precision, own.training.mixed_precision, device)
    compiled = use_compile(own.training.get("compile", "auto"), device, training=False)
    process = loaded.process
    budget = max_batch_bytes(own) if spec.max_batch_bytes is None else spec.max_batch_bytes
    model = inference_network(loaded.model, bf16, device, compiled, budget, process)

    prior = sampling_prior(own) if spec.prior == "run" else spec.prior
    if spec.mode == "elbo" or prior == "gaussian":
        # A data-prior run has no stored fit: fit one here, from the whole training set as training would.
        gaussian = gaussian or fit_limit(process, train_set, device=device, **prior_fit_args(own))
    if spec.mode == "fid":
        fit = gaussian if prior == "gaussian" else None
        metrics, breakdown = run_fid(model, process, train_set, test_set, spec, delta, resolution, device, fit)
        evaluation = {"metric": spec.metric, "num_gen": spec.num_gen, **reference}
    else:
        sigma = float(own.model.sigma)
        metrics, breakdown = run_elbo(
            model, process, train_set, test_set, spec, sigma, delta, device, prior=prior, gaussian=gaussian
        )
        evaluation = {"metric": "nll_bpd", "num_train": breakdown["num_train"], "num_test": breakdown["num_test"]}
    if spec.prior != "run":  # another prior than the run's own: its own columns
        metrics = {f"{name}_{prior}_prior": value for name, value in metrics.items()}
    if spec.checkpoint:  # a named snapshot, not the run's last: its own columns, beside the last one's
        metrics = {f"{name}_step{loaded.step}": value for name, value in metrics.items()}

    record = {
        "mode": spec.mode,
        "experiment": spec.experiment_name,
        "param": spec.param_name,
        "dataset_name": dataset_name,
        "run": run_identity(own, run, path, spec.checkpoint, loaded.step, delta),
        "evaluation": {
            **evaluation,
            "batch_size": spec.batch_size,
            "seed": spec.seed,
            "precision": precision_name(bf16),
            "compile": compiled,
            "network_batch": model.chunk if isinstance(model, ChunkedNetwork) else None,  # eval.max_batch_bytes
            "prior": prior,
        },
        "metrics": metrics,
        "breakdown": breakdown,
        "wall_s": round(time.perf_counter() - start, 3),
        **records.environment(_device_name(device)),
    }
    records.write_record(run.workdir, record)
    records.publish(record, dataset_name)
    return record


def run_identity(config, run: Run, path: Path, checkpoint: int, steps: int, delta: float) -> dict:
    """Everything that tells this run from another one in a table of results."""
    return {
        "workdir": str(run.workdir.resolve()),
        "dataset": config.data.dataset,
        "forward": config.model.forward,
        "K": int(config.model.K),
        "sigma": float(config.model.sigma),
        "delta": delta,
        "seed": int(config.seed),
        "steps": steps,
        "checkpoint": checkpoint,
        "checkpoint_path": str(path.resolve()),
        "overrides": run.source().get("overrides", {}),
        "config": json.loads(to_json(config)),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(device)
