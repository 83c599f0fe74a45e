"""The conversion report: one JSON document and rich tables for the terminal."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from rich.table import Table

__all__ = ["sites_table", "build_report"]

_STYLE = {
    "into-producer": "green",
    "into-producer-copy": "green",
    "into-consumer": "green",
    "affine": "yellow",
    "refuse": "red",
}


def sites_table(rows: Iterable[Mapping[str, Any]], title: str = "norm sites") -> Table:
    """One row per site: name, type, producer, action, target, why."""
    t = Table(title=title, title_justify="left", show_lines=False)
    rows = list(rows)
    with_producer = any("producer" in r for r in rows)
    cols = ("site", "type", "producer", "action", "into", "why / notes") if with_producer else ("site", "type", "action", "into", "why / notes")
    for col in cols:
        t.add_column(col, overflow="fold")
    for r in rows:
        action = str(r.get("action", ""))
        style = _STYLE.get(action, "green" if r.get("exact") else "cyan")
        why = r.get("reason") or ""
        if r.get("notes"):
            why = "; ".join([why, *r["notes"]]) if why else "; ".join(r["notes"])
        cells = [str(r.get("site") or r.get("name")), str(r.get("type", ""))]
        if with_producer:
            cells.append(str(r.get("producer", "") or ""))
        cells += [f"[{style}]{action}[/]", str(r.get("target") or ""), why]
        t.add_row(*cells)
    return t


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
