"""The conversion report: one JSON document and rich tables for the terminal."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

__all__ = ["sites_table", "build_report", "Column", "FittedTable"]

_STYLE = {
    "into-producer": "green",
    "into-producer-copy": "green",
    "into-consumer": "green",
    "into-producers": "green",  # a BN after cat(): each channel slice folded into its own producer
    "merged": "green",  # RepVGG/MobileOne branches re-parameterized into one conv
    "ws-baked": "green",
    "affine": "yellow",
    "refuse": "red",
    "kept": "yellow",
}


def sites_table(rows: Iterable[Mapping[str, Any]], title: str = "norm sites") -> FittedTable:
    """One row per site: name, type, producer, action, target, why.

    Fits the console: names stay whole; the producer and type columns go first when narrow, and a
    reason longer than a short phrase becomes a numbered footnote below the table."""
    rows = list(rows)
    with_producer = any("producer" in r for r in rows)
    notes: dict[str, int] = {}
    body: list[list[Any]] = []
    for r in rows:
        action = str(r.get("action", ""))
        style = _STYLE.get(action, "green" if r.get("exact") else "cyan")
        why = r.get("reason") or ""
        if r.get("notes"):
            why = "; ".join([why, *r["notes"]]) if why else "; ".join(r["notes"])
        if len(why) > _INLINE_NOTE:
            why = f"({notes.setdefault(why, len(notes) + 1)})"
        cells: list[Any] = [str(r.get("site") or r.get("name")), str(r.get("type", ""))]
        if with_producer:
            cells.append(str(r.get("producer", "") or ""))
        cells += [Text(action, style=style), str(r.get("target") or ""), why]
        body.append(cells)
    cols = [Column("site"), Column("type", drop=2)]
    if with_producer:
        cols.append(Column("producer", drop=3))
    cols += [Column("action"), Column("into", drop=1), Column("why", fold=True)]
    foot = [Text(f"({i}) {n}") for n, i in notes.items()]
    return FittedTable(cols, body, title=title, footnotes=foot)


_INLINE_NOTE = 24  # a reason longer than this moves to a footnote


@dataclass
class Column:
    """One column of a :class:`FittedTable`. ``drop``: 0 = always shown; when the table is too wide
    for the console the column with the highest ``drop`` goes first. ``fold``: free text that may
    wrap (every other column is one unbroken line per cell). ``why``: said when the column is hidden."""

    header: str
    justify: str = "left"
    fold: bool = False
    drop: int = 0
    why: str = ""


class FittedTable:
    """A table that fits the console it is printed on: it measures its cells, hides optional columns
    (highest ``drop`` first) until every value fits whole, says which it hid, and prints its
    footnotes below. Cells are plain strings (never markup) or :class:`rich.text.Text`."""

    FOLD_MIN = 16  # a free-text column is counted at most this wide: it wraps

    def __init__(self, columns: Sequence[Column], rows: Sequence[Sequence[Any]], *, title: str | None = None,
                 footnotes: Sequence[Any] = (), caption: str | None = None) -> None:
        self.columns = list(columns)
        self.rows = [[c if isinstance(c, Text) else Text(str(c)) for c in r] for r in rows]
        self.title = title
        self.footnotes = list(footnotes)
        self.caption = caption

    def _width(self, i: int) -> int:
        col = self.columns[i]
        w = max([cell_len(line) for line in col.header.split("\n")] +
                [max(cell_len(line) for line in r[i].plain.split("\n")) for r in self.rows])
        return min(w, self.FOLD_MIN) if col.fold else w

    def layout(self, max_width: int) -> tuple[list[int], bool]:
        """(indices of the columns shown, boxed?) at ``max_width`` cells: every column in a box when it
        fits, else without the box (two spaces between columns), else fewer columns."""
        keep = list(range(len(self.columns)))
        widths = {i: self._width(i) for i in keep}
        while True:
            content = sum(widths[i] for i in keep)
            if content + 3 * len(keep) + 1 <= max_width:
                return keep, True
            optional = [i for i in keep if self.columns[i].drop > 0]
            if content + 2 * (len(keep) - 1) <= max_width or not optional:
                return keep, False
            keep.remove(max(optional, key=lambda i: (self.columns[i].drop, i)))

    def table(self, max_width: int) -> Table:
        keep, boxed = self.layout(max_width)
        kw: dict[str, Any] = {} if boxed else {"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False,
                                               "collapse_padding": True}
        t = Table(show_lines=False, **kw)
        for i in keep:
            c = self.columns[i]
            t.add_column(c.header, justify=c.justify, no_wrap=not c.fold, overflow="fold" if c.fold else "ellipsis")  # type: ignore[arg-type]
        for r in self.rows:
            t.add_row(*[r[i] for i in keep])
        return t

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        keep, _ = self.layout(options.max_width)
        if self.title:
            yield Text(self.title, style="table.title")
        yield self.table(options.max_width)
        for n in self.footnotes:
            yield n if isinstance(n, Text) else Text(str(n))
        hidden = [c for i, c in enumerate(self.columns) if i not in keep]
        if hidden:
            what = ", ".join(c.header.replace("\n", " ") + (f" ({c.why})" if c.why else "") for c in hidden)
            yield Text(f"not shown at {options.max_width} columns: {what}; widen the terminal or use --json", style="dim")
        if self.caption:
            yield Text(self.caption, style="dim")


def build_report(
    conversion: Any,
    *,
    model: Mapping[str, Any],
    export: Any = None,
    parity: Any = None,
    timings: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON report of one ``normswap convert`` run."""
    rep: dict[str, Any] = {"model": dict(model), **conversion.to_dict()}
    if export is not None:
        rep["onnx"] = export.to_dict()
    if parity is not None:
        rep["parity"] = parity.to_dict()
        rep["passed"] = bool(parity)
    else:
        rep["parity"] = None
        rep["passed"] = None  # nothing had to match (a function-changing swap, not exported)
    if timings:
        rep["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    if extra:
        rep.update(extra)
    return rep
