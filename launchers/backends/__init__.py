"""Backends: one interface, filled in by local processes, SLURM, plain sbatch scripts, Ray Tune and the foreground.

Every backend runs the same trial entry point (:mod:`launchers.trial`); they differ only in how
they start, watch and stop it. A backend is a subclass of :class:`Backend` that fills in:

* ``add_arguments(parser)`` / ``from_args(args)``: its own options of ``lintrans run`` (``--gpus``,
  ``--ray-address``), and the backend built from them;
* ``check(sweep)``: every check it can make before anything is written (the scheduler answers,
  the partition exists); ``run`` calls it first, ``--dry-run`` included;
* ``describe(sweep, trials)``: the one line a user sees about what ``submit`` does;
* ``dry_run(sweep, trials)``: the text of what ``submit`` would do (the line above, or the script);
* ``submit(sweep, trials)``: start or queue the trials; returns an exit code. ``waits`` says whether
  it returns once they ended (local, Ray, foreground) or once they are queued (SLURM, sbatch);
* ``observe(trials)``: what the scheduler says about each trial's latest job
  (:class:`launchers.state.Observation`), keyed by trial id; trials it knows nothing of are absent;
* ``cancel(trials)``: stop queued and running trials; they stay resumable; returns how many.

Adding a backend is one module in this folder and one line in :data:`REGISTRY` (see README,
"Adding a backend", and :mod:`launchers.backends.foreground`, the smallest one).
"""

from __future__ import annotations

import argparse
import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from launchers.state import Observation
from lintrans.errors import UsageError, choices

if TYPE_CHECKING:
    from launchers.sweep import Sweep, Trial

# The backends, by the name `--backend` and a sweep's `backend:` give: "module:class", imported when used.
REGISTRY = {
    "local": "launchers.backends.local:LocalBackend",
    "slurm": "launchers.backends.slurm:SlurmBackend",
    "sbatch": "launchers.backends.sbatch:SbatchBackend",
    "ray": "launchers.backends.ray:RayBackend",
    "foreground": "launchers.backends.foreground:ForegroundBackend",
}
NAMES = tuple(REGISTRY)


class Backend(ABC):
    name: ClassVar[str]
    waits: ClassVar[bool] = True  # submit returns once the trials ended (else once they are queued)
    adaptive: ClassVar[bool] = True  # can run an adaptive search, wave after wave

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this backend's options to ``lintrans run`` (none by default)."""
        return

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Backend:
        """The backend with the options of ``args`` (the defaults, for a backend without options)."""
        return cls()

    def check(self, sweep: Sweep) -> None:
        """Raise :class:`UsageError` for what would make ``submit`` fail (nothing to check by default)."""
        return

    @abstractmethod
    def describe(self, sweep: Sweep, trials: list[Trial]) -> str: ...

    def dry_run(self, sweep: Sweep, trials: list[Trial]) -> str:
        return self.describe(sweep, trials)

    @abstractmethod
    def submit(self, sweep: Sweep, trials: list[Trial]) -> int: ...

    @abstractmethod
    def observe(self, trials: list[Trial]) -> dict[str, Observation]: ...

    @abstractmethod
    def cancel(self, trials: list[Trial]) -> int: ...


def backend_class(name: str) -> type[Backend]:
    if name not in REGISTRY:
        raise UsageError(f"unknown backend '{name}'; valid: {choices(NAMES)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get(name: str) -> Backend:
    """The backend called ``name`` with its default options (to observe or cancel what it launched)."""
    return backend_class(name)()


def from_args(name: str, args: argparse.Namespace) -> Backend:
    """The backend called ``name`` with its options from ``lintrans run``'s arguments."""
    return backend_class(name).from_args(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every backend's options of ``lintrans run``, each remembered as its backend's (see :func:`chosen`)."""
    owners: dict[str, tuple[str, str]] = {}  # dest -> (option, backend)
    for name in NAMES:
        backend_class(name).add_arguments(_Owned(parser.add_argument_group(f"--backend {name}"), name, owners))
    parser.set_defaults(backend_options=owners)


class _Owned:
    """What a backend's ``add_arguments`` adds to: its own group of ``run``'s options, each noted as its own."""

    def __init__(self, group, backend: str, owners: dict[str, tuple[str, str]]) -> None:
        self.group, self.backend, self.owners = group, backend, owners

    def add_argument(self, *flags: str, **kw) -> argparse.Action:
        action = self.group.add_argument(*flags, **kw)
        if action.dest != "backend_alias":  # an alias of --backend belongs to no backend's run
            self.owners[action.dest] = (flags[0], self.backend)
        return action


class Alias(argparse.Action):
    """An option that stands for ``--backend NAME`` (``--sbatch-only`` is ``--backend sbatch``)."""

    def __init__(self, option_strings, dest, backend: str, **kw) -> None:
        super().__init__(option_strings, dest, nargs=0, default=None, **kw)
        self.backend = backend

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, (option_string, self.backend))


def chosen(args: argparse.Namespace, default: str | None) -> str:
    """The backend ``run`` uses: ``--backend`` (or an alias of it), else ``default`` (the sweep's), else local."""
    alias = getattr(args, "backend_alias", None)
    if alias and args.backend not in (None, alias[1]):
        raise UsageError(f"{alias[0]} means --backend {alias[1]}; it cannot go with --backend {args.backend}")
    name = args.backend or (alias[1] if alias else None) or default or "local"
    backend_class(name)
    for dest, (option, owner) in getattr(args, "backend_options", {}).items():
        if owner != name and getattr(args, dest, None) is not None:
            raise UsageError(f"{option} is an option of the {owner} backend; this run uses {name}")
    return name
