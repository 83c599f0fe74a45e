"""keep_function: naive swap → calibration → recovery, measured after each stage on held-out data."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from torch import Tensor, nn

from ..calibrate import accuracy, agreement_and_drift, calibrate, swapped_sites
from ...defaults import DEFAULT_LR, DEFAULT_RECOVER_BATCH, DEFAULT_TEMPERATURE
from .plot import save_drift_plot
from .report import FunctionReport, StageMetrics
from .train import recover


def _labelled(heldout: Any) -> bool:
    """(x, y) with labels: two tensors of the same length, y integer / bool or of lower rank than x."""
    if not (isinstance(heldout, (tuple, list)) and len(heldout) == 2 and all(isinstance(t, Tensor) for t in heldout)):
        return False
    x, y = heldout
    if y.dim() == 0 or x.dim() == 0 or len(x) != len(y):
        return False
    return not y.is_floating_point() or y.dim() < x.dim()


def _split_eval(heldout: Any) -> tuple[Any, Tensor | None, Tensor | None]:
    """(inputs for agreement, x, y) from (x, y) labelled data, x, or batches."""
    if _labelled(heldout):
        x, y = heldout
        return [(x[i:i + 256],) for i in range(0, len(x), 256)], x, y
    return heldout, None, None


def check_finite_model(model: nn.Module, stage: str, measures: Any = None) -> None:
    """Raise :class:`~normswap.errors.NonFiniteError` when ``stage`` left a parameter or buffer of ``model``
    non-finite, or its held-out outputs (``measures``' output rel err is NaN): such a model is never written."""
    import math

    import torch

    from ...errors import NonFiniteError

    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{stage} turned the model non-finite ({name} holds NaN/Inf); nothing was saved or exported"
                                 + ("; lower --lr" if stage == "recovery" else "; check the calibration data"))
    rel = None if measures is None else measures.get("rel_err")
    if rel is not None and not math.isfinite(rel):
        raise NonFiniteError(f"after {stage} the model outputs NaN/Inf on the held-out data; nothing was saved or exported")


