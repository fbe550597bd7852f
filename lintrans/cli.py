"""Plumbing shared by the entry points: absl flags, and bad input as one line with exit code 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app, flags
from ml_collections import config_flags

from lintrans.errors import EXIT_USAGE, UsageError


def _say(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # one line per run, not one per torchrun worker
        print(f"error: {message}", file=sys.stderr, flush=True)


def _parse(argv: list[str]) -> list[str]:
    try:
        rest = flags.FLAGS(argv)
    except Exception as exc:  # noqa: BLE001 - flags and config files are user input, all of it
        if isinstance(exc, (AttributeError, KeyError)):
            overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
            _say(f"unknown config key {str(exc).strip(chr(34))} in overrides {overrides}")
        else:
            _say(f"{type(exc).__name__}: {str(exc).splitlines()[0]}" if str(exc) else type(exc).__name__)
        sys.exit(EXIT_USAGE)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
        try:
            flags.FLAGS.config.keys()  # config files load lazily: surface a bad path here
        except OSError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            name = config_flags.get_config_filename(flags.FLAGS["config"])
            _say(f"cannot load config file {name}: {lines[-1]}")
            sys.exit(EXIT_USAGE)
    return rest


def run(main: Callable[[list[str]], int | None]) -> None:
    """``absl.app.run`` with flag and :class:`UsageError` failures turned into exit code 2."""

    def wrapped(argv: list[str]) -> None:
        try:
            code = main(argv)
        except UsageError as exc:
            _say(str(exc))
            sys.exit(EXIT_USAGE)
        sys.exit(code or 0)

    app.run(wrapped, flags_parser=_parse)
