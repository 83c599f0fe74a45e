"""Compare norm targets on one model: what each swap costs and keeps.

:func:`compare_targets` rewrites the model to every requested target (``"fold"`` included) and measures,
per target:

* ``params`` — the parameter count of the rewritten model;
* ``latency_vs_fold`` — onnxruntime CPU latency at batch 1 relative to the BN-folded model (each exported
  with :func:`normswap.export_onnx`; timed round-robin, best of several rounds, so load on the machine
  hits all targets alike);
* ``agreement`` / ``rel_err`` — top-1 agreement and output relative error against the original, after
  calibration when calibration data is given (else of the naive swap, on random inputs);
* ``drift_mean`` / ``drift_max`` — the per-layer drift (:func:`normswap.calibrate.layer_drift`);
* ``batch_independent`` — :func:`normswap.checks.batch_independence`: in *training* mode, a sample's
  output alone vs inside a batch of 8 (dropout off), max relative difference ≤ 1e-4;
* ``exact`` — whether the target promises the original's eval function, and the measured max relative
  error of the naive rewrite against the original.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .calibrate import agreement_and_drift, calibrate
from .data import as_batches
from .errors import InputError, NormswapError

__all__ = ["CompareReport", "CompareRow", "compare_targets"]


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

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("latency_ms", "latency_vs_fold", "agreement", "rel_err", "drift_mean", "drift_max", "batch_rel_diff", "naive_rel_err"):
            if d[k] is not None:
                d[k] = float(f"{d[k]:.6g}")
        return d


@dataclass
class CompareReport:
    model: str
    input_shape: list[int]
    evaluated_on: str
    rows: list[CompareRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "input_shape": self.input_shape, "evaluated_on": self.evaluated_on,
                "targets": [r.to_dict() for r in self.rows], "notes": list(self.notes)}

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        t = Table(title=f"{self.model}: norm targets compared (agreement on {self.evaluated_on})", title_justify="left")
        for col in ("target", "sites", "params", "ORT latency vs fold", "top-1 agreement", "out rel err",
                    "drift mean/max", "batch-independent", "exact"):
            t.add_column(col)

        def f(v: float | None, fmt: str) -> str:
            return "—" if v is None else format(v, fmt)

        for r in self.rows:
            if r.status != "ok":
                t.add_row(r.target, "", "", "", "", "", "", "", f"[red]failed[/] {r.note or ''}")
                continue
            sites = f"{r.swapped}" + (f" ({r.refused} refused)" if r.refused else "")
            if r.batch_independent is None:
                bi = "—"
            elif r.batch_independent:
                bi = "[green]yes[/]"
            else:
                bi = f"[yellow]no[/] ({f(r.batch_rel_diff, '.1e')})"
            ex = "—" if r.exact_promised is None else ("[green]exact[/]" if r.exact_promised else "changes") + f" ({f(r.naive_rel_err, '.1e')})"
            agr = f(r.agreement, ".4f") + (" cal" if r.calibrated else "")
            t.add_row(r.target, sites, f"{r.params:,}" if r.params is not None else "—", f(r.latency_vs_fold, ".2f") + "×" if r.latency_vs_fold else "—",
                      agr, f(r.rel_err, ".3g"), f"{f(r.drift_mean, '.3f')}/{f(r.drift_max, '.3f')}", bi, ex)
        return Group(t, *[Text(n, style="yellow") for n in self.notes])


def _time_sessions(paths: dict[str, Path], x: Tensor, runs: int, rounds: int, threads: int) -> dict[str, float]:
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
) -> CompareReport:
    """Rewrite ``original`` to each of ``targets`` and measure them (see the module docstring).

    ``example_inputs``: the example input (batch 1 is used for latency). ``calib``: calibration batches
    (non-exact targets are calibrated on them); ``heldout``: batches for agreement/drift (default:
    ``calib``, else 8 random inputs of the example's shape)."""
    from .checks import batch_independence
    from .convert import rewrite
    from .convert import targets as all_targets
    from .export import export_onnx

    x = example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    if not isinstance(x, Tensor):
        raise InputError("compare needs an example input tensor")
    known = all_targets()
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise InputError(f"unknown target(s) {', '.join(unknown)}; choose from: {', '.join(known)}")
    targets = list(dict.fromkeys(targets))
    x1 = x[:1]
    if heldout is None and calib is not None:
        heldout, heldout_name = calib, heldout_name or "the calibration data"
    if heldout is None:
        g = torch.Generator().manual_seed(0)
        heldout = [torch.randn((8, *x.shape[1:]), generator=g)]
        heldout_name = "8 random inputs (no --calib: naive swaps)"
    eval_data = list(as_batches(heldout))
    rep = CompareReport(model=model_name, input_shape=list(x.shape), evaluated_on=heldout_name or "held-out data")
    models: dict[str, nn.Module] = {}
    for t in (["fold"] if latency and "fold" not in targets else []) + targets:
        row = CompareRow(target=t)
        try:
            conv = rewrite(original, t, (x1,), groups=groups if t != "fold" else None)
        except NormswapError as e:
            row.status, row.note = "failed", str(e)
            if t in targets:
                rep.rows.append(row)
            continue
        models[t] = conv.model
        if t not in targets:
            continue
        row.swapped = sum(a.rewritten for a in conv.actions)
        row.refused = sum(not a.rewritten for a in conv.actions)
        row.params = sum(p.numel() for p in conv.model.parameters())
        tgt = known[t]
        row.exact_promised = True if tgt is None else bool(tgt.exact)
        sites = [] if t == "fold" else None  # None: every swapped site
        after, drift = agreement_and_drift(original, conv.model, eval_data, sites=sites, conversion=conv)
        row.naive_rel_err = after["rel_err"]
        if calib is not None and not row.exact_promised and t != "fold":
            calibrate(original, conv, calib)
            row.calibrated = True
            after, drift = agreement_and_drift(original, conv.model, eval_data, sites=sites, conversion=conv)
        row.agreement, row.rel_err = after["top1_agreement"], after["rel_err"]
        if t != "fold":
            if drift:
                row.drift_mean = sum(drift.values()) / len(drift)
                row.drift_max = max(drift.values())
        bi = batch_independence(conv.model, list(x.shape))
        row.batch_independent, row.batch_rel_diff = bi.independent, bi.max_rel_diff
        rep.rows.append(row)
    if latency and "fold" in models:
        with tempfile.TemporaryDirectory(prefix="normswap-compare-") as td:
            paths: dict[str, Path] = {}
            for t, m in models.items():
                try:
                    res = export_onnx(m, (x1,), Path(td) / f"{t}.onnx")
                    paths[t] = Path(res.path)
                except NormswapError as e:
                    rep.notes.append(f"{t}: ONNX export failed ({e}); no latency")
            if "fold" in paths:
                ms = _time_sessions(paths, x1, runs, rounds, threads)
                for r in rep.rows:
                    if r.target in ms:
                        r.latency_ms = ms[r.target]
                        r.latency_vs_fold = ms[r.target] / ms["fold"]
                rep.notes.append(f"onnxruntime CPU, batch 1, {threads} thread(s), best of {rounds} rounds × {runs} runs; "
                                 f"fold = {ms['fold']:.3f} ms")
    elif latency:
        rep.notes.append("the fold rewrite failed: no latency reference")
    return rep
