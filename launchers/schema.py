"""The sweep file's schema: typed, strict, range-checked sections (pydantic v2, ``extra="forbid"``).

Every value a sweep file can hold has a type and a range here, so nothing impossible is
submitted: negative CPUs, a zero time limit, ``array_parallelism: 0``, a NaN noise level, a
distribution whose low is not below its high. :mod:`launchers.sweep` turns a validation error
into ``file:line: key: message`` with the line of the offending key.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Values that end up in #SBATCH lines or srun arguments: plain tokens, never shell.
TOKEN = r"^[A-Za-z0-9_.,:=/+@%-]+$"
Token = Annotated[str, Field(pattern=TOKEN)]
HostList = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.,\[\]-]+$")]  # n[01-04],gpu7: checked by python-hostlist
OptionName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]*$")]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
# SLURM options that lintrans sets itself from resources (or that would break its array handling).
RESERVED_SBATCH = {
    "array", "job-name", "output", "error", "nodes", "ntasks", "ntasks-per-node", "cpus-per-task", "time",
    "signal", "requeue", "open-mode", "mem", "gpus-per-node", "partition", "account", "qos", "constraint", "wrap",
}  # fmt: skip


SWEEP_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"  # a folder name under runs/sweeps/, and a job name
HOSTLIST_OPTIONS = {"exclude", "nodelist"}
MEMORY_OPTIONS = {"mem-per-cpu", "mem-per-gpu"}


def _is_hostlist(value: str) -> bool:
    import hostlist

    try:
        return bool(hostlist.expand_hostlist(value))
    except hostlist.BadHostlist:
        return False


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Resources(Strict):
    """Per trial. ``gpus`` are per node; with GPUs there is one task (DDP rank) per GPU."""

    gpus: NonNegative = 0
    cpus: Positive = 1  # per task
    mem_gb: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None  # per node
    time_min: Positive = 60
    nodes: Positive = 1
    tasks_per_node: Positive | None = None  # default: one per GPU, else 1

    @model_validator(mode="after")
    def _tasks_match_gpus(self) -> Resources:
        if self.gpus and self.tasks_per_node not in (None, self.gpus):
            raise ValueError(
                f"tasks_per_node ({self.tasks_per_node}) must equal gpus ({self.gpus}): one DDP task per GPU"
            )
        return self

    @property
    def tasks(self) -> int:
        """DDP processes per node."""
        return self.tasks_per_node or max(1, self.gpus)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks


class Container(Strict):
    """The image a trial runs in: ``apptainer``/``singularity`` wrap the interpreter (``KIND exec ARGS
    IMAGE PYTHON``); ``pyxis`` goes through ``srun --container-image=IMAGE ARGS``."""

    kind: Literal["apptainer", "singularity", "pyxis"]
    image: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.,:=/+@%#-]+$")]  # a path, docker://..., or pyxis's host#image
    args: list[Token] = []  # --nv, --bind=/scratch (apptainer); --container-mounts=/data:/data (pyxis)


class SlurmSection(Strict):
    partition: Token | None = None
    account: Token | None = None
    qos: Token | None = None
    constraint: Token | None = None
    array_parallelism: Positive = 256
    max_requeues: NonNegative = 3
    signal_delay_s: Annotated[int, Field(ge=1)] = 120
    setup: list[str] = []  # shell lines written by the sweep author, run in the job before the trial
    # More #SBATCH options: {gres: "gpu:a100:1", exclude: "n[1-3]", exclusive: true}; true is a bare flag,
    # null drops the option, a default of submitit's (wckey) included.
    additional: dict[OptionName, bool | Token | HostList | int | None] = {}
    srun_args: list[Token] = []
    # The command that starts the trial's Python on the nodes, as a list or one string of tokens:
    # /opt/envs/lt/bin/python, or "conda run -n lt python" (default: the Python that runs `lintrans run`).
    python: list[Token] | None = None
    container: Container | None = None
    modules: list[Token] = []  # `module load` lines, before the author's setup lines

    @field_validator("python", mode="before")
    @classmethod
    def _split_command(cls, command: Any) -> Any:
        if isinstance(command, str):
            command = command.split()
        if isinstance(command, list) and not command:
            raise ValueError("an empty command: give the interpreter, or a prefix such as conda run -n ENV python")
        return command

    @field_validator("setup")
    @classmethod
    def _one_line_each(cls, lines: list[str]) -> list[str]:
        for line in lines:
            if "\n" in line or "\r" in line or "\0" in line:
                raise ValueError(f"each setup entry is one shell line, got {line!r}")
        return lines

    @field_validator("additional")
    @classmethod
    def _not_reserved(cls, options: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(options) & RESERVED_SBATCH)
        if taken:
            raise ValueError(f"{', '.join(taken)}: set from resources or the slurm section, not 'additional'")
        for key in HOSTLIST_OPTIONS & set(options):
            if not isinstance(options[key], str) or not _is_hostlist(options[key]):
                raise ValueError(f"{key}: {options[key]!r} is not a SLURM host list (e.g. n[01-04],gpu7)")
        for key in MEMORY_OPTIONS & set(options):
            if options[key] is not None and not re.fullmatch(r"\d+[KMGT]?", str(options[key])):
                raise ValueError(f"{key}: {options[key]!r} is not a memory size (e.g. 8G, 512M)")
        if len({"gres", "gpus"} & {k for k, v in options.items() if v not in (None, False)}) > 1:
            raise ValueError("gres and gpus both ask for GPUs: give one")
        return options


class Asha(Strict):
    """ASHA in training steps (``time_attr="step"``, ``max_t = training.n_iters``)."""

    grace_period: Positive  # steps before a trial may be stopped
    reduction_factor: Annotated[float, Field(gt=1, allow_inf_nan=False)] = 3
    brackets: Positive = 1


class RuntimeEnv(Strict):
    env_vars: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], str] = {}
    working_dir: str | None = None


class RaySection(Strict):
    address: str | None = None
    max_failures: Annotated[int, Field(ge=-1)] = 2
    max_concurrent: Positive | None = None
    asha: Asha | None = None
    runtime_env: RuntimeEnv = RuntimeEnv()


class LocalSection(Strict):
    slots: Positive | None = None
    max_restarts: NonNegative = 2  # restarts of a crashed trial (not of one you interrupted)
    progress_s: Positive = 30  # between progress lines when `run`'s output is not a terminal


class Objective(Strict):
    metric: str = "eval_loss"  # held-out loss (reported during training), or any evaluation metric
    mode: Literal["min", "max"] = "min"


class Search(Strict):
    method: Literal["grid", "random", "optuna"] = "grid"
    n_trials: Positive | None = None  # random, optuna (per seed)
    seed: int = 0
    batch: Positive = 1  # optuna: trials per wave
    objective: Objective = Objective()

    @model_validator(mode="after")
    def _n_trials(self) -> Search:
        if self.method != "grid" and self.n_trials is None:
            raise ValueError(f"search method '{self.method}' needs n_trials")
        return self


# --------------------------------------------------------------------------- axis distributions

Number = Annotated[float, Field(allow_inf_nan=False)]


class Distribution(Strict):
    """A random axis: ``{loguniform: [lo, hi]}``, ``{uniform: [lo, hi]}``, ``{randint: [lo, hi]}``, ``{choice: [..]}``.

    ``randint`` draws ``lo <= value < hi``, as numpy and Ray Tune do.
    """

    loguniform: Annotated[list[Number], Field(min_length=2, max_length=2)] | None = None
    uniform: Annotated[list[Number], Field(min_length=2, max_length=2)] | None = None
    randint: Annotated[list[int], Field(min_length=2, max_length=2)] | None = None
    choice: list[Any] | None = None

    @model_validator(mode="after")
    def _one_and_ordered(self) -> Distribution:
        given = [k for k in ("loguniform", "uniform", "randint", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a distribution has exactly one of loguniform, uniform, randint, choice")
        kind = given[0]
        if kind == "choice":
            if not self.choice:
                raise ValueError("choice needs a non-empty list")
            return self
        lo, hi = getattr(self, kind)
        if not lo < hi:
            raise ValueError(f"{kind}: low ({lo}) must be below high ({hi})")
        if kind == "loguniform" and lo <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {lo}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "randint", "choice") if getattr(self, k) is not None)

    @property
    def log(self) -> bool:
        return self.kind == "loguniform"

    def sample(self, rng) -> Any:
        """One value from ``rng`` (a ``random.Random``): the same seed gives the same trials everywhere."""
        kind = self.kind
        if kind == "choice":
            return self.choice[rng.randrange(len(self.choice))]
        lo, hi = getattr(self, kind)
        if kind == "randint":
            return rng.randrange(lo, hi)
        if kind == "uniform":
            return lo + (hi - lo) * rng.random()
        return math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * rng.random())


class SweepFile(Strict):
    """The whole file; ``axes``, ``overrides`` and ``evaluations`` are checked further against the config.

    Paths resolve against the sweep file's folder, never the working directory, so a sweep means
    the same wherever lintrans runs: ``config`` (absolute or relative; a relative one that is not
    there is looked up in lintrans's own root, where the repository's sweeps name ``configs/...``
    from), ``python_path`` and ``runs_dir`` (:func:`launchers.sweep.runs_root`).
    """

    name: Annotated[str, Field(pattern=f"^{SWEEP_NAME}$")] | None = None
    config: str
    python_path: list[str] = []  # more folders the config imports from (the sweep file's own is always there)
    axes: dict[str, list[Any] | Distribution]
    seeds: list[int] | None = None
    overrides: dict[str, Any] = {}
    evaluations: list[dict[str, Any]] = []
    resources: Resources = Resources()
    backend: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]*$")] | None = None  # a registered backend (run checks)
    runs_dir: str | None = None  # below --runs-dir, above $LINTRANS_RUNS_DIR and runs/ beside the sweep file
    slurm: SlurmSection = SlurmSection()
    ray: RaySection = RaySection()
    local: LocalSection = LocalSection()
    search: Search = Search()

    @field_validator("axes", mode="before")
    @classmethod
    def _axes(cls, axes: Any) -> Any:
        if not isinstance(axes, dict) or not axes:
            raise ValueError("required: a mapping of config keys to non-empty lists of values (or distributions)")
        return axes

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
            raise ValueError(f"a non-empty list of distinct integers, got {seeds!r}")
        return seeds
