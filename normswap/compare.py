"""Compare norm targets on one model: what each swap costs and keeps.

:func:`compare_targets` rewrites the model to every requested target (``"fold"`` included) and measures,
per target:

* ``params`` — the parameter count of the rewritten model;
* ``latency_vs_fold`` — onnxruntime CPU latency at batch 1 relative to the BN-folded model (each exported
  with :func:`normswap.export_onnx`; timed round-robin, best of several rounds, so load on the machine
  hits all targets alike);
* ``agreement`` / ``rel_err`` — the output kind's quality (:mod:`normswap.keep.kinds`: top-1 agreement for a
  classifier, label agreement for multilabel, R² for regression, pixel agreement for dense; all its
  measures in ``measures``) and the output relative error against the original, on held-out data
  (``heldout``, else 20% of ``calib`` held out by a seeded split — calibration fits the rest), after
  calibration when calibration data is given (else of the naive swap, on random inputs);
* ``drift_mean`` / ``drift_max`` — the per-layer drift (:func:`normswap.keep.calibrate.layer_drift`);
* ``batch_independent`` — :func:`normswap.checks.batch_independence`: in *training* mode, a sample's
  output alone vs inside a batch of 8 (dropout off), max relative difference ≤ 1e-4;
* ``exact`` — whether the target promises the original's eval function, and the measured max relative
  error of the naive rewrite against the original.

With ``batch_sizes`` it also sweeps the batch size (:class:`BatchSweep`, :func:`normswap.checks.batch_dependence`):
for the original and every target (after calibration), in training mode, how far a sample's output moves
with the batch it is in — against its eval-mode output and its output alone — and the agreement with the
original's eval outputs, per batch size; a table, JSON and a PNG (:meth:`BatchSweep.save_plot`).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .keep.calibrate import agreement_and_drift, calibrate
from .load.data import as_batches
from .errors import InputError, NormswapError

__all__ = ["BatchSweep", "CompareReport", "CompareRow", "SweepRow", "compare_targets", "DEFAULT_BATCH_SIZES", "batch_sizes_from"]


@dataclass
class CompareRow:
    target: str
    status: str = "ok"  # ok | failed
    note: str | None = None
    swapped: int = 0
    refused: int = 0
    params: int | None = None
    latency_ms: float | None = None
    latency_vs_fold: float | None = None
    agreement: float | None = None
    rel_err: float | None = None
    drift_mean: float | None = None
    drift_max: float | None = None
    batch_independent: bool | None = None
    batch_rel_diff: float | None = None
    exact_promised: bool | None = None
    naive_rel_err: float | None = None
    calibrated: bool = False
    measures: dict[str, float | None] = field(default_factory=dict)  # every measure of the output kind
    plain_gn: int = 0  # gn-ws: sites that got GN without weight standardization (no plain conv feeds only that BN)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["measures"] = {k: None if v is None else float(f"{v:.6g}") for k, v in self.measures.items()}
        for k in ("latency_ms", "latency_vs_fold", "agreement", "rel_err", "drift_mean", "drift_max", "batch_rel_diff", "naive_rel_err"):
            if d[k] is not None:
                d[k] = float(f"{d[k]:.6g}")
        return d


LATENCY_BUDGET = 2.0  # the recommendation's limit: onnxruntime latency ≤ this × the folded model's

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


@dataclass
class CompareReport:
    model: str
    input_shape: list[int]
    evaluated_on: str
    rows: list[CompareRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    runtime: dict[str, Any] | None = None  # where calibration and the measures ran, how data was read
    eval_data: str = "held-out"  # held-out | calibration | random: what ``evaluated_on`` is
    latency_budget: float = LATENCY_BUDGET
    batch_sweep: BatchSweep | None = None  # with ``compare_targets(..., batch_sizes=...)``
    measure: str = "top-1 agreement"  # what ``agreement`` is: the output kind's quality
    output_kind: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"model": self.model, "input_shape": self.input_shape, "evaluated_on": self.evaluated_on,
             "eval_data": self.eval_data, "measure": self.measure, "output_kind": self.output_kind, "targets": [r.to_dict() for r in self.rows], "notes": list(self.notes), "runtime": self.runtime,
             "latency_budget": self.latency_budget, "recommendation": self.recommendation()}
        if self.batch_sweep is not None:
            d["batch_sweep"] = self.batch_sweep.to_dict()
        return d

    def recommended(self) -> CompareRow | None:
        """Among the batch-independent norm targets that worked (``fold`` is the baseline, not a norm),
        the best quality — the output kind's measure (:attr:`measure`) when measured, else the lowest output
        relative error — within :attr:`latency_budget` × the fold latency when latency was measured."""
        return self._pick()[0]

    def _pick(self) -> tuple[CompareRow | None, str]:
        # fold and the exact targets (frozen, bin, wn, ...) keep the trained function by construction but
        # do not renormalise while training: the question compare answers is which *new* norm to train with
        ok = [r for r in self.rows if r.status == "ok" and r.target != "fold" and not r.exact_promised]
        if not ok:
            return None, "no recommendation: no function-changing norm target (gn, gn-ws, ln, …) was compared successfully"
        indep = [r for r in ok if r.batch_independent]
        if not indep:
            return None, f"no recommendation: none of the compared norm targets ({', '.join(r.target for r in ok)}) is batch-independent"
        timed = any(r.latency_vs_fold is not None for r in self.rows)
        budget = self.latency_budget
        if timed:
            fits = [r for r in indep if r.latency_vs_fold is not None and r.latency_vs_fold <= budget]
            if not fits:
                over = ", ".join(f"{r.target} {r.latency_vs_fold:.2f}×" if r.latency_vs_fold is not None else f"{r.target} not timed"
                                 for r in indep)
                return None, (f"no recommendation: every batch-independent target is over the {budget:.1f}× fold latency "
                              f"budget or untimed ({over})")
        else:
            fits = indep
        by_agreement = any(r.agreement is not None for r in fits)
        inf = float("inf")

        def key(r: CompareRow) -> tuple[float, float, float]:
            agr = -(r.agreement if r.agreement is not None else -inf) if by_agreement else 0.0
            return (agr, r.rel_err if r.rel_err is not None else inf, r.latency_vs_fold or inf)

        best = min(fits, key=key)
        how = "exact" if best.exact_promised else ("calibrated" if best.calibrated else "naive swap")
        data = {"held-out": "held-out", "calibration": "on the calibration data", "random": "on random inputs"}.get(self.eval_data, self.eval_data)
        if by_agreement and best.agreement is not None:
            quality = f"best {self.measure} {best.agreement:.4f}"
        else:
            quality = "lowest output rel err " + ("—" if best.rel_err is None else f"{best.rel_err:.2g}")
        line = f"recommended: {best.target} — {quality} ({how}, {data}) among batch-independent targets"
        if timed:
            line += f" within the {budget:.1f}× fold latency budget ({best.latency_vs_fold:.2f}×)"
            over = [r for r in indep if r not in fits]
            better = [r for r in over if by_agreement and r.agreement is not None and best.agreement is not None
                      and r.agreement > best.agreement]
            if better:
                b = max(better, key=lambda r: r.agreement or 0.0)
                line += (f"; {b.target} scores higher ({b.agreement:.4f}) but costs {b.latency_vs_fold:.2f}× "
                         f"(over budget: --latency-budget {math.ceil((b.latency_vs_fold or 0) * 10) / 10:.1f} admits it)")
        else:
            line += " (latency not measured)"
        return best, line

    def recommendation(self) -> str:
        """One line: the recommended target and why, or why there is none."""
        return self._pick()[1]

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        from .report import Column, FittedTable

        def f(v: float | None, fmt: str) -> str:
            return "—" if v is None else format(v, fmt)

        def sci(v: float | None) -> str:
            return "—" if v is None else ("0" if v == 0 else f"{v:.1e}")

        def count(n: int | None) -> str:
            if n is None:
                return "—"
            for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
                if n >= div:
                    v = n / div  # 4 significant digits, zeros kept: 11.70M, 159.8k
                    return f"{v:.{max(0, 3 - len(str(int(v))) + 1)}f}{unit}"
            return str(n)

        notes: dict[str, int] = {}
        failures: set[str] = set()

        def ref(note: str) -> str:
            return f"({notes.setdefault(note, len(notes) + 1)})"

        rows: list[list[Any]] = []
        best = self.recommended()
        for r in self.rows:
            name = Text(r.target, style="bold" if r is best else "")
            if r.status != "ok":
                failures.add(note := f"{r.target} failed: {r.note or 'no reason given'}")
                rows.append([name, "", "", "", Text(f"failed {ref(note)}", style="red"), "", "", "", "", ""])
                continue
            sites = f"{r.swapped}"
            if r.note:
                sites += f" {ref(f'{r.target}: {r.note}')}"
            if r.refused:
                sites = f"{r.swapped} {ref(f'{r.target}: {r.refused} site(s) refused, left as they were')}"
            if r.plain_gn:
                sites += f" {ref(f'{r.target}: {r.plain_gn} of them got GN without weight standardization (no plain conv feeds only that BN)')}"
            if r.batch_independent is None:
                bi: Any = "—"
            elif r.batch_independent:
                bi = Text("yes", style="green")
            else:
                bi = Text.assemble(("no", "yellow"), f" {sci(r.batch_rel_diff)}")
            ex: Any = "—" if r.exact_promised is None else (Text("yes", style="green") if r.exact_promised else "no")
            agr = f(r.agreement, ".4f") + ("*" if r.calibrated else "")
            lat = f(r.latency_vs_fold, ".2f") + "×" if r.latency_vs_fold else "—"
            rows.append([name, sites, count(r.params), lat, agr, sci(r.rel_err),
                         f"{f(r.drift_mean, '.3f')}/{f(r.drift_max, '.3f')}", bi, ex, sci(r.naive_rel_err)])
        columns = [
            Column("target"),
            Column("sites", justify="right", drop=1),
            Column("params", justify="right", drop=4),
            Column("ORT\nlatency", justify="right"),
            Column(self.measure.replace(" ", "\n", 1), justify="right"),
            Column("out rel\nerr", justify="right"),
            Column("drift\nmean/max", justify="right", drop=5),
            Column("batch-\nindep.", justify="left"),
            Column("exact", justify="left"),
            Column("naive\nrel err", justify="right", drop=6),
        ]
        foot: list[Any] = [Text(f"({i}) {n}", style="red" if n in failures else "dim") for n, i in notes.items()]
        if any(r.calibrated for r in self.rows):
            foot.append(Text(f"* after calibration; {self.measure} and out rel err are against the original on "
                             f"{self.evaluated_on}; ORT latency is relative to fold", style="dim"))
        else:
            foot.append(Text(f"{self.measure} and out rel err are against the original on {self.evaluated_on}; "
                             "ORT latency is relative to fold", style="dim"))
        if self.output_kind:
            foot.append(Text(self.output_kind, style="dim"))
        table = FittedTable(columns, rows, title=f"{self.model}: norm targets compared", footnotes=foot)
        line = self.recommendation()
        rec = Text(line, style="bold green" if best is not None else "yellow")
        sweep = [Text(""), self.batch_sweep] if self.batch_sweep is not None else []
        return Group(table, *[Text(n, style="yellow") for n in self.notes], rec, *sweep)


def _time_sessions(paths: dict[str, Path], x: Tensor, runs: int, rounds: int, threads: int, task: Any = None) -> dict[str, float]:
    from .parity import make_session, session_feed

    sessions = {k: make_session(p, threads=threads) for k, p in paths.items()}
    feeds = {k: session_feed(s, (x,)) for k, s in sessions.items()}
    for k, s in sessions.items():  # warm up
        for _ in range(3):
            s.run(None, feeds[k])
    best: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(runs):
                s.run(None, feeds[k])
            best[k].append((time.perf_counter() - t0) / runs)
        if task is not None:
            task.advance(1)
    return {k: min(v) * 1e3 for k, v in best.items()}


def compare_targets(
    original: nn.Module,
    targets: Sequence[str],
    example_inputs: Any,
    *,
    calib: Any = None,
    heldout: Any = None,
    heldout_name: str | None = None,
    groups: int | None = None,
    latency: bool = True,
    runs: int = 20,
    rounds: int = 5,
    threads: int = 1,
    model_name: str = "model",
    latency_budget: float = LATENCY_BUDGET,
    progress: Any = None,
    batch_sizes: Sequence[int] | str | None = None,
    batch_samples: int = BATCH_SAMPLES,
    output_kind: Any = None,
    heldout_fraction: float | None = None,
    split_seed: int | None = None,
    device: Any = None,
) -> CompareReport:
    """Rewrite ``original`` to each of ``targets`` and measure them (see the module docstring).

    ``example_inputs``: the example input (batch 1 is used for latency). ``calib``: calibration batches
    (non-exact targets are calibrated on them); ``heldout``: batches for agreement/drift (default:
    ``calib``, else 8 random inputs of the example's shape). ``latency_budget``: the recommendation's limit, ×
    the folded model's onnxruntime latency. ``progress``: a :class:`normswap.progress.Progress` — one
    stage per target, then one for the latency timing (default :class:`~normswap.progress.NullProgress`).
    ``batch_sizes`` (e.g. ``[1, 2, 8, 32]`` or ``"default"``): also sweep the batch size over the original and
    every target that worked, on the first ``batch_samples`` samples of the held-out data (random inputs
    when there is none) → :attr:`CompareReport.batch_sweep`. ``device``: where calibration and the agreement
    measures run (a copy of ``original`` goes there; rewrites, latency and the sweep stay on the CPU)."""
    from .rewriting.convert import targets as all_targets
    from .export import export_onnx
    from .progress import NullProgress

    progress = progress or NullProgress()

    x = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    if not isinstance(x, Tensor):
        raise InputError("compare needs an example input tensor")
    known = all_targets()
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise InputError(f"unknown target(s) {', '.join(unknown)}; choose from: {', '.join(known)}")
    targets = list(dict.fromkeys(targets))
    sizes = None if batch_sizes is None else batch_sizes_from(batch_sizes)
    if sizes is not None and (isinstance(batch_samples, bool) or int(batch_samples) != batch_samples or batch_samples < 1):
        raise InputError(f"--batch-samples {batch_samples} must be a positive integer")
    x1 = x[:1]
    kind = "held-out"
    if heldout is None and calib is not None and heldout_fraction != 0:
        from .keep.heldout import HELDOUT_FRACTION, HELDOUT_SEED, split_heldout

        split = split_heldout(calib, HELDOUT_FRACTION if heldout_fraction is None else heldout_fraction,
                              HELDOUT_SEED if split_seed is None else split_seed)
        calib, heldout, heldout_name = split.calib, split.heldout, heldout_name or split.describe()
    if heldout is None and calib is not None:
        heldout, heldout_name, kind = calib, heldout_name or "the calibration data (not held out)", "calibration"
    if heldout is None:
        g = torch.Generator().manual_seed(0)
        heldout = [torch.randn((8, *x.shape[1:]), generator=g)]
        heldout_name, kind = "8 random inputs (no --calib: naive swaps)", "random"
    eval_data = list(as_batches(heldout))
    from .keep.kinds import detect

    outputs = detect(original, eval_data, output_kind, max_batches=1)
    rep = CompareReport(model=model_name, input_shape=list(x.shape), evaluated_on=heldout_name or "held-out data",
                        eval_data=kind, latency_budget=latency_budget, measure=outputs.label,
                        output_kind=outputs.describe())
    models: dict[str, nn.Module] = {}
    for t in (["fold"] if latency and "fold" not in targets else []) + targets:
        with progress.stage(t, detail="" if t in targets else "latency reference") as task:
            row = _measure(original, t, t in targets, x, x1, known, calib, eval_data, groups, models, task, outputs,
                           device=device)
        if row is not None:
            rep.rows.append(row)
    same = [r.target for r in rep.rows if r.status == "ok" and r.target != "fold" and not r.swapped and not r.refused]
    if same:
        rep.notes.append(f"{', '.join(same)}: no site swapped (the model has no BatchNorm): these rows are the original "
                         "model, and their ORT latency is the original's against fold")
    if latency and "fold" in models:
        with tempfile.TemporaryDirectory(prefix="normswap-compare-") as td:
            paths: dict[str, Path] = {}
            with progress.stage("export", total=len(models), detail="ONNX, for the latency timing") as task:
                for t, m in models.items():
                    try:
                        res = export_onnx(m, (x1,), Path(td) / f"{t}.onnx")
                        paths[t] = Path(res.path)
                    except NormswapError as e:
                        rep.notes.append(f"{t}: ONNX export failed ({e}); no latency")
                    task.advance(1)
            if "fold" in paths:
                with progress.stage("latency", total=rounds, detail=f"onnxruntime, {len(paths)} models") as task:
                    ms = _time_sessions(paths, x1, runs, rounds, threads, task)
                for r in rep.rows:
                    if r.target in ms:
                        r.latency_ms = ms[r.target]
                        r.latency_vs_fold = ms[r.target] / ms["fold"]
                rep.notes.append(f"onnxruntime CPU, batch 1, {threads} thread(s), best of {rounds} rounds × {runs} runs; "
                                 f"fold = {ms['fold']:.3f} ms")
    elif latency:
        from .compare_fold import needs_calib_message
        from .keep.norm_fit import norm_site_names

        n = len(norm_site_names(original))
        if "fold" in targets:
            why = " (see the fold row's note)"
        else:
            why = f": {needs_calib_message(n)}" if n and calib is None else ""
        rep.notes.append(f"the fold rewrite failed: no latency reference{why}")
    if sizes is not None:
        rep.batch_sweep = _sweep(original, [r for r in rep.rows if r.status == "ok"], models, sizes, batch_samples,
                                 eval_data, kind, x, heldout_name, progress,
                                 classifier=outputs.kind.name in ("logits", "probabilities"))
    return rep


def _sweep(original: nn.Module, rows: list[CompareRow], models: dict[str, nn.Module], sizes: list[int], n: int,
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


def _measure(original: nn.Module, t: str, wanted: bool, x: Tensor, x1: Tensor, known: dict[str, Any], calib: Any,
             eval_data: list[Any], groups: int | None, models: dict[str, nn.Module], task: Any,
             outputs: Any = None, device: Any = None) -> CompareRow | None:
    """Rewrite to target ``t`` and measure it (its model goes into ``models`` for the timing); None for
    the fold latency reference the caller did not ask for."""
    from .checks import batch_independence
    from .rewriting.convert import rewrite

    row = CompareRow(target=t)
    fitted = None
    try:
        if t == "fold":  # per-sample norms: fitted affines on calib first (normswap.compare_fold)
            from .compare_fold import fold_conversion

            task.advance(0, step="fit norms")
            conv, fitted = fold_conversion(original, x1, calib, eval_data, outputs)
        else:
            conv = rewrite(original, t, (x1,), groups=groups)
    except NormswapError as e:
        row.status, row.note = "failed", str(e)
        return row if wanted else None
    models[t] = conv.model
    if not wanted:
        return None
    row.swapped = sum(a.rewritten for a in conv.actions)
    row.refused = sum(not a.rewritten for a in conv.actions)
    row.params = sum(p.numel() for p in conv.model.parameters())
    if t == "gn-ws":  # as convert's summary line says it
        row.plain_gn = sum(any("GN without weight standardization" in n for n in (a.to_dict().get("notes") or [])) for a in conv.actions)
    tgt = known[t]
    row.exact_promised = (fitted is None) if tgt is None else bool(tgt.exact)
    if fitted is not None:  # the fitted affines changed the function: measured like a calibrated target
        row.calibrated, row.refused = True, 0
        kept = fitted.kept
        row.note = (f"{len(fitted.folded)} of {len(fitted.choices)} per-sample norm(s) fitted as affines on the "
                    f"calibration data and folded (as `convert --to fold --calib` with --fold-norms auto: the cheapest-first "
                    f"sites within --max-drop {fitted.max_drop:g} on the held-out data)"
                    + (f"; kept: {', '.join(kept[:4])}{', …' if len(kept) > 4 else ''}" if kept else ""))
    sites = [] if t == "fold" else None  # None: every swapped site
    task.advance(0, step="agreement")
    from .pipeline.runtime import Runtime

    with Runtime(device=device or torch.device("cpu"), precision=None).place(original, conv.model) as teacher:
        after, drift = agreement_and_drift(teacher, conv.model, eval_data, sites=sites, conversion=conv, output_kind=outputs)
        row.naive_rel_err = after["rel_err"]
        if calib is not None and not row.exact_promised and t != "fold":
            task.advance(0, step="calibrate")
            calibrate(teacher, conv, calib, output_kind=outputs, heldout=eval_data)
            row.calibrated = True
            after, drift = agreement_and_drift(teacher, conv.model, eval_data, sites=sites, conversion=conv, output_kind=outputs)
    row.agreement, row.rel_err = after.quality, after["rel_err"]
    row.measures = {k: v for k, v in after.items() if k != "rel_err"}
    if t != "fold" and drift:
        row.drift_mean = sum(drift.values()) / len(drift)
        row.drift_max = max(drift.values())
    task.advance(0, step="batch independence")
    bi = batch_independence(conv.model, list(x.shape))
    row.batch_independent, row.batch_rel_diff = bi.independent, bi.max_rel_diff
    return row


_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
DRIFT_FLOOR = 1e-5  # the drift panel's bottom: float32 rounding (and 0) is drawn on it


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
