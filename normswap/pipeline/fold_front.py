"""The compute/quality front of ``--to fold --calib``, measured: what each folded site saves in latency.

:func:`normswap.pipeline.fold_norms.fit_and_choose` replaces sites cumulatively, cheapest first, and
measures the held-out quality after each prefix (the *front*). With ``latency=True`` (``convert
--front-latency``) each front point's model — the first ``k`` sites' closed-loop affines — goes through
the real fold pass (the other per-sample norms kept, as ``--to fold`` keeps them), is exported to ONNX
and timed in onnxruntime on the CPU at batch 1, like ``normswap compare``'s latency: every model of the
front plus the original in one interleaved round-robin (so load on the machine hits all alike; the order
rotated each round), best of :data:`ROUNDS` rounds × :data:`RUNS` runs, :data:`THREADS` intra-op thread.

Read off it (:class:`FrontLatency`): per front point its latency in ms and ×the original; per site the
latency its fold saves *along the front* (the point before it minus its point: the marginal saving with
the cheaper sites already folded). Differences of a few microseconds are within the timing noise
(:attr:`FrontLatency.noise_ms`: the median spread between a model's two best rounds).

The table renders from :func:`front_table`; the PNG is :func:`normswap.pipeline.front_plot.save_front_plot`.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["FrontLatency", "measure_front_latency", "front_table", "ORIGINAL", "ROUNDS", "RUNS", "THREADS"]

ORIGINAL = "original"
CHOSEN = "chosen"
ROUNDS = 20  # interleaved rounds: every model once per round, the order rotated each round
RUNS = 30  # onnxruntime runs per model per round
THREADS = 1


@dataclass
class FrontLatency:
    """onnxruntime latency (ms) of the original and of each front point's folded model."""

    original_ms: float | None
    points_ms: list[float | None]  # one per front point (k = 1, 2, …)
    chosen_ms: float | None = None  # the chosen sites when they are not a front point (--fold-norms NAMES)
    runtime: str = ""
    noise_ms: float | None = None
    notes: list[str] = field(default_factory=list)
    plot: str | None = None  # where the PNG was written

    def ratio(self, ms: float | None) -> float | None:
        """``ms`` × the original's latency (1 = no faster)."""
        if ms is None or not self.original_ms:
            return None
        return ms / self.original_ms

    def saved_ms(self, k: int) -> float | None:
        """What folding the k-th cheapest site saves, with the k−1 cheaper ones already folded."""
        before = self.original_ms if k == 1 else self.points_ms[k - 2]
        after = self.points_ms[k - 1]
        return None if before is None or after is None else before - after

    def to_dict(self) -> dict[str, Any]:
        r = lambda v: None if v is None else round(v, 5)
        return {"runtime": self.runtime, "original_ms": r(self.original_ms), "points_ms": [r(v) for v in self.points_ms],
                "chosen_ms": r(self.chosen_ms), "noise_ms": r(self.noise_ms), "notes": list(self.notes), "plot": self.plot}


def _folded(original: Any, fits: Any, names: Sequence[str], every: Sequence[str], x: Any) -> Any:
    """``original`` with ``names`` as their fitted affines, through the fold pass (the rest kept)."""
    from normswap.errors import RewriteError
    from normswap.keep.norm_fit import affine_model
    from normswap.rewriting.convert import rewrite

    model = affine_model(original, fits, list(names), loop="closed") if names else original
    skip = [n for n in every if n not in set(names)]
    try:
        return rewrite(model, "fold", (x,), verify=False, skip=skip).model
    except RewriteError:  # nothing to fold (no site chosen and no BatchNorm): the model as it is
        return model


