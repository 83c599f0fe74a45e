"""``normswap compare --batch-sizes``: the batch-size sweep of every target (:class:`BatchSweep`), its
table, JSON and PNG (split from :mod:`normswap.compare`, which runs it).

For the original and every target (after calibration), in training mode, how far a sample's output moves
with the batch it is in — against its eval-mode output and its output alone
(:func:`normswap.checks.batch_dependence`) — and the agreement with the original's eval outputs, per batch size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import InputError

__all__ = ["BATCH_SAMPLES", "DEFAULT_BATCH_SIZES", "ORIGINAL", "BatchSweep", "SweepRow", "batch_sizes_from"]

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
DRIFT_FLOOR = 1e-5  # the drift panel's bottom: float32 rounding (and 0) is drawn on it

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 32)  # ``--batch-sizes default``
BATCH_SAMPLES = 256  # samples each batch size is measured on
ORIGINAL = "original"  # the sweep's row of the original model (its BatchNorms in training mode)


def batch_sizes_from(value: Any) -> list[int]:
    """``"default"``, ``"1,2,8"`` or a sequence of ints → sorted distinct batch sizes ≥ 1; an
    :class:`InputError` naming ``--batch-sizes`` otherwise."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "default":
            return list(DEFAULT_BATCH_SIZES)
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            sizes = [int(p) for p in parts]
        except ValueError:
            raise InputError(f"--batch-sizes '{value}' is not a comma-separated list of integers; "
                             f"e.g. --batch-sizes 1,2,8,32 (or 'default': {','.join(map(str, DEFAULT_BATCH_SIZES))})") from None
    else:
        try:
            sizes = [int(v) for v in value]
        except (TypeError, ValueError):
            raise InputError(f"batch_sizes must be integers, got {value!r}") from None
        if any(isinstance(v, bool) or int(v) != v for v in value):
            raise InputError(f"batch_sizes must be integers, got {value!r}")
    if not sizes:
        raise InputError("--batch-sizes is empty; e.g. --batch-sizes 1,2,8,32")
    bad = [b for b in sizes if b < 1]
    if bad:
        raise InputError(f"--batch-sizes: {bad[0]} is not a batch size; give integers ≥ 1, e.g. 1,2,8,32")
    return sorted(set(sizes))


@dataclass
class SweepRow:
    """One model of the batch-size sweep: the original, or a target after calibration."""

    target: str
    points: list[Any] = field(default_factory=list)  # normswap.checks.BatchPoint, one per batch size
    calibrated: bool = False

    @property
    def label(self) -> str:
        return "original (BN)" if self.target == ORIGINAL else self.target

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "calibrated": self.calibrated, "points": [p.to_dict() for p in self.points]}


def _g(v: float | None) -> str:
    """A compact number for the sweep's cells: 2 decimals from 0.01 up, else one significant digit."""
    if v is None:
        return "—"
    if v == 0:
        return "0"
    if not math.isfinite(v):
        return "inf"
    return f"{v:.2f}" if v >= 0.01 else f"{v:.0e}"


