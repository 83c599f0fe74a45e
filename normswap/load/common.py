"""Shared helpers of :mod:`normswap.load`: one-line errors, key lists, file checks."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from normswap.errors import InputError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar", ".pt.tar")
"""File endings read with ``torch.load``."""

MODEL_FILE_SUFFIXES = TORCH_SUFFIXES
"""A MODEL spec with one of these endings and no ``:`` names a whole pickled module."""

_SHOW_KEYS = 5


def _one_line(text: object, limit: int = 300) -> str:
    """Collapse whitespace (and ANSI escapes) so ``text`` fits on one line, cut at ``limit``."""
    s = re.sub(r"\x1b\[[0-9;]*m", "", str(text))
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _error(message: str) -> InputError:
    """An :class:`InputError` whose message is guaranteed to be one line."""
    return InputError(_one_line(message, limit=2000))


def _describe_exc(exc: BaseException) -> str:
    """``"TypeName: first part of the message"`` on one line."""
    msg = _one_line(exc, limit=200)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _show(keys: Sequence[str], n: int = _SHOW_KEYS) -> str:
    """The first ``n`` keys, comma separated, with ``", ..."`` if there are more."""
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def _natural_key(key: str) -> list[Any]:
    """Sort key comparing digit runs numerically (``x2 < x10``)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def _existing_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path that exists and is a regular file, else :class:`InputError`."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(
            c.name
            for c in p.iterdir()
            if c.is_file() and _has_suffix(c, (*TORCH_SUFFIXES, ".safetensors", ".npy", ".npz"))
        )
        hint = f" (it contains: {_show(found)})" if found else ""
        raise _error(f"{what} '{p}' is a directory, not a file; pass the file itself{hint}")
    if not p.exists():
        raise _error(f"{what} '{p}' does not exist; check the path")
    if not p.is_file():
        raise _error(f"{what} '{p}' is not a regular file; pass a file")
    if p.stat().st_size == 0:
        raise _error(f"{what} '{p}' is empty (0 bytes); re-save or re-download it")
    return p
