"""Progress of a pipeline's stages: a protocol the library calls, a silent default, and a rich one.

The library reports; it never decides where progress goes. ``normswap convert`` passes
:class:`RichProgress` on a terminal (a live spinner or bar per stage, then one line per finished
stage with its time, the way ``uv`` and ``pip`` show theirs) and :class:`NullProgress` for ``--json``,
pipes and CI logs, which get no progress noise.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

__all__ = ["Progress", "StageTask", "NullProgress", "RichProgress"]


class StageTask(Protocol):
    def advance(self, n: int = 1, **fields: Any) -> None:
        """``n`` more units of the stage are done; ``fields`` are shown beside the bar (e.g. loss)."""


class Progress(Protocol):
    def stage(self, name: str, *, total: int | None = None, detail: str = "") -> Any:
        """A context manager around one stage (yields a :class:`StageTask`); ``total`` units when the
        stage can count its work (calibration batches, recovery steps), else a spinner."""

    def note(self, text: str) -> None:
        """A line worth showing while the stages run (e.g. the random-weights warning)."""


class _NullTask:
    def advance(self, n: int = 1, **fields: Any) -> None:
        pass


class NullProgress:
    """Shows nothing (library default, ``--json``, pipes)."""

    @contextmanager
    def stage(self, name: str, *, total: int | None = None, detail: str = "") -> Iterator[StageTask]:
        yield _NullTask()

    def note(self, text: str) -> None:
        pass


class _RichTask:
    def __init__(self, progress: Any, task: Any) -> None:
        self._p, self._t = progress, task

    def advance(self, n: int = 1, **fields: Any) -> None:
        self._p.update(self._t, advance=n, **({"info": "  ".join(f"{k} {v}" for k, v in fields.items())} if fields else {}))


class RichProgress:
    """A transient spinner/bar while a stage runs, then ``✓ stage  1.23s  detail`` on its own line."""

    def __init__(self, console: Any) -> None:
        self.console = console

    @contextmanager
    def stage(self, name: str, *, total: int | None = None, detail: str = "") -> Iterator[StageTask]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        cols: list[Any] = [SpinnerColumn(), TextColumn(f"{name:<10}")]
        if total:
            cols += [BarColumn(bar_width=24), MofNCompleteColumn()]
        cols += [TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
        t0 = time.perf_counter()
        mark = "[red]✗[/]"  # a stage that raised still gets its line, marked as failed
        try:
            with Progress(*cols, console=self.console, transient=True) as p:
                task = p.add_task(name, total=total, info=detail)
                yield _RichTask(p, task)
            mark = "[green]✓[/]"
        finally:
            self.console.print(f"{mark} {name:<10} {time.perf_counter() - t0:6.2f}s  {detail}".rstrip(), highlight=False)

    def note(self, text: str) -> None:
        self.console.print(f"[yellow]![/] {text}", highlight=False)