def keep_function(
    original: nn.Module,
    conversion: Any,
    calib: Any,
    *,
    heldout: Any = None,
    heldout_name: str | None = None,
    heldout_fraction: float | None = None,
    split_seed: int | None = None,
    output_kind: Any = None,
    decode: Any = None,
    decode_tol: float | None = None,
    calibrate_: bool = True,
    recover_steps: int = 0,
    recover_batch: int | None = None,
    seed: int = 0,
    lr: float = DEFAULT_LR,
    temperature: float = DEFAULT_TEMPERATURE,
    feature_weight: float = 0.0,
    augment: bool = True,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    target_agreement: float | None = None,
    progress: Any = True,
    plot: str | os.PathLike[str] | None = None,
    check: bool = True,
    amp: str | None = None,
) -> FunctionReport:
    """Naive swap → calibration → recovery on ``conversion`` (its model is changed in place), measured
    against ``original`` after each stage on **held-out** data, with per-layer drift and the drift plot
    written to ``plot`` (PNG).

    ``heldout``: (x, labels), inputs, or batches, never fitted on; labels add the kind's ground-truth
    measure (accuracy for a classifier, per-label accuracy, R², pixel accuracy). Without it,
    ``heldout_fraction`` (default :data:`normswap.keep.heldout.HELDOUT_FRACTION`, 0.2) of ``calib`` is held
    out by a split seeded with ``split_seed`` (default 0; :func:`normswap.keep.heldout.split_heldout`) and
    calibration and recovery use the rest; ``heldout_fraction=0`` measures on the calibration data
    itself (labelled so in the report). ``output_kind``: see :mod:`normswap.keep.kinds` (default: detected
    from the original's outputs); ``decode`` / ``decode_tol``: read the outputs through a decoder
    (:func:`normswap.keep.kinds.resolve_decoder`; default: the model's ``normswap_decode``). ``check``: the never-worse rules on the held-out data — calibration's
    checks (see :func:`~normswap.keep.calibrate.calibrate`) and recovery's keep-best (it ends on the weights of
    its best held-out evaluation, the calibrated ones included, when that is lower beyond noise). ``amp``: recovery's mixed precision (:func:`recover`).
    Returns a :class:`FunctionReport`."""
    from ..calibrate.never_worse import HeldoutRecord
    from ..heldout import HELDOUT_FRACTION, HELDOUT_SEED, split_heldout
    from ..kinds import detect

    model = conversion.model
    split_info = None
    if heldout is None and heldout_fraction != 0:
        split = split_heldout(calib, HELDOUT_FRACTION if heldout_fraction is None else heldout_fraction,
                              HELDOUT_SEED if split_seed is None else split_seed)
        calib, heldout = split.calib, split.heldout
        heldout_name = heldout_name or split.describe()
        split_info = split.to_dict()
    if _labelled(heldout):
        from ...load.data import check_finite

        check_finite(heldout[0], heldout_name or "the held-out data")
    eval_data, x, y = _split_eval(heldout if heldout is not None else calib)
    where = heldout_name or ("held-out data" if heldout is not None else "the calibration data (not held out)")
    if split_info is None:
        split_info = {"description": where, "separate": heldout is not None}
    if calibrate_ and check and heldout is not None:
        split_info["check"] = ("calibration's never-worse check chose each site's parameters (fitted or previous) on this "
                               "held-out data too: check=False keeps every fit")
    outputs = detect(original, eval_data, output_kind, max_batches=1, decode=decode, decode_tol=decode_tol)
    sites = swapped_sites(original, model, conversion)

    def truth(m: nn.Module) -> float | None:
        return None if y is None else accuracy(m, x, y, output_kind=outputs)

    def measure(stage: str, record: Any = None) -> StageMetrics:
        agree, drift = agreement_and_drift(original, model, eval_data, sites=sites, output_kind=outputs, record=record)
        return StageMetrics(stage=stage, agreement=agree, accuracy=truth(model), drift=drift)

    # the naive measure's pass of both models over the held-out data is kept for calibration's checks,
    # which then run neither model again for the original's outputs or the naive swap's loss
    record = HeldoutRecord() if calibrate_ and heldout is not None else None
    rep = FunctionReport(target=conversion.to, evaluated_on=where, original_accuracy=truth(original),
                         stages=[measure("naive", record)],
                         output_kind=outputs.describe(), truth_label=outputs.kind.truth_label,
                         truth_proportion=getattr(outputs.kind, 'truth_proportion', False), heldout=split_info)
    if calibrate_:
        t0 = time.perf_counter()
        try:
            total = len(calib) if hasattr(calib, "__len__") else None
        except TypeError:  # a callable's data: its length is known only after iterating
            total = None
        with (progress.stage("calibrate", total=total) if hasattr(progress, "stage") else contextlib.nullcontext()) as task:
            rep.calibration = calibrate(original, conversion, calib, on_batch=None if task is None else task.advance,
                                        output_kind=outputs, heldout=eval_data if heldout is not None else None,
                                        heldout_name=where, check=check, heldout_record=record)
        record = None  # (its tensors are not needed any more)
        rep.seconds["calibrate"] = time.perf_counter() - t0
        rep.stages.append(measure("calibrated"))
        check_finite_model(model, "calibration", rep.stages[-1].agreement)
    if recover_steps > 0:
        t0 = time.perf_counter()
        rep.recovery = recover(original, conversion, calib, steps=recover_steps, lr=lr, temperature=temperature,
                               feature_weight=feature_weight, seed=seed, augment=augment,
                               checkpoint_dir=checkpoint_dir, target_agreement=target_agreement, progress=progress,
                               batch_size=DEFAULT_RECOVER_BATCH if recover_batch is None else recover_batch, output_kind=outputs,
                               heldout=eval_data if heldout is not None else None, amp=amp,
                               keep_best=check)
        rep.seconds["recover"] = time.perf_counter() - t0
        rep.stages.append(measure("recovered"))
        check_finite_model(model, "recovery", rep.stages[-1].agreement)
    if plot is not None:
        rep.plot = str(save_drift_plot(rep, plot))
    return rep