@dataclass
class BatchSweep:
    """The batch-size sweep of :func:`compare_targets` (see :class:`normswap.checks.BatchPoint` for
    what each number is). ``__rich__``: three narrow tables (drift vs eval mode, drift vs alone,
    agreement); :meth:`to_dict`; :meth:`save_plot` (PNG)."""

    batch_sizes: list[int]
    samples: int
    evaluated_on: str
    rows: list[SweepRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plot: str | None = None  # where save_plot wrote the PNG

    def to_dict(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.batch_sizes), "samples": self.samples, "evaluated_on": self.evaluated_on,
                "mode": "training (dropout off)", "rows": [r.to_dict() for r in self.rows], "notes": list(self.notes),
                "plot": self.plot}

    def row(self, target: str) -> SweepRow:
        return next(r for r in self.rows if r.target == target)

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        from .report import Column, FittedTable

        undefined: dict[str, None] = {}

        def cell(p: Any, value: Any) -> Any:
            if not p.defined:
                undefined[p.reason or "torch refused the batch"] = None
                return Text("undef.", style="yellow")
            return value

        def table(title: str, fn: Any) -> FittedTable:
            cols = [Column("target")] + [Column(f"b={b}", justify="right") for b in self.batch_sizes]
            body = []
            for r in self.rows:
                by_b = {p.batch: p for p in r.points}
                body.append([Text(r.label, style="dim" if r.target == ORIGINAL else "")] +
                            [cell(by_b[b], fn(by_b[b])) if b in by_b else "—" for b in self.batch_sizes])
            return FittedTable(cols, body, title=title)

        parts: list[Any] = [
            Text(f"batch-size sweep (training mode, dropout off): {self.samples} samples of {self.evaluated_on}, "
                 "each in one batch of b", style="bold"),
            table("drift from the eval-mode output: ‖y_train − y_eval‖/‖y_eval‖, mean", lambda p: _g(p.drift_eval_mean)),
            table("drift from the output alone (b=1, training mode), mean", lambda p: _g(p.drift_alone_mean)),
        ]
        if any(p.top1_agreement is not None for r in self.rows for p in r.points):
            parts.append(table("top-1 agreement with the original's eval-mode outputs",
                               lambda p: "—" if p.top1_agreement is None else f"{p.top1_agreement:.3f}"))
        else:
            parts.append(table("output rel err against the original's eval-mode outputs", lambda p: _g(p.rel_err)))
        for reason in undefined:
            parts.append(Text(f"undef.: torch refuses the batch in training mode ({reason})", style="dim"))
        if any(r.calibrated for r in self.rows):
            parts.append(Text("targets are measured after calibration; 0 = the output does not depend on the batch", style="dim"))
        parts += [Text(n, style="yellow") for n in self.notes]
        if self.plot:
            parts.append(Text(f"plot: {self.plot}", style="dim"))
        return Group(*parts)

    def save_plot(self, path: str | os.PathLike[str]) -> Path:
        """Batch size (log axis) against the drift from eval mode (left, log axis) and the agreement
        with the original (right), one line per model; written atomically as a PNG."""
        path = _save_sweep_plot(self, path)
        self.plot = str(path)
        return path


def _sweep(original: nn.Module, rows: list[Any], models: dict[str, nn.Module], sizes: list[int], n: int,
           eval_data: list[Any], kind: str, x: Tensor, name: str | None, progress: Any, classifier: bool = True) -> BatchSweep:
    from .checks import batch_dependence, reference_outputs

    notes = []
    if kind == "random":
        g = torch.Generator().manual_seed(1)
        inputs = torch.randn((max(n, max(sizes)), *x.shape[1:]), generator=g)
        where = "random inputs"
    else:
        firsts = []
        have = 0
        for b in eval_data:
            firsts.append(b[0])
            have += len(b[0])
            if have >= n:
                break
        inputs = torch.cat(firsts)[:n]
        where = name or "the held-out data"
        too_big = [b for b in sizes if b > len(inputs)]
        if too_big:
            notes.append(f"batch size(s) {', '.join(map(str, too_big))} skipped: only {len(inputs)} samples")
            sizes = [b for b in sizes if b <= len(inputs)]
    sweep = BatchSweep(batch_sizes=sizes, samples=len(inputs), evaluated_on=where, notes=notes)
    if not sizes:
        return sweep
    ref = reference_outputs(original, inputs)
    for target, model, calibrated in [(ORIGINAL, original, False)] + [(r.target, models[r.target], r.calibrated) for r in rows]:
        with progress.stage("batch", total=len(sizes), detail=f"{target}: training mode at batch {','.join(map(str, sizes))}") as task:
            points = batch_dependence(model, inputs, sizes, reference=ref, task=task)
        if not classifier:  # top-1 means nothing for multilabel / regression / dense outputs: the rel err says it
            for p in points:
                p.top1_agreement = None
        sweep.rows.append(SweepRow(target=target, points=points, calibrated=calibrated))
    return sweep


