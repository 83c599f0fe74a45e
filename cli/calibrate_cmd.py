"""Calibration and recovery options shared by ``normswap convert`` / ``recover`` / ``compare``, and the
"keep the trained function" step ``convert --calib`` runs right after the swap (before export and save),
so that export, parity and ``--save`` see the calibrated model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

import normswap
from normswap.errors import InputError
from normswap.recover import DEFAULT_LR

# ---- options ---------------------------------------------------------------------------------
CalibOpt = Annotated[str | None, typer.Option(
    "--calib", help="calibration data (unlabeled): 'digits' (the bundled model's train split), a tensor file "
    "[N, ...] (.pt/.npy/.safetensors), a folder of images, or module:callable returning batches.")]
CalibSamplesOpt = Annotated[int | None, typer.Option("--calib-samples", help="use at most this many calibration samples (default: all).")]
CalibBatchOpt = Annotated[int, typer.Option("--calib-batch", help="calibration / recovery batch size.")]
RecoverStepsOpt = Annotated[int, typer.Option("--recover-steps", help="after calibration, this many label-free distillation steps (0 = none).")]
RecoverBatchOpt = Annotated[int | None, typer.Option("--recover-batch", help="recovery: samples per step, regrouped from the calibration data (default: --calib-batch).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed for recovery (same seed + data = same weights).")]
LrOpt = Annotated[float, typer.Option("--lr", help="recovery: Adam learning rate (cosine-decayed).")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="recovery: distillation temperature.")]
FeatureWeightOpt = Annotated[float, typer.Option("--feature-weight", help="recovery: weight of the per-layer feature matching at swapped sites (0 = logits only).")]
TargetAgreementOpt = Annotated[float | None, typer.Option("--target-agreement", help="recovery: stop once top-1 agreement on the calibration data reaches this.")]
NoAugmentOpt = Annotated[bool, typer.Option("--no-augment", help="recovery: train on the calibration batches as they are (no mixup / shifts).")]

DEFAULT_CALIB_BATCH = 32


def is_bundled(loaded: normswap.LoadedModel) -> bool:
    from normswap.load import DEFAULT_MODEL_SPEC

    return loaded.spec in (None, DEFAULT_MODEL_SPEC) and loaded.weights is None


def calib_data(spec: str, loaded: normswap.LoadedModel, samples: int | None, batch: int):
    from normswap.data import calibration_batches

    return calibration_batches(spec, samples=samples, batch=batch, model=loaded.model)


def heldout_for(loaded: normswap.LoadedModel) -> tuple[Any, str | None]:
    """Labelled held-out data when normswap knows it (the bundled model: the digits test split)."""
    if is_bundled(loaded):
        from normswap.models.digits import load_digits

        return load_digits("test"), "the digits test split (held out)"
    return None, None


def plot_path(report: Path | None, save: Path | None) -> Path | None:
    """The drift plot goes next to the JSON report (``<report>.drift.png``), else into --save."""
    if report is not None:
        return report.with_name(report.stem + ".drift.png")
    if save is not None:
        return save / "drift.png"
    return None


def keep_function_step(
    loaded: normswap.LoadedModel,
    conv: normswap.Conversion,
    *,
    calib: str | None,
    samples: int | None = None,
    batch: int = DEFAULT_CALIB_BATCH,
    recover_steps: int = 0,
    recover_batch: int | None = None,
    seed: int = 0,
    lr: float = DEFAULT_LR,
    report: Path | None = None,
    save: Path | None = None,
    progress: bool = True,
) -> Any:
    """Calibrate (and recover) ``conv`` in place when ``--calib`` is given; returns the
    :class:`normswap.recover.FunctionReport` (None without ``--calib``)."""
    if calib is None:
        if recover_steps:
            raise InputError("--recover-steps needs calibration data: add --calib DATA (e.g. --calib digits)")
        return None
    if conv.to == "fold":
        raise InputError("--calib applies to swap targets; 'fold' is exact and has nothing to calibrate")
    from normswap.recover import keep_function

    data = calib_data(calib, loaded, samples, batch)
    heldout, name = heldout_for(loaded)
    plot = plot_path(report, save)
    return keep_function(
        loaded.model, conv, data, heldout=heldout, heldout_name=name, recover_steps=recover_steps,
        recover_batch=recover_batch, seed=seed, lr=lr, progress=progress, plot=plot,
    )
