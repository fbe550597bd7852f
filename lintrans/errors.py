"""User-facing errors and the exit codes the entry points translate them into.

Launchers (SLURM requeue logic, Ray Tune, the local backend) read these codes, so
they are part of the public interface and documented in the README.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2  # bad input: unknown forward process, impossible K or sigma, missing files
EXIT_NONFINITE = 3  # training stopped on a non-finite loss; the last checkpoint is intact
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written after SIGUSR1/SIGUSR2/SIGTERM, requeue me


class UsageError(Exception):
    """Bad input from the user. Entry points print the message as one line and exit 2."""


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite."""


def choices(values) -> str:
    """Format valid choices the same way in every message."""
    return ", ".join(sorted(str(v) for v in values))


def printable(message: str) -> str:
    """``message`` with lone surrogates (malformed input read back from YAML) escaped.

    Python's own stderr escapes them already; a strict stream (an in-process caller's, pytest's
    capture) raises ``UnicodeEncodeError`` instead of printing the one error line.
    """
    return message.encode("utf-8", "backslashreplace").decode("utf-8")
