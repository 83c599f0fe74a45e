"""Parity result objects: :class:`OutputStats` (one output, one pair, one batch) and
:class:`ParityResult` (every comparison of one check), their JSON form and rich rendering.

The verdict words and pair names live here; the pass/fail rule that fills these objects in is
:mod:`normswap.parity.rule`. ``NOISE_FACTOR`` is read here, by :attr:`OutputStats.allowed` (the
rule's noise allowance), the summary line and the JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from normswap.defaults import NOISE_FACTOR

VERDICT_PASSED, VERDICT_FAILED, VERDICT_NOTHING = "passed", "failed", "nothing compared"

PAIR_ORIGINAL_REWRITTEN = "original↔rewritten"
PAIR_ORIGINAL_ORT = "original↔onnxruntime"
PAIR_REWRITTEN_ORT = "rewritten↔onnxruntime"

Batch = int | str


@dataclass
class OutputStats:
    """One output, one comparison pair, one batch."""

    pair: str
    output: str
    batch: Batch
    shape: tuple[int, ...]
    max_abs: float
    scale: float
    max_rel: float
    cosine: float
    top1: float | None
    passed: bool
    tolerance: float = 0.0  # atol + rtol * scale (0 for exact comparisons)
    note: str | None = None  # why it failed when no numbers could say it (shape, missing output)
    vacuous: bool = False  # passed, but proves nothing: empty or constant, or not comparable
    noise_floor: float | None = None  # the reference's own float32 noise, when it was measured

    @property
    def ratio(self) -> float:
        """max_abs / tolerance: ≤ 1 passes (inf when an exact comparison differs)."""
        if math.isnan(self.max_abs):
            return math.inf
        allowed = self.allowed
        if allowed > 0:
            return self.max_abs / allowed
        return 0.0 if self.max_abs == 0 else math.inf

    @property
    def allowed(self) -> float:
        """The error this comparison allows: the tolerance, plus NOISE_FACTOR × the noise floor."""
        extra = NOISE_FACTOR * self.noise_floor if self.noise_floor is not None and math.isfinite(self.noise_floor) else 0.0
        return self.tolerance + extra

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return _json_safe(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OutputStats:
        names = {f.name for f in fields(cls)}
        kw = {k: _from_json_float(v) for k, v in d.items() if k in names}
        kw["shape"] = tuple(kw.get("shape") or ())
        return cls(**kw)


@dataclass
class ParityResult:
    """Every comparison of one parity check; truthy only when the verdict is ``passed``: every
    comparison passed and at least one of them compared something (see the module docstring)."""

    stats: list[OutputStats]
    atol: float
    rtol: float
    divergence: str | None = None  # first graph node where rewritten and original diverge
    notes: list[str] = field(default_factory=list)
    #: what the "original" side of the pairs is: the model given, or (``--to fold --calib``) that model
    #: with its per-sample norms replaced by fitted affines — the legend says which
    reference: str = "original model"

    @property
    def verdict(self) -> str:
        """``"failed"`` if any comparison failed; ``"nothing compared"`` if there were none, or every
        one passed only vacuously (empty / constant / not comparable outputs); else ``"passed"``."""
        if any(not s.passed for s in self.stats):
            return VERDICT_FAILED
        if not self.stats or all(s.vacuous for s in self.stats):
            return VERDICT_NOTHING
        return VERDICT_PASSED

    def __bool__(self) -> bool:
        return self.verdict == VERDICT_PASSED

    @property
    def passed(self) -> bool:
        return bool(self)

    @property
    def nothing_compared(self) -> bool:
        return self.verdict == VERDICT_NOTHING

    @property
    def failed(self) -> list[OutputStats]:
        return [s for s in self.stats if not s.passed]

    def worst(self) -> OutputStats | None:
        """The comparison furthest over (or closest to) its tolerance; None if there were none."""
        if not self.stats:
            return None
        # a vacuous row (not comparable, empty) proves nothing either way: it is never the "worst" pass
        return max(self.stats, key=lambda s: (not s.passed, not s.vacuous, s.ratio, s.max_rel))

    def pairs(self) -> list[str]:
        return list(dict.fromkeys(s.pair for s in self.stats))

    def summary(self) -> str:
        """One line: verdict, counts, tolerance and the worst comparison."""
        n, bad = len(self.stats), len(self.failed)
        tol = f"atol={self.atol:g} + rtol={self.rtol:g}·scale"
        if n == 0:
            return f"parity NOTHING COMPARED: no comparisons were made ({tol})"
        if self.nothing_compared:
            kinds = sorted({s.note or "vacuous" for s in self.stats})
            return (f"parity NOTHING COMPARED: all {n} comparisons rest on outputs that prove nothing "
                    f"({'; '.join(kinds)}); pass real inputs with --samples (for a detector, images with "
                    "objects or a lower score threshold)")
        w = self.worst()
        assert w is not None
        where = f"{w.pair} {w.output} batch {w.batch}"
        verdict = "PASSED" if self else "FAILED"
        line = (
            f"parity {verdict}: {n - bad}/{n} comparisons within {tol}; worst: {where} "
            f"max rel err {w.max_rel:.1e} (max abs {w.max_abs:.1e})"
        )
        if w.noise_floor is not None:
            line += f"; the reference's own float32 noise there: {w.noise_floor:.1e} (allowed ×{NOISE_FACTOR:g})"
        if w.note and not w.passed:
            line += f" — {w.note}"
        vac = [s for s in self.stats if s.vacuous]
        if vac and self:
            kinds = "; ".join(dict.fromkeys(s.note or "vacuous" for s in vac))
            line += f"; {len(vac)} comparison(s) compared nothing ({kinds})"
        return line

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        w = self.worst()
        return _json_safe(
            {
                "passed": bool(self),
                "verdict": self.verdict,
                "noise_factor": NOISE_FACTOR,
                "atol": self.atol,
                "rtol": self.rtol,
                "summary": self.summary(),
                "divergence": self.divergence,
                "notes": list(self.notes),
                "worst": None if w is None else w.to_dict(),
                "stats": [s.to_dict() for s in self.stats],
            }
        )

    def to_json(self, **kw: Any) -> str:
        opts: dict[str, Any] = {"indent": 2, "ensure_ascii": False}
        opts.update(kw)
        return json.dumps(self.to_dict(), **opts)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ParityResult:
        return cls(
            stats=[OutputStats.from_dict(s) for s in d.get("stats", [])],
            atol=float(d["atol"]),
            rtol=float(d["rtol"]),
            divergence=d.get("divergence"),
            notes=list(d.get("notes", [])),
        )

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        from normswap.report import Column, FittedTable

        sides = {"original": "orig", "rewritten": "new", "onnxruntime": "ort"}
        legend = {"orig": self.reference, "new": "rewritten model", "ort": "the ONNX file on onnxruntime"}

        def short(pair: str) -> str:  # the table's pair names; the JSON keeps the full ones
            return "↔".join(sides.get(p, p) for p in pair.split("↔"))

        notes: dict[str, int] = {}
        failing_notes: set[str] = set()
        rows: list[list[Any]] = []
        for s in self.stats:
            if not s.passed:
                verdict = Text("FAIL", style="bold red")
            elif s.vacuous:  # passed, proving nothing: say why in a word (the footnote says more)
                word = next((w for k, w in _VACUOUS_WORDS if (s.note or "").startswith(k)), "vacuous")
                verdict = Text(word, style="yellow")
            else:
                verdict = Text("pass", style="green")
            if s.note:
                verdict.append(f" ({notes.setdefault(s.note, len(notes) + 1)})", style="dim" if s.passed else "red")
                if not s.passed:
                    failing_notes.add(s.note)
            rows.append([
                short(s.pair),
                s.output,
                str(s.batch),
                "×".join(map(str, s.shape)) if s.shape else "scalar",
                _fmt(s.max_abs),
                _fmt(s.scale),
                _fmt(s.max_rel),
                "-" if math.isnan(s.cosine) else f"{s.cosine:.7f}",
                "-" if s.top1 is None else f"{s.top1:.1%}",
                verdict,
            ])
        cos_one = all(math.isnan(s.cosine) or f"{s.cosine:.7f}" == "1.0000000" for s in self.stats)
        no_top1 = all(s.top1 is None for s in self.stats)
        columns = [
            Column("pair"),
            Column("output", fold=True),
            Column("batch", justify="right"),
            Column("shape", drop=3),
            Column("max abs", justify="right", drop=2),
            Column("scale", justify="right", drop=5),
            Column("max rel", justify="right"),
            Column("cosine", justify="right", drop=6 if cos_one else 1, why="1.0000000 everywhere" if cos_one else ""),
            Column("top-1", justify="right", drop=7 if no_top1 else 4, why="no classifier output" if no_top1 else ""),
            Column("result"),
        ]
        foot: list[Any] = [Text(f"({i}) {n}", style="red" if n in failing_notes else "dim") for n, i in notes.items()]
        used = dict.fromkeys(p for s in self.stats for p in short(s.pair).split("↔"))
        if any(p in legend for p in used):
            foot.append(Text("pairs: " + ", ".join(f"{p} = {legend[p]}" for p in used if p in legend), style="dim"))
        style = "bold green" if self else ("bold yellow" if self.nothing_compared else "bold red")
        parts: list[Any] = [FittedTable(columns, rows, title="parity", footnotes=foot), Text(self.summary(), style=style)]
        if self.divergence:
            parts.append(Text(f"first divergence: {self.divergence}", style="yellow"))
        for note in self.notes:
            parts.append(Text(f"note: {note}", style="dim"))
        return Group(*parts)


_VACUOUS_WORDS = (("empty", "empty"), ("constant", "constant"), ("not comparable", "n/c"), ("too small", "tiny"))


def _fmt(x: float) -> str:
    """A table number: ``1.6e-06``, ``0`` for an exact zero, ``inf`` / ``nan``."""
    if x == 0:
        return "0"
    return f"{x:.1e}" if math.isfinite(x) else str(x)


def _json_safe(obj: Any) -> Any:
    """Non-finite floats become the strings "inf", "-inf", "nan" (strict JSON has no such numbers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _from_json_float(v: Any) -> Any:
    if isinstance(v, str) and v in ("inf", "-inf", "nan"):
        return float(v)
    return v
