"""Atomic file output: write beside the destination, then ``os.replace`` into place.

A reader of the destination sees either the old file or the complete new one, never a
partial write; on any failure (including ``KeyboardInterrupt``) the temporary is removed and
the destination is left as it was.

    with atomic_path("report.json") as tmp:      # tmp is in the same folder as report.json
        tmp.write_text(...)
    atomic_write_text("report.json", text)        # the same, for the common case
    with staging_dir("model.onnx") as d:          # several files; move them yourself
        ...; os.replace(d / "model.onnx", "model.onnx")
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_bytes", "staging_dir", "default_file_mode"]


def default_file_mode() -> int:
    """The mode a freshly created file gets under the current umask (0o666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _parent(path: Path) -> Path:
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit move it onto ``path``.

    The body writes to the yielded path (it exists, empty). If the body raises, the temporary
    is deleted and ``path`` is untouched. If the body deletes the temporary, nothing is moved.
    """
    dest = Path(path)
    parent = _parent(dest)
    fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            if dest.exists():
                mode = dest.stat().st_mode & 0o7777
            else:
                mode = default_file_mode()
            os.chmod(tmp, mode)
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (flushed and fsynced before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextmanager
def staging_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory in the folder of ``path``; always removed on exit.

    For outputs made of several files: build them inside, then ``os.replace`` each into place
    (same filesystem, so the rename is atomic per file). Whatever is left inside is discarded.
    """
    dest = Path(path)
    parent = _parent(dest)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{dest.name}.", suffix=".tmpdir"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
