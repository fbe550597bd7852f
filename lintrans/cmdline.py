"""What ``train.py``, ``sample.py``, ``evaluate.py`` and ``import-ihdm`` share: flags, config, exit code.

``--config=FILE --config.a.b=VALUE ...``: the file is executed once (:func:`lintrans.config.load_file`,
which names the file in its errors), and the overrides are ml_collections' own
(:func:`ml_collections.config_flags.DEFINE_config_dict`: one flag per overridden field, parsed by the
field's type); :func:`ml_collections.config_flags.get_override_values` gives them back as the flat dict
that a run records and a sweep's trial passes to :func:`lintrans.config.load`. Bad input is one
line on stderr and exit code 2; :func:`entry` returns the code instead of exiting, so tests can call
an entry point in-process.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from lintrans import config as cfg
from lintrans.errors import UsageError, printable
from lintrans.procenv import EXIT_USAGE, is_rank0, keep_freed_memory

Main = Callable[[list[str]], int | None]
_OVERRIDE = re.compile(r"-{1,2}(?:no)?config\.([^=]*)")  # as config_flags recognises an override


class HelpRequested(Exception):
    """``--help``: print the usage text and exit 0."""


@dataclass
class Parsed:
    """What the command line said: the loaded config (if any), where it came from, and the other flags."""

    flags: flags.FlagValues
    config: ml_collections.ConfigDict | None = None
    config_file: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)  # the positional arguments, when the command takes some


def say(message: str) -> None:
    """One line on stderr, from one process per run (not one per torchrun/srun/mpirun rank)."""
    if is_rank0():
        print(f"error: {printable(message)}", file=sys.stderr, flush=True)


def _take_config_file(argv: list[str]) -> tuple[str | None, list[str]]:
    """The value of ``--config=F`` / ``--config F`` (the last one given), and ``argv`` without it."""
    path, rest, i = None, [], 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--config="):
            path = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    return path, rest


def _override_flags(config: ml_collections.ConfigDict, fv: flags.FlagValues, argv: list[str]) -> None:
    """Define ml_collections' ``--config`` flag on ``fv`` (its field flags parse the overrides in ``argv``)."""
    try:
        config_flags.DEFINE_config_dict("config", config, "The config.", flag_values=fv, lock_config=False,
                                        sys_argv=argv)  # fmt: skip
    except (KeyError, AttributeError, IndexError, ValueError, TypeError) as exc:
        for match in filter(None, map(_OVERRIDE.match, argv[1:])):  # which key does the config not have?
            try:
                config_path.get_type(match[1], config)
            except (KeyError, AttributeError, IndexError, ValueError, TypeError):
                raise UsageError(f"unknown config key '{match[1].rsplit('.', 1)[-1]}' in --config.{match[1]}") from None
        raise UsageError(f"--config: {str(exc).splitlines()[0]}") from None


def parse(
    argv: list[str],
    fv: flags.FlagValues,
    *,
    config_required: bool,
    required: tuple[str, ...] = (),
    positional: tuple[str, ...] = (),
    doc: str = "",
) -> Parsed:
    """Parse ``argv`` (``argv[0]`` is the program): the config and its overrides as above, the rest absl.

    ``positional`` names the positional arguments the command requires (``import-ihdm RUN_DIR``);
    ``doc`` is what ``--help`` prints above the flags (the command's module docstring).
    """
    path, argv = _take_config_file(argv)
    if "--help" in argv[1:] or "-h" in argv[1:]:
        raise HelpRequested(f"{doc.strip()}\n\nflags:\n{fv.get_help()}")
    overridden = [m[1] for m in map(_OVERRIDE.match, argv[1:]) if m]
    if path is None and config_required:
        raise UsageError("--config is required (an ml_collections config file)")
    if path is None and overridden:
        raise UsageError(f"--config.{overridden[0]} needs --config=FILE")
    if path is not None:
        _override_flags(cfg.load_file(path, [Path.cwd()]), fv, argv)  # as ever: the repository's configs.*
    try:
        extra = fv(argv)
    except (flags.Error, TypeError, ValueError) as exc:
        raise UsageError(str(exc).splitlines()[0].removeprefix("flag ")) from None
    if len(extra) > 1 + len(positional):
        raise UsageError(f"unexpected arguments {extra[1 + len(positional) :]}; flags look like --name=value")
    if len(extra) < 1 + len(positional):
        raise UsageError(f"{positional[len(extra) - 1]} is required")
    for name in required:
        if fv[name].value is None:
            raise UsageError(f"--{name} is required")
    if path is None:
        return Parsed(fv, args=extra[1:])
    return Parsed(fv, fv["config"].value, path, dict(config_flags.get_override_values(fv["config"])), extra[1:])


def entry(main: Main, argv: list[str] | None = None) -> int:
    """Run ``main(argv)`` and turn a :class:`UsageError` into its one line and exit code 2.

    First the process keeps the memory of freed tensors for the next ones (:func:`keep_freed_memory`:
    fp32 sampling 1.16x as fast); a caller in a notebook or a test then holds its peak until it exits.
    """
    keep_freed_memory()
    try:
        return main(list(sys.argv if argv is None else argv)) or 0
    except HelpRequested as exc:
        print(exc)
        return 0
    except UsageError as exc:
        say(str(exc))
        return EXIT_USAGE
