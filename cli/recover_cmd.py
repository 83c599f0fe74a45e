"""``normswap recover``: label-free distillation of a saved conversion back onto its original model.

The saved directory is data: the original model is MODEL (built as ``normswap convert`` builds it),
the bundled digits model when the record says so, or — only with ``--trust-spec`` — the model the
record names; the conversion is re-applied to it and the saved weights (checked against the record's
sha256) are loaded. Resumes from the checkpoint in ``--checkpoint-dir`` (default
``SAVED_DIR/recover-checkpoints``) when one exists and belongs to this conversion, and saves the
recovered conversion back into SAVED_DIR (or ``--out``), atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

import normswap
from normswap.errors import InputError
from normswap.recover import DEFAULT_LR, DEFAULT_TEMPERATURE

from .calibrate_cmd import (
    DEFAULT_CALIB_BATCH,
    CalibBatchOpt,
    CalibSamplesOpt,
    FeatureWeightOpt,
    LrOpt,
    NoAugmentOpt,
    RecoverBatchOpt,
    SeedOpt,
    TargetAgreementOpt,
    TemperatureOpt,
    calib_data,
    heldout_for,
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
    load,
    print_json,
    torchrun_aware,
    validate_options,
    write_json,
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
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Distil the original model into a saved (swapped) conversion, without labels; resumable."""
    from normswap.calibrate import accuracy, agreement
    from normswap.recover import recover as run_recover

    from normswap import validate

    if steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}")
    validate_options(calib_samples=calib_samples, calib_batch=calib_batch, recover_batch=recover_batch, lr=lr)
    validate.finite_positive("--temperature", temperature)
    validate.finite_positive("--feature-weight", feature_weight, allow_zero=True)
    validate.positive_int("--checkpoint-every", checkpoint_every)
    if target_agreement is not None and not (0.0 < target_agreement <= 1.0):
        raise InputError(f"--target-agreement {target_agreement} must be in (0, 1], e.g. 0.99")
    validate.output_paths(
        {"--report": report, "--out": out, "--checkpoint-dir": checkpoint_dir},
        {"--weights": weights, "--calib": calib, "MODEL": validate.spec_path(model)},
        directories=("--out", "--checkpoint-dir"),
    )
    from normswap.saved import read_record, untrusted_spec_message, uses_bundled_model

    rec = read_record(saved_dir)  # validated, weights hash checked; runs nothing
    if rec["to"] == "fold":
        raise InputError(f"{saved_dir} holds a 'fold' conversion, which is exact: there is nothing to recover")
    src = rec["source"] or {}
    if model is not None:  # the teacher is the user's model, with --weights or the recorded weights file
        teacher = load(model, arg, weights or src.get("weights"), trust_pickle, no_strict)
    else:
        if arg:
            raise InputError("--arg applies to MODEL; give the model too: normswap recover SAVED_DIR MODEL --arg ...")
        if rec["source"] is None:
            raise InputError(f"{saved_dir / 'conversion.json'} does not name its model; pass it: normswap recover {saved_dir} MODEL")
        if not uses_bundled_model(rec) and not trust_spec:
            raise InputError(untrusted_spec_message(saved_dir, rec))
        teacher = normswap.load_model(src.get("spec"), args=src.get("args") or {}, weights=weights or src.get("weights"),
                                      trust_pickle=trust_pickle, strict=not no_strict)
    if getattr(teacher, "random_init", False):  # a fresh random model is not the one the conversion came from
        raise InputError(
            f"the original model for {saved_dir} builds random weights on every load, so it is not the model that was "
            "converted; pass --weights FILE (the weights it was converted from) or the spec's pretrained argument"
        )
    conv = normswap.load_conversion(saved_dir, model=teacher.model)  # rewrites a copy: the teacher stays as it is
    data = calib_data(calib, teacher, calib_samples, calib_batch)
    ckdir = checkpoint_dir if checkpoint_dir is not None else saved_dir / CHECKPOINTS
    rep = run_recover(
        teacher.model, conv, data, steps=steps, lr=lr, temperature=temperature, feature_weight=feature_weight,
        seed=seed, augment=not no_augment, checkpoint_dir=ckdir, checkpoint_every=checkpoint_every,
        resume=not no_resume, target_agreement=target_agreement, progress=not json_out, batch_size=recover_batch,
    )
    dest = out if out is not None else saved_dir
    if is_main_process():  # under torchrun every rank holds the same model; one writes it
        normswap.save_conversion(conv, dest)
    result = {"saved": str(dest), "to": conv.to, "recovery": rep.to_dict()}
    heldout, name = heldout_for(teacher)
    if heldout is not None:
        x, y = heldout
        result["heldout"] = {"data": name, "top1_agreement": agreement(teacher.model, conv.model, x)["top1_agreement"],
                             "accuracy": accuracy(conv.model, x, y), "original_accuracy": accuracy(teacher.model, x, y)}
    if report is not None:
        write_json(report, result)
    if json_out:
        print_json(result)
        return
    console.print(rep)
    for n in rep.notes:
        console.print(f"[yellow]note:[/] {n}")
    if "heldout" in result:
        h = result["heldout"]
        console.print(f"on {h['data']}: top-1 agreement {h['top1_agreement']:.4f}, accuracy {h['accuracy']:.4f} "
                      f"(original {h['original_accuracy']:.4f})")
    console.print(f"saved: {dest} (checkpoints: {ckdir})")
