"""The entry points' edge: flags, ``--config`` with ``--config.x.y=value`` overrides, exit codes.

``--config=FILE --config.a.b=VALUE ...`` is parsed here (with ml_collections' own value parsers
for the field's type) and handed to :func:`lintrans.config.load`, the same path a sweep's
trials take, so a run started by hand and a trial with the same overrides get the same config.
Bad input is one line on stderr and exit code 2; :func:`entry` returns the code instead of
exiting, so tests can call an entry point in-process.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ml_collections
from absl import flags

from lintrans import config as cfg
from lintrans.errors import UsageError, printable
from lintrans.procenv import EXIT_USAGE, is_rank0

Main = Callable[[list[str]], int | None]


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


def _split(argv: list[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """``--config=F`` / ``--config F``, the ``--config.x=v`` pairs in order, and everything else."""
    path, raw, rest = None, [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            key, sep, value = arg[len("--config.") :].partition("=")
            if not sep:
                if i + 1 >= len(argv):
                    raise UsageError(f"--config.{key} needs a value (--config.{key}=VALUE)")
                value, i = argv[i + 1], i + 1
            raw.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return path, raw, rest


def parse_overrides(config: ml_collections.ConfigDict, raw: list[tuple[str, str]]) -> dict[str, Any]:
    """Strings from the command line to typed values, by the type each field has in ``config``."""
    from ml_collections.config_flags import config_path, tuple_parser

    parsers = {
        int: flags.IntegerParser(),
        float: flags.FloatParser(),
        bool: flags.BooleanParser(),
        str: flags.ArgumentParser(),
        tuple: tuple_parser.TupleParser(),
    }
    out: dict[str, Any] = {}
    for key, text in raw:
        try:
            kind = config_path.get_type(key, config)
        except (AttributeError, KeyError, IndexError, ValueError):
            leaf = key.rsplit(".", 1)[-1]
            raise UsageError(f"unknown config key '{leaf}' in --config.{key}") from None
        if text == "None" and config_path.is_optional(key, config):
            out[key] = None
            continue
        if kind not in parsers:
            raise UsageError(f"--config.{key} cannot be set from the command line (type {kind.__name__})")
        try:
            out[key] = parsers[kind].parse(text)
        except (ValueError, TypeError, SyntaxError) as exc:
            raise UsageError(f"--config.{key}={text!r}: expected {kind.__name__} ({exc})") from None
    return out


def parse(
    argv: list[str],
    fv: flags.FlagValues,
    *,
    config_required: bool,
    required: tuple[str, ...] = (),
    positional: tuple[str, ...] = (),
    doc: str = "",
) -> Parsed:
    """Parse ``argv`` (``argv[0]`` is the program): the config through :func:`lintrans.config.load`, the rest absl.

    ``positional`` names the positional arguments the command requires (``import-ihdm RUN_DIR``);
    ``doc`` is what ``--help`` prints above the flags (the command's module docstring).
    """
    path, raw, rest = _split(argv[1:])
    if "--help" in rest or "-h" in rest:
        raise HelpRequested(f"{doc.strip()}\n\nflags:\n{fv.get_help()}")
    try:
        extra = fv([argv[0], *rest])
    except flags.Error as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    if len(extra) > 1 + len(positional):
        raise UsageError(f"unexpected arguments {extra[1 + len(positional) :]}; flags look like --name=value")
    if len(extra) < 1 + len(positional):
        raise UsageError(f"{positional[len(extra) - 1]} is required")
    for name in required:
        if fv[name].value is None:
            raise UsageError(f"--{name} is required")
    if path is None:
        if config_required:
            raise UsageError("--config is required (an ml_collections config file)")
        if raw:
            raise UsageError(f"--config.{raw[0][0]} needs --config=FILE")
        return Parsed(fv, args=extra[1:])
    base = cfg.load_file(path)
    overrides = parse_overrides(base, raw)
    return Parsed(fv, cfg.load(path, overrides), path, overrides, extra[1:])


def entry(main: Main, argv: list[str] | None = None) -> int:
    """Run ``main(argv)`` and turn a :class:`UsageError` into its one line and exit code 2."""
    try:
        return main(list(sys.argv if argv is None else argv)) or 0
    except HelpRequested as exc:
        print(exc)
        return 0
    except UsageError as exc:
        say(str(exc))
        return EXIT_USAGE