def _save_sweep_plot(sweep: BatchSweep, path: str | os.PathLike[str]) -> Path:
    from PIL import Image, ImageDraw, ImageFont

    from .atomic import atomic_path

    W, H = 1200, 560
    PW, PH = 400, 360  # each panel's plotting area
    T = 90
    lefts = (90, 90 + PW + 95)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)

    def font(size: int) -> Any:
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1
            return ImageFont.load_default()

    f13, f15, f18 = font(13), font(15), font(18)
    d.text((lefts[0], 14), "How much a sample's output depends on its batch (training mode)", fill="black", font=f18)
    d.text((lefts[0], 42), f"{sweep.samples} samples of {sweep.evaluated_on}; each sample in one batch of b; "
           "dropout off; swapped targets after calibration", fill=(90, 90, 90), font=f13)
    sizes = sweep.batch_sizes
    lx_lo, lx_hi = math.log2(min(sizes)), math.log2(max(sizes))
    if lx_hi == lx_lo:
        lx_lo, lx_hi = lx_lo - 1, lx_hi + 1

    def px(x0: int, b: int) -> float:
        return x0 + 20 + (PW - 40) * (math.log2(b) - lx_lo) / (lx_hi - lx_lo)

    def centered(x: float, y: float, text: str, f: Any, fill: Any = "black") -> None:
        d.text((x - d.textlength(text, font=f) / 2, y), text, fill=fill, font=f)

    def vertical(x: int, ymid: float, text: str, f: Any) -> None:
        tw = math.ceil(d.textlength(text, font=f)) + 4
        label = Image.new("RGBA", (tw, 20), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((0, 0), text, fill="black", font=f)
        rot = label.rotate(90, expand=True)
        img.paste(rot, (x, int(ymid - tw / 2)), rot)

    def frame(x0: int, title: str, ylabel: str, ticks: list[tuple[float, str]], py: Any) -> None:
        d.rectangle([x0, T, x0 + PW, T + PH], outline="black")
        centered(x0 + PW / 2, T - 24, title, f15)
        for v, text in ticks:
            yy = py(v)
            d.line([x0, yy, x0 + PW, yy], fill=(228, 228, 228))
            d.line([x0 - 5, yy, x0, yy], fill="black")
            d.text((x0 - 8 - d.textlength(text, font=f13), yy - 7), text, fill="black", font=f13)
        for b in sizes:
            xx = px(x0, b)
            d.line([xx, T, xx, T + PH], fill=(240, 240, 240))
            d.line([xx, T + PH, xx, T + PH + 5], fill="black")
            centered(xx, T + PH + 8, str(b), f13)
        centered(x0 + PW / 2, T + PH + 28, "batch size b (log scale)", f13)
        vertical(x0 - 72, T + PH / 2, ylabel, f13)

    def series(x0: int, get: Any, py: Any) -> None:
        k = len(sweep.rows)
        for i, r in enumerate(sweep.rows):  # widest first, so lines drawn on top of each other all show
            col = _PALETTE[i % len(_PALETTE)]
            w = 2 + 2 * (k - 1 - i)
            pts = [(px(x0, p.batch), py(v)) for p in r.points if p.defined and (v := get(p)) is not None]
            if len(pts) > 1:
                d.line(pts, fill=col, width=w, joint="curve")
            rad = 3 + (k - 1 - i)
            for xx, yy in pts:
                d.ellipse([xx - rad, yy - rad, xx + rad, yy + rad], fill=col)
            for p in r.points:  # undefined: a cross above the x axis, one row per model that is
                if not p.defined:
                    nth = [q.target for q in sweep.rows if any(not t.defined and t.batch == p.batch for t in q.points)].index(r.target)
                    xx, yy = px(x0, p.batch), T + PH - 34 - 16 * nth
                    d.line([xx - 6, yy - 6, xx + 6, yy + 6], fill=col, width=3)
                    d.line([xx - 6, yy + 6, xx + 6, yy - 6], fill=col, width=3)

    # left: drift from eval mode, log y
    vals = [p.drift_eval_mean for r in sweep.rows for p in r.points if p.defined and p.drift_eval_mean]
    lo = math.log10(DRIFT_FLOOR)
    hi = max(0, math.ceil(math.log10(max(vals)))) if vals else 0

    def py_drift(v: float) -> float:
        lv = math.log10(max(v, DRIFT_FLOOR))
        return T + PH - 8 - (PH - 16) * (lv - lo) / (hi - lo)

    ticks = [(10.0 ** e, f"1e{e}" if e else "1") for e in range(int(lo), hi + 1)]
    ticks[0] = (DRIFT_FLOOR, "<=1e-5")
    frame(lefts[0], "drift from the eval-mode output", "mean |y_train - y_eval| / |y_eval|", ticks, py_drift)
    series(lefts[0], lambda p: p.drift_eval_mean, py_drift)

    # right: agreement with the original (or output rel err when there are no logits)
    agree = any(p.top1_agreement is not None for r in sweep.rows for p in r.points)
    x0 = lefts[1]
    if agree:
        av = [p.top1_agreement for r in sweep.rows for p in r.points if p.defined and p.top1_agreement is not None]
        step = 0.05 if min(av) >= 0.6 else 0.1
        alo = max(0.0, math.floor((min(av) - 1e-9) / step) * step)
        alo = min(alo, 1.0 - step)

        def py_agree(v: float) -> float:
            return T + PH - 8 - (PH - 16) * (v - alo) / (1.0 - alo)

        n_ticks = int(round((1.0 - alo) / step))
        ticks = [(alo + i * step, f"{alo + i * step:.2f}") for i in range(n_ticks + 1)]
        frame(x0, "top-1 agreement with the original (eval)", "top-1 agreement", ticks, py_agree)
        series(x0, lambda p: p.top1_agreement, py_agree)
    else:
        ev = [p.rel_err for r in sweep.rows for p in r.points if p.defined and p.rel_err]
        elo = math.floor(math.log10(min(ev))) if ev else -7
        ehi = math.ceil(math.log10(max(ev))) if ev else 0
        ehi = ehi if ehi > elo else elo + 1

        def py_err(v: float) -> float:
            lv = math.log10(max(v, 10.0 ** elo))
            return T + PH - 8 - (PH - 16) * (lv - elo) / (ehi - elo)

        frame(x0, "output rel err vs the original (eval)", "|y_train - y_orig| / |y_orig|",
              [(10.0 ** e, f"1e{e}") for e in range(elo, ehi + 1)], py_err)
        series(x0, lambda p: p.rel_err, py_err)

    # legend
    lx = lefts[1] + PW + 30
    d.text((lx, T - 24), "model", fill="black", font=f15)
    for i, r in enumerate(sweep.rows):
        col = _PALETTE[i % len(_PALETTE)]
        ly = T + 6 + 26 * i
        d.line([lx, ly + 8, lx + 26, ly + 8], fill=col, width=4)
        d.text((lx + 34, ly), r.label, fill="black", font=f13)
    ly = T + 6 + 26 * len(sweep.rows) + 10
    if any(not p.defined for r in sweep.rows for p in r.points):
        d.line([lx + 7, ly + 2, lx + 19, ly + 14], fill="black", width=3)
        d.line([lx + 7, ly + 14, lx + 19, ly + 2], fill="black", width=3)
        d.text((lx + 34, ly), "undefined: torch", fill="black", font=f13)
        d.text((lx + 34, ly + 16), "refuses the batch", fill="black", font=f13)
        ly += 44
    for j, text in enumerate(("drift <= 1e-5 (float32", "rounding, or 0): the", "output does not depend", "on the batch")):
        d.text((lx, ly + 16 * j), text, fill=(90, 90, 90), font=f13)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