def measure_front_latency(original: Any, point_fits: Sequence[Any], order: Sequence[str], x: Any, *,
                          chosen: Sequence[str] | None = None, chosen_fits: Any = None, runs: int = RUNS,
                          rounds: int = ROUNDS, threads: int = THREADS) -> FrontLatency:
    """Fold, export and time the original and every front point (``point_fits[k-1]``: the fits of the
    first ``k`` sites of ``order``), plus ``chosen`` when it is not a cheapest-first prefix; ``x``: one
    example input (its first sample is used)."""
    from normswap.errors import NormswapError
    from normswap.export import export_onnx

    x1 = x[:1]
    models: dict[str, Any] = {ORIGINAL: _folded(original, None, [], order, x1)}
    for k, fk in enumerate(point_fits, start=1):
        models[str(k)] = _folded(original, fk, order[:k], order, x1)
    prefix = chosen is not None and set(chosen) == set(order[:len(chosen)])
    if chosen and not prefix and chosen_fits is not None:
        models[CHOSEN] = _folded(original, chosen_fits, chosen, order, x1)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="normswap-front-") as td:
        paths: dict[str, Path] = {}
        for key, m in models.items():
            try:
                paths[key] = Path(export_onnx(m, (x1,), Path(td) / f"{key}.onnx", verify=False).path)
            except NormswapError as e:
                notes.append(f"{'the original' if key == ORIGINAL else 'front point ' + key}: ONNX export failed ({e}); no latency")
        ms, spread = _timed(paths, x1, runs, rounds, threads) if paths else ({}, [])
    spread.sort()
    return FrontLatency(original_ms=ms.get(ORIGINAL), points_ms=[ms.get(str(k)) for k in range(1, len(point_fits) + 1)],
                        chosen_ms=ms.get(CHOSEN), notes=notes, noise_ms=spread[len(spread) // 2] if spread else None,
                        runtime=f"onnxruntime CPU, batch 1, {threads} thread(s), {len(paths)} models interleaved (order "
                                f"rotated), best of {rounds} rounds × {runs} runs")


def _timed(paths: dict[str, Path], x: Any, runs: int, rounds: int, threads: int) -> tuple[dict[str, float], list[float]]:
    """compare's round-robin timing (:func:`normswap.compare._time_sessions`: best round per model, ms), keeping
    every round: per model the gap between its two best rounds is the noise estimate."""
    from normswap.parity import make_session, session_feed

    rounds_ms: dict[str, list[float]] = {}
    sessions = {k: make_session(p, threads=threads) for k, p in paths.items()}
    feeds = {k: session_feed(s, (x,)) for k, s in sessions.items()}
    for k, s in sessions.items():  # warm up
        for _ in range(3):
            s.run(None, feeds[k])
    keys = list(sessions)
    for i in range(rounds):  # rotated: no model always runs first (or right after another) in a round
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:
            s = sessions[k]
            t0 = time.perf_counter()
            for _ in range(runs):
                s.run(None, feeds[k])
            rounds_ms.setdefault(k, []).append((time.perf_counter() - t0) / runs * 1e3)
    best = {k: min(v) for k, v in rounds_ms.items()}
    spread = [sorted(v)[1] - sorted(v)[0] for v in rounds_ms.values() if len(v) > 1]
    return best, spread


def front_table(rep: Any) -> Any:
    """The front as a table: k, the site it adds, held-out quality and its drop, latency (ms, ×original)."""
    from rich.text import Text

    from normswap.report import Column, FittedTable

    lat: FrontLatency | None = rep.latency
    f = lambda v, p=4: "—" if v is None or v != v else f"{v:.{p}f}"
    chosen_k = rep.chosen_point()
    rows: list[list[Any]] = []
    if lat is not None:
        rows.append(["0", Text("(original)", style="dim"), f(rep.base), f(0.0), f(lat.original_ms, 3), "1.00×", "", ""])
    for k, p in enumerate(rep.front, start=1):
        drop = None if p.quality is None or rep.base is None else rep.base - p.quality
        within = drop is not None and drop <= rep.max_drop
        mark = Text("◀ chosen", style="bold cyan") if k == chosen_k else ""
        row = [str(k), p.folded[-1], f(p.quality), Text(f(drop), style="" if within else "yellow")]
        if lat is not None:
            ms = lat.points_ms[k - 1]
            ratio = lat.ratio(ms)
            row += [f(ms, 3), "—" if ratio is None else f"{ratio:.2f}×", f(lat.saved_ms(k), 3)]
        rows.append(row + [mark])
    cols = [Column("k", "right"), Column("+ site"), Column(f"held-out\n{rep.measure}", "right"), Column("drop", "right")]
    if lat is not None:
        cols += [Column("latency\nms", "right"), Column("latency\n×original", "right"),
                 Column("saved\nms", "right", drop=1)]
    else:
        rows = [r[:4] + r[-1:] for r in rows]
    cols.append(Column(""))
    title = (f"front: sites folded cumulatively, cheapest first (held-out {rep.measure} on {rep._n()}"
             + (f"; drop > --max-drop {rep.max_drop:g} in yellow)" if rep.mode == "auto" else ")"))
    foot: list[Any] = []
    if lat is not None:
        foot.append(Text(f"latency: {lat.runtime}; each point folded by the fold pass (the other per-sample norms kept); "
                         f"saved = the point before minus this one; timing noise ≈ {_us(lat.noise_ms)}", style="dim"))
        if lat.chosen_ms is not None:
            q = next((st.agreement.quality for st in rep.stages if st.stage == "calibrated"), None)
            foot.append(Text(f"the chosen sites (not a cheapest-first prefix): {f(lat.chosen_ms, 3)} ms, "
                             f"{lat.ratio(lat.chosen_ms):.2f}× the original, held-out {rep.measure} {f(q)}", style="dim"))
        foot += [Text(n, style="yellow") for n in lat.notes]
        if lat.plot:
            foot.append(Text(f"plot: {lat.plot}", style="dim"))
    else:
        foot.append(Text("latency not measured: add --front-latency", style="dim"))
    return FittedTable(cols, rows, title=title, footnotes=foot)


def _us(ms: float | None) -> str:
    """A timing noise in microseconds, as precise as it can be read."""
    if ms is None:
        return "unmeasured"
    us = ms * 1e3
    return "< 0.1 µs" if us < 0.05 else f"{us:.1f} µs"
