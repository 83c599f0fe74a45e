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

from .compare_sweep import BATCH_SAMPLES, DEFAULT_BATCH_SIZES, BatchSweep, SweepRow, _sweep, batch_sizes_from

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
                    f"calibration data and folded (as `convert --to fold --calib` with --fold-norms auto: the sites whose "
                    f"held-out drop stays within --max-drop {fitted.max_drop:g})"
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
