"""Numerical parity: does the rewritten / exported model compute what the original did?

Results are objects (in the spirit of Polygraphy's comparator): :func:`compare` returns one
:class:`OutputStats` per output, :func:`check_parity` gathers them into a :class:`ParityResult`
that is truthy when everything passed, serialises to JSON and renders as a rich table.

**Pass rule** (decided in one place, :func:`compare_arrays`). For every output of every batch,
with ``reference`` the trusted side of the pair (the original model, or the rewritten model for
``rewritten↔onnxruntime``)::

    scale   = max |reference|
    max_abs = max |candidate - reference|
    passed  = max_abs <= atol + rtol * scale  [+ NOISE_FACTOR * floor]

i.e. the error is measured against the *output's scale*, not element by element, which is what
"max error ≤ 1e-4 relative to the output scale" means for a deployed network (element-wise
relative error is meaningless for logits near zero). ``max_rel = max_abs / max(scale, 1e-12)``
is reported for reading. Defaults: ``DEFAULT_ATOL = 1e-5``, ``DEFAULT_RTOL = 1e-4``.

* **Non-finite values fail.** Any NaN or ±Inf in a compared floating output fails the comparison,
  named plainly ("the original model itself outputs NaN on these inputs" when it is the
  reference): matching NaNs prove nothing about a rewrite.
* **Nothing compared is not a pass.** An empty output (0 elements: a detector that found no boxes)
  or a constant one (every value equal: the model ignores its input here) passes vacuously; a
  result resting only on such outputs has the verdict ``nothing compared``, not ``passed``.
* **The noise-floor rule.** When an output misses the tolerance, the reference model's *own*
  float32 noise on the same inputs is measured (:func:`noise_floor`: the reference vs a float64
  copy of itself, and vs itself on inputs moved by one unit in the last place) and the comparison
  passes only when ``max_abs <= tolerance + NOISE_FACTOR * floor``: a rewrite fails when it is
  clearly worse than the original's own rounding, not because the original is badly conditioned
  (a BN with running_mean 1e6) or discontinuous in its input (top-k, NMS). Both numbers are
  reported. Where even the reference's output *shape* or integer labels move under that noise,
  the output cannot be judged at this level and counts as nothing compared.
* Integer and bool outputs must match exactly. All statistics are computed in float64. A shape
  mismatch or a missing output is a failed :class:`OutputStats` with a ``note``, never an exception.

Pairs are named ``"original↔rewritten"``, ``"original↔onnxruntime"`` and
``"rewritten↔onnxruntime"`` (reference first).
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from normswap.defaults import DEFAULT_ATOL, DEFAULT_RTOL, NOISE_FACTOR  # noqa: F401 - re-exported
from normswap.errors import InputError, NormswapError, first_line

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "PAIR_ORIGINAL_REWRITTEN",
    "PAIR_ORIGINAL_ORT",
    "PAIR_REWRITTEN_ORT",
    "OutputStats",
    "ParityResult",
    "compare",
    "judge",
    "noise_floor",
    "NOISE_FACTOR",
    "flatten_outputs",
    "make_inputs",
    "run_onnxruntime",
    "clear_session_cache",
    "check_parity",
    "first_divergence",
]

SCALE_FLOOR = 1e-12  # max_rel = max_abs / max(scale, SCALE_FLOOR)

VERDICT_PASSED, VERDICT_FAILED, VERDICT_NOTHING = "passed", "failed", "nothing compared"

PAIR_ORIGINAL_REWRITTEN = "original↔rewritten"
PAIR_ORIGINAL_ORT = "original↔onnxruntime"
PAIR_REWRITTEN_ORT = "rewritten↔onnxruntime"

Batch = int | str


# ---------------------------------------------------------------------------------------------
# results


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
        return max(self.stats, key=lambda s: (not s.passed, s.ratio, s.max_rel))

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
            line += f"; {len(vac)} comparison(s) compared nothing ({vac[0].note})"
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
        legend = {"orig": "original model", "new": "rewritten model", "ort": "the ONNX file on onnxruntime"}

        def short(pair: str) -> str:  # the table's pair names; the JSON keeps the full ones
            return "↔".join(sides.get(p, p) for p in pair.split("↔"))

        notes: dict[str, int] = {}
        failing_notes: set[str] = set()
        rows: list[list[Any]] = []
        for s in self.stats:
            if not s.passed:
                verdict = Text("FAIL", style="bold red")
            elif s.vacuous:
                verdict = Text("empty", style="yellow")
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


# ---------------------------------------------------------------------------------------------
# flattening and comparing


def _is_array(x: Any) -> bool:
    return isinstance(x, (Tensor, np.ndarray, np.generic))


def _key_part(k: Any) -> tuple[str, str]:
    if isinstance(k, pytree.SequenceKey):
        return "seq", str(k.idx)
    if isinstance(k, pytree.MappingKey):
        return "map", str(k.key)
    if isinstance(k, pytree.GetAttrKey):
        return "map", str(k.name)
    return "map", str(k).strip(".[]'\"")


def output_name(path: Sequence[Any], root: str = "output") -> str:
    """Name for a pytree key path: ``output``, ``output_0``, ``output_1_0``, ``logits``, ``aux_0``, ``a.b``."""
    if not path:
        return root
    parts = [_key_part(k) for k in path]
    kind, first = parts[0]
    name = f"{root}_{first}" if kind == "seq" else first
    for kind, p in parts[1:]:
        name += f"_{p}" if kind == "seq" else f".{p}"
    return name


def flatten_outputs(obj: Any, root: str = "output") -> list[tuple[str, Any]]:
    """Flatten a tensor / array / nested tuple, list, dict into ``[(name, array_leaf), ...]``.

    Order is pytree order (dict insertion order), the order both ONNX exporters use.
    Non-array leaves (None, Python numbers, strings) are dropped, as the exporters drop them.
    """
    if _is_array(obj):
        return [(root, obj)]
    leaves, _ = pytree.tree_flatten_with_path(obj)
    out: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for path, leaf in leaves:
        if not _is_array(leaf):
            continue
        name = base = output_name(path, root)
        i = 1
        while name in seen:
            name = f"{base}__{i}"
            i += 1
        seen.add(name)
        out.append((name, leaf))
    return out


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2) or x.dtype.is_floating_point and x.element_size() < 2:
            x = x.float()
        return x.resolve_conj().resolve_neg().numpy()
    return np.asarray(x)


def _is_exact(a: np.ndarray) -> bool:
    return a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer)


def _failed(pair: str, name: str, batch: Batch, shape: tuple[int, ...], scale: float, note: str) -> OutputStats:
    return OutputStats(
        pair=pair,
        output=name,
        batch=batch,
        shape=shape,
        max_abs=math.inf,
        scale=scale,
        max_rel=math.inf,
        cosine=math.nan,
        top1=None,
        passed=False,
        tolerance=0.0,
        note=note,
    )


def _abs_max(a: np.ndarray) -> float:
    if a.size == 0:
        return 0.0
    fin = np.isfinite(a)
    if not fin.all():
        a = a[fin]
        if a.size == 0:
            return 0.0
    return float(np.abs(a).max())


def _sides(pair: str) -> tuple[str, str]:
    ref, _, cand = pair.partition("↔")
    return (ref or "reference"), (cand or "candidate")


def _non_finite(a: np.ndarray) -> str | None:
    """"NaN" / "Inf" / "NaN and Inf" with a count, or None when every value is finite."""
    if a.size == 0 or _is_exact(a):
        return None
    nan = int(np.isnan(a).sum())
    inf = int(np.isinf(a).sum())
    if not nan and not inf:
        return None
    what = " and ".join(w for w, k in (("NaN", nan), ("Inf", inf)) if k)
    return f"{what} ({nan + inf} of {a.size} values)"


def compare_arrays(
    reference: Any, candidate: Any, *, pair: str, output: str, batch: Batch, atol: float, rtol: float,
    floor: float | None = None,
) -> OutputStats:
    """Compare one reference array/tensor with one candidate: the single pass/fail rule of the
    module docstring. ``floor`` is the reference model's own float32 noise on this output
    (:func:`noise_floor`), when it was measured."""
    r = _to_numpy(reference)
    c = _to_numpy(candidate)
    exact = _is_exact(r)
    cplx = np.iscomplexobj(r) or np.iscomplexobj(c)
    dt = np.complex128 if cplx else np.float64
    r64 = r.astype(dt)
    scale = _abs_max(r64)
    ref_name, cand_name = _sides(pair)
    unjudgeable = floor is not None and math.isinf(floor)  # the reference's own output jumps under noise
    if r.shape != c.shape:
        if unjudgeable:
            return _vacuous(pair, output, batch, tuple(r.shape), scale,
                            f"not comparable: the {ref_name} model's own output changes shape under float32 noise")
        return _failed(pair, output, batch, tuple(r.shape), scale, f"shape {tuple(c.shape)} vs reference {tuple(r.shape)}")
    bad_ref, bad_cand = _non_finite(r64), _non_finite(c.astype(dt))
    if bad_ref is not None:
        return _failed(pair, output, batch, tuple(r.shape), scale,
                       f"the {ref_name} model itself outputs {bad_ref} on these inputs: fix the model or its weights")
    if bad_cand is not None:
        return _failed(pair, output, batch, tuple(r.shape), scale, f"the {cand_name} outputs {bad_cand} where the {ref_name} is finite")
    c64 = c.astype(dt)
    if r64.size == 0:
        max_abs, cosine = 0.0, 1.0
    else:
        max_abs = float(np.abs(r64 - c64).max())
        a, b = r64.ravel(), c64.ravel()
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if na == 0.0 and nb == 0.0:
            cosine = 1.0
        elif na == 0.0 or nb == 0.0:
            cosine = 0.0
        else:
            cosine = float(np.real(np.vdot(a, b))) / (na * nb)
            cosine = max(-1.0, min(1.0, cosine))
    tolerance = 0.0 if exact else atol + rtol * scale
    max_rel = max_abs / max(scale, SCALE_FLOOR)
    top1 = None
    if r.ndim == 2 and r.shape[1] > 1 and r.shape[0] > 0 and not exact and not cplx:
        top1 = float(np.mean(np.argmax(r64, axis=1) == np.argmax(c64, axis=1)))
    stats = OutputStats(
        pair=pair, output=output, batch=batch, shape=tuple(int(d) for d in r.shape), max_abs=max_abs, scale=scale,
        max_rel=max_rel, cosine=cosine, top1=top1, passed=False, tolerance=tolerance,
        note="exact comparison (integer/bool output)" if exact else None,
        noise_floor=None if floor is None or unjudgeable else float(floor),
    )
    if exact:
        stats.passed = max_abs == 0.0
        if not stats.passed and floor is not None and floor > 0:  # the reference's own labels move
            stats.passed, stats.vacuous = True, True
            stats.note = f"not comparable: the {ref_name} model's own integer output changes under float32 noise"
    elif unjudgeable and max_abs > tolerance:
        stats.passed, stats.vacuous = True, True
        stats.note = f"not comparable: the {ref_name} model's own output jumps under float32 noise"
    else:
        stats.passed = bool(max_abs <= stats.allowed)
    if stats.passed and not stats.vacuous:
        if r64.size == 0:
            stats.vacuous, stats.note = True, "empty output: nothing compared"
        elif r64.size > 1 and bool((r64.ravel() == r64.ravel()[0]).all()):
            stats.vacuous, stats.note = True, "constant output: every value equal, proves nothing"
    return stats


def _vacuous(pair: str, name: str, batch: Batch, shape: tuple[int, ...], scale: float, note: str) -> OutputStats:
    s = _failed(pair, name, batch, shape, scale, note)
    s.passed, s.vacuous = True, True
    return s


def compare(
    reference: Any,
    candidate: Any,
    *,
    pair: str,
    batch: Batch,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    floors: Sequence[float | None] | None = None,
) -> list[OutputStats]:
    """Compare every output of ``candidate`` with ``reference`` (flattened in the same order).

    Both may be tensors, numpy arrays or nested tuples/lists/dicts of them (an onnxruntime output
    list compares positionally with a model's nested outputs). Names come from the reference.
    ``floors``: the reference model's own noise per flattened output (:func:`noise_floor`).
    """
    ref = flatten_outputs(reference)
    cand = flatten_outputs(candidate)
    out: list[OutputStats] = []
    for i in range(max(len(ref), len(cand))):
        if i >= len(cand):
            name, r = ref[i]
            rn = _to_numpy(r)
            out.append(
                _failed(pair, name, batch, tuple(rn.shape), _abs_max(rn.astype(np.float64)),
                        f"missing from the candidate ({len(cand)} outputs vs reference {len(ref)})")
            )
        elif i >= len(ref):
            name, c = cand[i]
            out.append(
                _failed(pair, name, batch, tuple(_to_numpy(c).shape), 0.0,
                        f"extra output in the candidate ({len(cand)} outputs vs reference {len(ref)})")
            )
        else:
            name, r = ref[i]
            floor = floors[i] if floors is not None and i < len(floors) else None
            out.append(compare_arrays(r, cand[i][1], pair=pair, output=name, batch=batch, atol=atol, rtol=rtol, floor=floor))
    return out


def _over_tolerance(s: OutputStats) -> bool:
    """A failure the noise floor may explain: numbers over the tolerance, or a changed shape
    (not NaN/Inf, not a missing output, not a run failure)."""
    return not s.passed and (s.note is None or s.note.startswith(("shape", "exact")))


def noise_floor(model: nn.Module, inputs: Sequence[Any], reference_out: Any) -> list[float]:
    """The model's own float32 noise on ``inputs``, per flattened output: the largest
    ``max |out - reference_out|`` over (a) a float64 copy of the model on the same inputs and (b) the
    model itself on floating inputs moved up by one unit in the last place (``torch.nextafter``).
    ``inf`` where either run changes the output's shape (a discontinuous output: top-k, NMS);
    a probe the model cannot run (no float64 kernel, …) is left out. Runs in eval mode, no grad.
    """
    ref = [_to_numpy(t).astype(np.float64) for _, t in flatten_outputs(reference_out)]
    floors = [0.0] * len(ref)
    xs = _as_tuple(inputs)

    def probe(m: nn.Module, args: tuple[Any, ...]) -> None:
        try:
            with eval_mode(m):
                out = flatten_outputs(m(*args))
        except Exception:  # noqa: BLE001 - a probe this model cannot run says nothing
            return
        for i, (_, o) in enumerate(out[: len(ref)]):
            a = _to_numpy(o)
            if a.shape != ref[i].shape:
                floors[i] = math.inf
            elif a.size:
                with np.errstate(invalid="ignore", over="ignore"):
                    d = np.abs(a.astype(np.float64) - ref[i])
                floors[i] = max(floors[i], float(np.nan_to_num(d, nan=np.inf).max()))

    import copy

    try:
        double = copy.deepcopy(model).double()
    except Exception:  # noqa: BLE001
        double = None
    if double is not None:
        probe(double, tuple(x.double() if isinstance(x, Tensor) and x.is_floating_point() else x for x in xs))
        del double
    nudged = tuple(torch.nextafter(x, torch.full_like(x, math.inf)) if isinstance(x, Tensor) and x.is_floating_point() else x
                   for x in _clone_inputs(xs))
    probe(model, nudged)
    return floors


def judge(
    reference_model: nn.Module | None,
    reference_out: Any,
    candidate_out: Any,
    inputs: Sequence[Any],
    *,
    pair: str,
    batch: Batch,
    atol: float,
    rtol: float,
    floors: list[float] | None = None,
) -> tuple[list[OutputStats], list[float] | None]:
    """:func:`compare`, then — only if an output misses its tolerance — the noise-floor rule: the
    reference model's own noise on these inputs is measured (once; pass the returned floors back in
    for the next pair on the same batch) and the comparison is judged again with it."""
    stats = compare(reference_out, candidate_out, pair=pair, batch=batch, atol=atol, rtol=rtol, floors=floors)
    if floors is None and reference_model is not None and any(_over_tolerance(s) for s in stats):
        floors = noise_floor(reference_model, inputs, reference_out)
        stats = compare(reference_out, candidate_out, pair=pair, batch=batch, atol=atol, rtol=rtol, floors=floors)
    return stats, floors


# ---------------------------------------------------------------------------------------------
# inputs


def make_inputs(
    shape: Sequence[int] | Sequence[Sequence[int]],
    batch_sizes: Sequence[int] = (1, 3),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[tuple[int, tuple[Tensor, ...]]]:
    """Seeded random inputs, one entry per batch size: ``[(batch, (x, ...)), ...]``.

    ``shape`` is one input's shape including a batch dimension (whose value is replaced), or a
    sequence of such shapes for a multi-input model. Float dtypes draw ``randn``; integer dtypes
    draw from ``[0, 100)``. The same seed gives the same tensors.
    """
    shapes = _as_shapes(shape)
    out: list[tuple[int, tuple[Tensor, ...]]] = []
    for b in batch_sizes:
        if int(b) < 1:
            raise InputError(f"batch size {b} is not positive; use batch sizes ≥ 1")
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(b))
        xs = []
        for s in shapes:
            full = (int(b), *s[1:])
            if dtype.is_floating_point or dtype.is_complex:
                xs.append(torch.randn(full, generator=g, dtype=dtype))
            elif dtype == torch.bool:
                xs.append(torch.randint(0, 2, full, generator=g).bool())
            else:
                xs.append(torch.randint(0, 100, full, generator=g, dtype=dtype))
        out.append((int(b), tuple(xs)))
    return out


def _as_shapes(shape: Any) -> list[tuple[int, ...]]:
    if isinstance(shape, torch.Size) or (len(shape) > 0 and all(isinstance(d, (int, np.integer)) for d in shape)):
        shapes = [tuple(int(d) for d in shape)]
    elif len(shape) > 0 and all(isinstance(s, (Sequence, torch.Size)) and not isinstance(s, str) for s in shape):
        shapes = [tuple(int(d) for d in s) for s in shape]
    else:
        raise InputError(f"input shape {shape!r} is not a list of integers; pass e.g. 1,3,224,224")
    for s in shapes:
        if len(s) < 1 or any(d < 1 for d in s[1:]):
            raise InputError(f"input shape {s} needs a batch dimension and positive sizes; pass e.g. 1,3,224,224")
    return shapes


def _as_tuple(x: Any) -> tuple[Any, ...]:
    if isinstance(x, (Tensor, np.ndarray)):
        return (x,)
    return tuple(x)


# ---------------------------------------------------------------------------------------------
# onnxruntime

_OPT_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC", "disable": "ORT_DISABLE_ALL"}
_SESSION_CACHE: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_SESSION_CACHE_SIZE = 4
_SESSION_LOCK = threading.Lock()

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def make_session(path: str | os.PathLike[str], *, threads: int | None = None, optimization: str = "all") -> Any:
    """A fresh CPU onnxruntime InferenceSession (no cache); errors become one-line NormswapErrors."""
    import onnxruntime as ort

    if optimization not in _OPT_LEVELS:
        raise InputError(f"unknown onnxruntime optimization {optimization!r}; use one of {', '.join(_OPT_LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[optimization])
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise NormswapError(f"onnxruntime cannot load {path}: {first_line(e)}; re-export it (check --opset)") from e


def _session(path: str | os.PathLike[str], threads: int | None, optimization: str) -> Any:
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError as e:
        raise InputError(f"ONNX file {path} cannot be read ({e.strerror}); check the path") from e
    key = (str(p), st.st_mtime_ns, st.st_size, threads, optimization)
    with _SESSION_LOCK:
        sess = _SESSION_CACHE.get(key)
        if sess is not None:
            _SESSION_CACHE.move_to_end(key)
            return sess
    sess = make_session(p, threads=threads, optimization=optimization)
    with _SESSION_LOCK:
        _SESSION_CACHE[key] = sess
        while len(_SESSION_CACHE) > _SESSION_CACHE_SIZE:
            _SESSION_CACHE.popitem(last=False)
    return sess


def clear_session_cache() -> None:
    """Forget every cached onnxruntime session."""
    with _SESSION_LOCK:
        _SESSION_CACHE.clear()


def session_feed(sess: Any, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
    """Map positional inputs onto the session's input names, casting floats to the declared type."""
    metas = sess.get_inputs()
    if len(metas) != len(inputs):
        raise InputError(
            f"the ONNX model takes {len(metas)} input(s) ({', '.join(m.name for m in metas)}) but {len(inputs)} were given; "
            "match --input-shape to the model's inputs"
        )
    feed: dict[str, np.ndarray] = {}
    for meta, x in zip(metas, inputs):
        a = np.ascontiguousarray(_to_numpy(x))
        want = _ORT_TYPES.get(meta.type)
        if want is not None and a.dtype != want and np.issubdtype(a.dtype, np.floating) and np.issubdtype(want, np.floating):
            a = a.astype(want)
        feed[meta.name] = a
    return feed


