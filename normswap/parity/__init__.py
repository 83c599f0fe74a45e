"""Numerical parity: does the rewritten / exported model compute what the original did?

Results are objects (in the spirit of Polygraphy's comparator): :func:`compare` returns one
:class:`OutputStats` per output, :func:`check_parity` gathers them into a :class:`ParityResult`
that is truthy when everything passed, serialises to JSON and renders as a rich table.

**Pass rule** (in full in :mod:`normswap.parity.rule`, the one place that decides): per output,
``max |candidate - reference| <= atol + rtol * max |reference|`` (plus ``NOISE_FACTOR`` × the
reference model's own float32 noise, measured only when the tolerance is missed). NaN/Inf fail;
integer and bool outputs must match exactly; a result resting only on empty or constant outputs
is ``nothing compared``, not ``passed``.

Modules: :mod:`~normswap.parity.results` (result objects, JSON, rendering),
:mod:`~normswap.parity.outputs` (flattening outputs), :mod:`~normswap.parity.rule` (pass/fail,
noise floor), :mod:`~normswap.parity.inputs` (seeded inputs), :mod:`~normswap.parity.running`
(torch runs in eval mode), :mod:`~normswap.parity.runtime` (onnxruntime sessions),
:mod:`~normswap.parity.check` (:func:`check_parity`), :mod:`~normswap.parity.divergence`
(:func:`first_divergence`).

Pairs are named ``"original↔rewritten"``, ``"original↔onnxruntime"`` and
``"rewritten↔onnxruntime"`` (reference first).
"""

from __future__ import annotations

from normswap.defaults import DEFAULT_ATOL, DEFAULT_RTOL

from .check import _run_failure, check_parity
from .divergence import _COMPARED_OPS, _node_label, _node_mismatch, _StopRun, _tensor_leaves, first_divergence
from .inputs import _as_shapes, _as_tuple, make_inputs
from .outputs import _is_array, _key_part, _to_numpy, flatten_outputs, output_name
from .results import (
    NOISE_FACTOR,
    PAIR_ORIGINAL_ORT,
    PAIR_ORIGINAL_REWRITTEN,
    PAIR_REWRITTEN_ORT,
    VERDICT_FAILED,
    VERDICT_NOTHING,
    VERDICT_PASSED,
    Batch,
    OutputStats,
    ParityResult,
    _fmt,
    _from_json_float,
    _json_safe,
)
from .rule import (
    SCALE_FLOOR,
    _abs_max,
    _failed,
    _is_exact,
    _non_finite,
    _over_tolerance,
    _sides,
    _vacuous,
    check_tolerances,
    compare,
    compare_arrays,
    judge,
    noise_floor,
)
from .running import _clone_inputs, _run_torch, eval_mode
from .runtime import (
    _OPT_LEVELS,
    _ORT_TYPES,
    _SESSION_CACHE,
    _SESSION_CACHE_SIZE,
    _SESSION_LOCK,
    _session,
    clear_session_cache,
    make_session,
    run_onnxruntime,
    session_feed,
)

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
