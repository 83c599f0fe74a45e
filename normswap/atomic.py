"""Atomic file output: write beside the destination, then ``os.replace`` into place.

A reader of the destination sees either the old file or the complete new one, never a
partial write; on any failure (including ``KeyboardInterrupt``) the temporary is removed and
the destination is left as it was.

A process killed outright (SIGKILL, power loss) cannot clean up, so every temporary is named
``.NAME.normswap-<pid>-<random>.tmp`` (or ``.tmpdir``): the next :func:`atomic_path` / :func:`staging_dir`
for the same destination removes the leftovers of writers that are no longer running.

    with atomic_path("report.json") as tmp:      # tmp is in the same folder as report.json
        tmp.write_text(...)
    atomic_write_text("report.json", text)        # the same, for the common case
    with staging_dir("model.onnx") as d:          # several files; move them yourself
        ...; os.replace(d / "model.onnx", "model.onnx")
"""

from __future__ import annotations

import os
import re
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


def _prefix(name: str) -> str:
    """The start of every temporary this process makes for destination ``name``."""
    return f".{name}.normswap-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid <= 0 or os.name == "nt":  # not a pid we wrote; on Windows os.kill(pid, 0) is not a probe
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def clean_leftovers(parent: Path, name: str) -> list[Path]:
    """Remove ``.NAME.normswap-PID-*.tmp`` / ``.tmpdir`` in ``parent`` left by a writer (PID) that is
    no longer running (e.g. killed by SIGKILL mid-write); returns what was removed. Temporaries of
    live processes, including this one, are kept."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.normswap-(\d+)-[A-Za-z0-9_]+\.(?:tmp|tmpdir)$")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for e in entries:
        m = pattern.match(e.name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        p = Path(e.path)
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except FileNotFoundError:  # another process cleaned it first
            pass
        except OSError:  # not ours to remove (permissions): leave it
            pass
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit move it onto ``path``.

    The body writes to the yielded path (it exists, empty). If the body raises, the temporary
    is deleted and ``path`` is untouched. If the body deletes the temporary, nothing is moved.
    """
    dest = Path(path)
    parent = _parent(dest)
    clean_leftovers(parent, dest.name)
    fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=_prefix(dest.name), suffix=".tmp")
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
    clean_leftovers(parent, dest.name)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=_prefix(dest.name), suffix=".tmpdir"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