def run_onnxruntime(
    path: str | os.PathLike[str],
    inputs: Sequence[Any],
    *,
    threads: int | None = None,
    optimization: str = "all",
) -> list[np.ndarray]:
    """Run an ONNX file on CPU onnxruntime; the session is cached per (file version, settings).

    ``optimization`` is onnxruntime's graph optimization level: "all", "extended", "basic" or
    "disable". Inputs are matched to the model's inputs by position.
    """
    sess = _session(path, threads, optimization)
    feed = session_feed(sess, _as_tuple(inputs))
    try:
        return list(sess.run(None, feed))
    except Exception as e:
        raise NormswapError(f"onnxruntime failed running {path}: {first_line(e)}; check the input shapes") from e


# ---------------------------------------------------------------------------------------------
# running torch models


@contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Put models in eval mode (under no_grad) and restore every submodule's training flag after."""
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        for model in models:
            if model is not None:
                model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in saved:
            m.training = flag


def _clone_inputs(xs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(x.clone() if isinstance(x, Tensor) else x for x in xs)


def _run_torch(model: nn.Module, xs: tuple[Any, ...]) -> Any:
    out = model(*_clone_inputs(xs))
    return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, out)


def check_parity(
    original: nn.Module,
    rewritten: nn.Module | None = None,
    onnx_path: str | os.PathLike[str] | None = None,
    *,
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
    inputs: Sequence[tuple[Batch, Any]] | None = None,
    samples: Tensor | Sequence[Tensor] | None = None,
    batch_sizes: Sequence[int] = (1, 3),
    seed: int = 0,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    ort_threads: int | None = None,
    ort_optimization: str = "all",
    reference_name: str = "original",
) -> ParityResult:
    """Compare ``rewritten`` and the ONNX file against ``original`` (and ONNX against ``rewritten``).

    ``reference_name`` labels ``original`` in the comparison pairs, e.g. "rewritten" when checking a
    function-changing swap against its own export (``check_parity(swapped, None, onnx, ...)``).

    Inputs: ``inputs`` as ``[(label, (x, ...)), ...]``, else seeded random tensors of
    ``input_shape`` at each of ``batch_sizes``; ``samples`` (a user tensor ``[N, ...]`` or a tuple
    of them) is one more batch labelled "samples". Models run in eval mode under no_grad; their
    training flags are restored afterwards and inputs are cloned per run, so nothing the caller
    owns is modified. A failure of the original is an :class:`InputError`; a failure of the
    rewritten model or of onnxruntime is recorded as a failed comparison with a note.
    """
    check_tolerances(atol, rtol)
    batches: list[tuple[Batch, tuple[Any, ...]]] = []
    if inputs is not None:
        batches.extend((label, _as_tuple(xs)) for label, xs in inputs)
    elif input_shape is not None:
        batches.extend(make_inputs(input_shape, batch_sizes=batch_sizes, seed=seed))
    if samples is not None:
        batches.append(("samples", _as_tuple(samples)))
    if not batches:
        raise InputError("parity needs inputs: give input_shape, inputs or samples (e.g. --input-shape 1,3,224,224)")

    result = ParityResult(stats=[], atol=atol, rtol=rtol)
    if rewritten is None and onnx_path is None:
        result.notes.append("nothing to compare: neither a rewritten model nor an ONNX file was given")
        return result
    if onnx_path is not None:
        result.notes.append(f"onnxruntime CPU, optimization={ort_optimization}, threads={ort_threads or 'default'}")

    pair_rewritten = PAIR_ORIGINAL_REWRITTEN.replace("original", reference_name, 1)
    pair_ort = PAIR_ORIGINAL_ORT.replace("original", reference_name, 1)
    with eval_mode(original, rewritten):
        for label, xs in batches:
            try:
                ref = _run_torch(original, xs)
            except Exception as e:
                shapes = ", ".join(str(tuple(x.shape)) for x in xs if isinstance(x, Tensor))
                raise InputError(f"the original model fails on input {shapes}: {first_line(e)}; check the input shape") from e
            cand = None
            floors: list[float] | None = None  # the original's own noise on this batch, measured at most once
            if rewritten is not None:
                try:
                    cand = _run_torch(rewritten, xs)
                except Exception as e:
                    result.stats.append(_run_failure(pair_rewritten, label, f"the rewritten model raised {first_line(e)}"))
                else:
                    stats, floors = judge(original, ref, cand, xs, pair=pair_rewritten, batch=label, atol=atol, rtol=rtol)
                    result.stats.extend(stats)
            if onnx_path is not None:
                try:
                    ort_out = run_onnxruntime(onnx_path, xs, threads=ort_threads, optimization=ort_optimization)
                except InputError:
                    raise
                except NormswapError as e:
                    result.stats.append(_run_failure(pair_ort, label, str(e)))
                    continue
                stats, floors = judge(original, ref, ort_out, xs, pair=pair_ort, batch=label, atol=atol, rtol=rtol, floors=floors)
                result.stats.extend(stats)
                if cand is not None:
                    stats, _ = judge(rewritten, cand, ort_out, xs, pair=PAIR_REWRITTEN_ORT, batch=label, atol=atol, rtol=rtol)
                    result.stats.extend(stats)
    return result


