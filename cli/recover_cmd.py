"""``normswap recover``: label-free distillation of a saved conversion back onto its original model.

The saved directory is data: the original model is MODEL (built as ``normswap convert`` builds it),
the bundled digits model when the record says so, or — only with ``--trust-spec`` — the model the
record names; the conversion is re-applied to it and the saved weights (checked against the record's
sha256) are loaded. Resumes from the checkpoint in ``--checkpoint-dir`` (default
``SAVED_DIR/recover-checkpoints``) when one exists and belongs to this conversion, and saves the
recovered conversion back into SAVED_DIR (or ``--out``), atomically — only when it agrees better with
the original than the saved one did (``--keep-last`` to save the last step anyway). The stages live
in :func:`normswap.pipeline.run_recovery`; this module parses options and renders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from normswap.defaults import DEFAULT_CALIB_BATCH, DEFAULT_LR, DEFAULT_TEMPERATURE
from normswap.errors import InputError

from .shared_options import (
    AmpOpt,
    CalibBatchOpt,
    CalibSamplesOpt,
    CropOpt,
    DeviceOpt,
    FeatureWeightOpt,
    DecodeOpt,
    DecodeTolOpt,
    HeldoutOpt,
    LrOpt,
    MeanOpt,
    NoAugmentOpt,
    OutputKindOpt,
    RecoverBatchOpt,
    SeedOpt,
    SizeOpt,
    StdOpt,
    TargetAgreementOpt,
    TemperatureOpt,
    WorkersOpt,
)
from .common import (
    ArgOpt,
    DebugOpt,
    JsonOpt,
    NoStrictOpt,
    TrustOpt,
    WeightsOpt,
    console,
    guarded,
    is_main_process,
    print_json,
    progress_for,
    torchrun_aware,
    validate_options,
)

CHECKPOINTS = "recover-checkpoints"

# convert's MODEL argument (same forms); only the meaning of omitting it differs
RecoverModelArg = Annotated[
    Optional[str],
    typer.Argument(
        help="the original model, as for `normswap convert`: package.module:callable, path/to/file.py:callable, "
        "or a pickled model file (needs --trust-pickle). Omit it for a conversion of the bundled digits "
        "ResNet, or with --trust-spec to build the model SAVED_DIR's record names.",
        show_default=False,
    ),
]
TrustSpecOpt = Annotated[bool, typer.Option(
    "--trust-spec", help="without MODEL, import and call the model spec SAVED_DIR's conversion.json names "
    "(runs code the directory chooses: only for directories you trust).")]


@guarded
@torchrun_aware("report")
def recover(
    saved_dir: Annotated[Path, typer.Argument(help="a conversion saved with `normswap convert --save DIR`.", show_default=False)],
    calib: Annotated[str, typer.Option("--calib", help="unlabeled data: 'digits', a tensor file [N, ...] (.pt/.npy/.safetensors), an image folder, or module:callable.")],
    model: RecoverModelArg = None,
    steps: Annotated[int, typer.Option("--steps", help="distillation steps (one batch each).")] = 200,
    calib_samples: CalibSamplesOpt = None,
    calib_batch: CalibBatchOpt = DEFAULT_CALIB_BATCH,
    recover_batch: RecoverBatchOpt = None,
    lr: LrOpt = DEFAULT_LR,
    temperature: TemperatureOpt = DEFAULT_TEMPERATURE,
    feature_weight: FeatureWeightOpt = 0.0,
    seed: SeedOpt = 0,
    target_agreement: TargetAgreementOpt = None,
    no_augment: NoAugmentOpt = False,
    checkpoint_dir: Annotated[Path | None, typer.Option("--checkpoint-dir", help=f"where checkpoints go (default: SAVED_DIR/{CHECKPOINTS}).")] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="checkpoint every N steps.")] = 50,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="start from the saved conversion even if a checkpoint exists.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="save the recovered conversion here (default: back into SAVED_DIR).")] = None,
    report: Annotated[Path | None, typer.Option("--report", help="write the JSON report here.")] = None,
    arg: ArgOpt = [],
    weights: WeightsOpt = None,
    trust_spec: TrustSpecOpt = False,
    trust_pickle: TrustOpt = False,
    no_strict: NoStrictOpt = False,
    output_kind: OutputKindOpt = None,
    heldout: HeldoutOpt = None,
    decode: DecodeOpt = None,
    decode_tol: DecodeTolOpt = None,
    keep_last: Annotated[bool, typer.Option("--keep-last", help="save the last step even when it agrees less with the original than the saved conversion.")] = False,
    device: DeviceOpt = "auto",
    amp: AmpOpt = None,
    workers: WorkersOpt = 0,
    size: SizeOpt = None,
    crop: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Distil the original model into a saved (swapped) conversion, without labels; resumable. The
    result is saved back only when agreement with the original improved (--keep-last to save it anyway)."""

    if steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}")
    validate_options(calib_samples=calib_samples, calib_batch=calib_batch, recover_batch=recover_batch, lr=lr,
                     runtime=dict(device=device, amp=amp, workers=workers, size=size, crop=crop, mean=mean, std=std,
                                  calib=calib, recover_steps=steps))
    from normswap.load import parse_kv_args
    from normswap.pipeline import run_recovery

    result = run_recovery(
        saved_dir, calib, model=model, args=parse_kv_args(arg or []), weights=weights, trust_spec=trust_spec,
        trust_pickle=trust_pickle, strict=not no_strict, steps=steps, calib_samples=calib_samples, calib_batch=calib_batch,
        recover_batch=recover_batch, lr=lr, temperature=temperature, feature_weight=feature_weight, seed=seed,
        target_agreement=target_agreement, augment=not no_augment, checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every, resume=not no_resume, keep_last=keep_last, out=out, report=report,
        progress=progress_for(json_out), write=is_main_process(), output_kind=output_kind, heldout=heldout, decode=decode, decode_tol=decode_tol,
        device=device, amp=amp, workers=workers, size=size, crop=crop, mean=mean, std=std,
    )
    if json_out:
        print_json(result.to_dict())
        return
    console.print(result)
