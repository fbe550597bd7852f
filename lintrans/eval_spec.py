"""What one evaluation is: :class:`EvalSpec`, the one description of an FID or ELBO evaluation.

``evaluate.py``'s flags are made from its fields; a sweep file's ``evaluations`` entries are
validated as EvalSpecs before anything is submitted; :func:`lintrans.evaluation.evaluate` takes
one. It lives apart from the evaluation itself so that reading a sweep (``lintrans status`` on a
login node) does not import torch.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field

from lintrans.errors import UsageError

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")]
Count = Annotated[int, Field(ge=1)]


class SpecError(UsageError):
    """A bad evaluation field: ``field`` names it, so a flag or a sweep-file line can be reported."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@pydantic.dataclasses.dataclass(frozen=True, config=pydantic.ConfigDict(extra="forbid", strict=True))
class EvalSpec:
    """One evaluation of a run: what ``evaluate.py``'s flags and a sweep's ``evaluations`` entries say."""

    mode: Literal["elbo", "fid"] = Field(description="fid or elbo.")
    checkpoint: Annotated[int, Field(ge=0)] = Field(
        0, description="0 = latest (checkpoints-meta), N = checkpoint_N.pth"
    )
    delta: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = Field(
        None, description="Sampling noise (default: the run's config.sampling.delta or 1.25 sigma)."
    )
    batch_size: Count = Field(256, description="Batch size of sample generation and of the ELBO.")
    num_gen: Annotated[int, Field(ge=2)] = Field(5000, description="Number of samples generated for FID.")
    num_train: Count | None = Field(None, description="ELBO: training images in the prior term (default: all).")
    num_test: Count | None = Field(None, description="ELBO: test images evaluated (default: all).")
    seed: int = Field(0, description="Seed of the prior images, the sampling noise and the ELBO subsets.")
    metric: Literal["auto", "fid_inception", "fid_mnist_features"] = Field(
        "auto", description="FID flavour: auto, fid_inception or fid_mnist_features."
    )
    experiment_name: Name = Field("default", description="A suite of evaluations, e.g. a sweep over delta.")
    param_name: Name = Field("default", description="What makes this evaluation different within the experiment.")
    dataset_name: Name | None = Field(None, description="Results go to runs/<dataset_name>/ (default: the data set).")
    dataset_name_cleanfid: Name | None = Field(None, description="Reference statistics, clean-fid naming.")
    dataset_split: Name = Field("train", description="clean-fid split of the statistics; 'custom' for --save_stats.")
    cleanfid_mode: Literal["clean", "legacy_tensorflow"] = Field("clean", description="clean or legacy_tensorflow.")
    precision: Literal["train", "auto", "no", "bf16"] | None = Field(
        None,
        description="The network's precision: train (the run's training.mixed_precision), auto (bf16 where the "
        "device has it), no (fp32) or bf16. Default: train for FID, no for the ELBO (bf16 moves the bound by "
        "up to 0.01 bpd: bench/elbo_precision.py). The bound's sums stay in float64 either way.",
    )
    prior: Literal["run", "data", "gaussian"] = Field(
        "run",
        description="The prior of u_K: run (the run's sampling.prior), data (IHDM's mixture over the training "
        "set) or gaussian (N(mu, Sigma + delta^2 I) fitted to T(K) u_0: the run's stored fit, else fitted here). "
        "FID samples from it; the ELBO's bound uses it. Another prior than the run's names the metrics "
        "<metric>_<prior>_prior, so both can be columns of one table.",
    )
    max_batch_bytes: Annotated[int, Field(ge=0)] | None = Field(
        None,
        description="Peak memory of one network call, in bytes: the network takes at most the samples that fit "
        "(measured on the device), the results stay those of whole batches. Default: the run's "
        "eval.max_batch_bytes; 0: no limit.",
    )
    memorisation_samples: Count = Field(
        1000,
        description="FID: the first N samples (at most num_gen) are compared with every training image for "
        "memorisation; bounds the memory they are kept in and the (N x training set) distances.",
    )

    def resolved(self, dataset: str) -> EvalSpec:
        """This spec for a run on ``dataset``: ``metric`` and ``precision`` resolved, FID metric and statistics
        compatible."""
        if self.precision is None:
            return dataclasses.replace(self, precision="train" if self.mode == "fid" else "no").resolved(dataset)
        if self.mode != "fid":
            return self
        metric = self.metric
        if metric == "auto":
            metric = (
                "fid_mnist_features" if dataset == "mnist5k" and not self.dataset_name_cleanfid else "fid_inception"
            )
        if metric == "fid_mnist_features":
            if dataset != "mnist5k":
                raise SpecError(
                    "metric",
                    f"fid_mnist_features is defined for the mnist5k data set only, not {dataset}; use "
                    "metric fid_inception with clean-fid statistics (dataset_name_cleanfid, see --save_stats)",
                )
            if self.dataset_name_cleanfid:
                raise SpecError("dataset_name_cleanfid", "names Inception statistics; it needs metric fid_inception")
        elif not self.dataset_name_cleanfid:
            raise SpecError(
                "dataset_name_cleanfid",
                "fid_inception needs reference statistics: dataset_name_cleanfid=<clean-fid name> with "
                "dataset_split=train|test, or custom ones (--save_stats first, then dataset_split=custom)",
            )
        return dataclasses.replace(self, metric=metric)

    @classmethod
    def fields(cls) -> dict[str, Any]:
        """Field name -> pydantic field info (type, default, description): what flags are made from."""
        return cls.__pydantic_fields__

    @classmethod
    def parse(cls, values: dict[str, Any]) -> EvalSpec:
        """An EvalSpec from plain values, or a :class:`SpecError` naming the first bad field."""
        try:
            return cls(**values)
        except pydantic.ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "mode"
            if err["type"] == "unexpected_keyword_argument":
                raise SpecError(field, f"unknown evaluation key; valid: {', '.join(sorted(cls.fields()))}") from None
            given = f", got {err['input']!r}" if err["type"] != "missing" else ""
            raise SpecError(field, f"{err['msg']}{given}") from None