def check_tolerances(atol: float, rtol: float) -> None:
    """Tolerances must be finite and non-negative (a NaN tolerance would fail everything, a
    negative one could never pass): an :class:`InputError` naming the option otherwise."""
    for name, v in (("atol", atol), ("rtol", rtol)):
        try:
            ok = math.isfinite(float(v)) and float(v) >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InputError(f"--{name} {v} is not a finite, non-negative number; pass e.g. --{name} 1e-5")


def _run_failure(pair: str, batch: Batch, note: str) -> OutputStats:
    return _failed(pair, "*", batch, (), math.nan, note)


# ---------------------------------------------------------------------------------------------
# first divergence


class _StopRun(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


_COMPARED_OPS = ("call_module", "call_function", "call_method", "output")


def _node_label(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_module" or node.op == "call_method":
        return str(t)
    if node.op == "output":
        return "output"
    return getattr(t, "__name__", None) or str(t)


def _tensor_leaves(x: Any) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(x) if isinstance(t, Tensor)]


def first_divergence(
    original: fx.GraphModule | nn.Module,
    rewritten: fx.GraphModule | nn.Module,
    node_map: Mapping[str, str | None] | None,
    inputs: Sequence[Any],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> str | None:
    """Name the first node of ``rewritten`` whose output differs from its original counterpart.

    Both graphs run (eval, no_grad) under a ``torch.fx.Interpreter``. Rewritten nodes are
    visited in execution order; a node is compared when ``node_map`` maps its name to an
    original node name, or, absent from ``node_map``, when the original graph has a node with
    the same name (map a name to ``None`` to skip it — a conv whose BN was folded into it has
    the same name but must be compared with the BN's output). Tolerance is the module's pass
    rule applied per node. Returns e.g.
    ``"layer1.0.conv2 (call_module layer1_0_conv2): max rel err 3.2e-02"`` or None.
    Plain modules are symbolically traced first.
    """
    gm_o = original if isinstance(original, fx.GraphModule) else fx.symbolic_trace(original)
    gm_r = rewritten if isinstance(rewritten, fx.GraphModule) else fx.symbolic_trace(rewritten)
    node_map = dict(node_map or {})
    orig_names = {n.name for n in gm_o.graph.nodes}

    def mapped(name: str) -> str | None:
        if name in node_map:
            target = node_map[name]
            return target if target in orig_names else None
        return name if name in orig_names else None

    wanted = {m for n in gm_r.graph.nodes if n.op in _COMPARED_OPS and (m := mapped(n.name)) is not None}
    xs = _as_tuple(inputs)

    recorded: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in wanted:  # clone: a later in-place op (ReLU(inplace=True)) would overwrite it
                recorded[n.name] = pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, out)
            return out

    class Comparer(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.op in _COMPARED_OPS:
                oname = mapped(n.name)
                if oname is not None and oname in recorded:
                    msg = _node_mismatch(n, oname, recorded[oname], out, atol, rtol)
                    if msg is not None:
                        raise _StopRun(msg)
            return out

    with eval_mode(gm_o, gm_r):
        Recorder(gm_o).run(*_clone_inputs(xs))
        try:
            Comparer(gm_r).run(*_clone_inputs(xs))
        except _StopRun as stop:
            return stop.message
    return None


def _node_mismatch(n: fx.Node, oname: str, ref: Any, out: Any, atol: float, rtol: float) -> str | None:
    where = f"{_node_label(n)} ({n.op} {n.name}" + ("" if oname == n.name else f" ↔ original {oname}") + ")"
    rl, cl = _tensor_leaves(ref), _tensor_leaves(out)
    if not rl and not cl:
        return None
    if len(rl) != len(cl):
        return f"{where}: {len(cl)} tensor outputs vs {len(rl)} in the original"
    for r, c in zip(rl, cl):
        s = compare_arrays(r, c, pair="original↔rewritten", output=n.name, batch="-", atol=atol, rtol=rtol)
        if not s.passed:
            if s.note:
                return f"{where}: {s.note}"
            return f"{where}: max rel err {s.max_rel:.1e} (max abs {s.max_abs:.1e})"
    return None

