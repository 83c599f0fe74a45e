"""The parity pass/fail rule: the one place that decides whether a candidate output matches.

:func:`compare` returns one :class:`~normswap.parity.results.OutputStats` per output;
:func:`judge` adds the noise-floor rule; :func:`~normswap.parity.check.check_parity` gathers
the stats into a :class:`~normswap.parity.results.ParityResult`.

**Pass rule** (decided in one place, :func:`compare_arrays`). For every output of every batch,
with ``reference`` the trusted side of the pair (the original model, or the rewritten model for
``rewritten↔onnxruntime``)::

    scale   = max |reference|
    max_abs = max |candidate - reference|
    passed  = max_abs <= atol + rtol * scale  [+ NOISE_FACTOR * floor]   (OutputStats.allowed)

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
  reported. Where even the reference's output *shape* or integer labels move under that noise, or
  the floor exceeds ``NOT_COMPARABLE`` (10%) of the output's scale (near-tied boxes reordering
  after NMS), the output cannot be judged at this level and counts as nothing compared — a
  detector is then judged on its pre-post-processing tensors (:mod:`normswap.detection`).
* **Too small to judge.** An output whose whole scale is below ``atol`` passes any candidate within
  ``atol``; unless it also matches within ``rtol`` of its own scale, it counts as nothing compared.
* Integer and bool outputs must match exactly. All statistics are computed in float64. A shape
  mismatch or a missing output is a failed :class:`OutputStats` with a ``note``, never an exception.

Pairs are named ``"original↔rewritten"``, ``"original↔onnxruntime"`` and
``"rewritten↔onnxruntime"`` (reference first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from normswap.defaults import DEFAULT_ATOL, DEFAULT_RTOL, NOISE_FACTOR
from normswap.errors import InputError

from .inputs import _as_tuple
from .outputs import _to_numpy, flatten_outputs
from .results import Batch, OutputStats
from .running import _clone_inputs, eval_mode

SCALE_FLOOR = 1e-12  # max_rel = max_abs / max(scale, SCALE_FLOOR)


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
    elif floor is not None and max_abs > tolerance and floor > NOT_COMPARABLE * max(scale, SCALE_FLOOR):
        # a pass inside a floor this large would prove nothing (near-tied boxes reordering after NMS)
        stats.passed, stats.vacuous = True, True
        stats.note = (f"not comparable: the {ref_name} model's own float32 noise moves this output by "
                      f"{floor:.1e} ({floor / max(scale, SCALE_FLOOR):.0%} of its scale)")
    else:
        stats.passed = bool(max_abs <= stats.allowed)
    if stats.passed and not stats.vacuous and not exact and 0 < scale < atol and max_abs > rtol * scale + (
            NOISE_FACTOR * floor if floor is not None and math.isfinite(floor) else 0.0):
        # atol exceeds the whole output: it "passes" whatever the candidate is (a random-weights backbone
        # whose features are 1e-13). Judged relative to its own scale it misses, so it proves nothing.
        stats.vacuous = True
        stats.note = (f"too small to judge: the whole output (scale {scale:.1e}) is below atol; relative to its scale "
                      f"the error is {max_abs / scale:.1e}")
    if stats.passed and not stats.vacuous:
        if r64.size == 0:
            stats.vacuous, stats.note = True, "empty output: nothing compared"
        elif r64.size > 1 and bool((r64.ravel() == r64.ravel()[0]).all()):
            stats.vacuous, stats.note = True, "constant output: every value equal, proves nothing"
    return stats


NOT_COMPARABLE = 0.1  # a noise floor above this fraction of the output's scale: the output cannot be judged


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
    # tree_map: a list of images (a detector's input) is nudged image by image
    if double is not None:
        probe(double, pytree.tree_map(lambda x: x.double() if isinstance(x, Tensor) and x.is_floating_point() else x, xs))
        del double
    nudged = pytree.tree_map(lambda x: torch.nextafter(x, torch.full_like(x, math.inf))
                             if isinstance(x, Tensor) and x.is_floating_point() else x, _clone_inputs(xs))
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
