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


class ParityError(NormswapError):
    """The rewritten or exported model does not compute what the original did."""

    exit_code = 3
