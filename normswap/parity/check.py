"""The parity check: run the original, the rewritten model and the ONNX file on the same inputs
and judge every pair with :mod:`normswap.parity.rule`."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from normswap.defaults import DEFAULT_ATOL, DEFAULT_RTOL
from normswap.errors import InputError, NormswapError, first_line

from .inputs import _as_tuple, make_inputs
from .results import PAIR_ORIGINAL_ORT, PAIR_ORIGINAL_REWRITTEN, PAIR_REWRITTEN_ORT, Batch, OutputStats, ParityResult
from .rule import _failed, check_tolerances, judge
from .runtime import run_onnxruntime
from .running import _run_torch, eval_mode


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
    input_dtype: Any = None,
) -> ParityResult:
    """Compare ``rewritten`` and the ONNX file against ``original`` (and ONNX against ``rewritten``).

    ``reference_name`` labels ``original`` in the comparison pairs, e.g. "rewritten" when checking a
    function-changing swap against its own export (``check_parity(swapped, None, onnx, ...)``).

    Inputs: ``inputs`` as ``[(label, (x, ...)), ...]``, else seeded random tensors of
    ``input_shape`` at each of ``batch_sizes``; ``samples`` (a user tensor ``[N, ...]`` or a tuple
    of them) is one more batch labelled "samples". ``input_dtype`` (e.g. ``torch.float16``): the generated
    inputs are drawn in float32 and cast to it (same values as a float32 run, rounded). Models run in eval mode under no_grad; their
    training flags are restored afterwards and inputs are cloned per run, so nothing the caller
    owns is modified. A failure of the original is an :class:`InputError`; a failure of the
    rewritten model or of onnxruntime is recorded as a failed comparison with a note.
    """
    check_tolerances(atol, rtol)
    batches: list[tuple[Batch, tuple[Any, ...]]] = []
    if inputs is not None:
        batches.extend((label, _as_tuple(xs)) for label, xs in inputs)
    elif input_shape is not None:
        generated = make_inputs(input_shape, batch_sizes=batch_sizes, seed=seed)
        if input_dtype is not None:
            generated = [(b, tuple(x.to(input_dtype) if x.is_floating_point() else x for x in xs)) for b, xs in generated]
        batches.extend(generated)
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


def _run_failure(pair: str, batch: Batch, note: str) -> OutputStats:
    return _failed(pair, "*", batch, (), math.nan, note)
