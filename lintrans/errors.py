"""User-facing errors, and how their one line is printed.

The exit codes the entry points translate them into are in :mod:`lintrans.procenv`.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user. Entry points print the message as one line and exit 2."""


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite."""


def choices(values) -> str:
    """Format valid choices the same way in every message."""
    return ", ".join(sorted(str(v) for v in values))


def printable(message: str) -> str:
    """``message`` as one printable line: control characters (a ``\r`` or ``\n`` in a bad value) and lone
    surrogates (malformed input read back from YAML) escaped.

    A raw ``\r`` would split the one error line in two; a lone surrogate makes a strict stream (an
    in-process caller's, pytest's capture) raise ``UnicodeEncodeError`` instead of printing it.
    """
    message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)  # one line: \r, \n, ESC escaped
    return message.encode("utf-8", "backslashreplace").decode("utf-8")
