"""Exceptions whose message is one line: what is wrong and what to do about it.

The CLI maps each class to a documented exit code (see ``cli/main.py``)."""

from __future__ import annotations


class NormswapError(Exception):
    """Base class. ``str(err)`` is a single user-facing line."""

    exit_code = 1


class InputError(NormswapError):
    """Bad user input: a missing/corrupt file, a bad model spec, wrong keys, a bad shape."""

    exit_code = 2


class RewriteError(NormswapError):
    """A requested rewrite cannot be done exactly (the message says why)."""

    exit_code = 2


class NonFiniteError(NormswapError):
    """A stage (calibration, recovery) left the model with NaN/Inf weights or outputs: it is never saved
    or exported; the message names the stage and the first bad tensor."""

    exit_code = 3


class ParityError(NormswapError):
    """The rewritten or exported model does not compute what the original did."""

    exit_code = 3


def first_line(e: BaseException, limit: int = 300) -> str:
    """``"TypeName: first non-empty line of the message"`` (just the type name when the message is
    empty), shortened to ``limit`` characters: how an exception from user code or a library is quoted
    inside a one-line normswap error."""
    line = next((ln.strip() for ln in str(e).strip().splitlines() if ln.strip()), "")
    line = f"{type(e).__name__}: {line}" if line else type(e).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"
