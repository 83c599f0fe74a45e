"""``normswap convert``: parse the options, run :func:`normswap.pipeline.run_conversion`, render its
result, map its verdict to the exit code. The stages and the verdict rules live in the library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from normswap.defaults import DEFAULT_ATOL, DEFAULT_CALIB_BATCH, DEFAULT_LR, DEFAULT_RTOL

from .shared_options import (
    AmpOpt,
    CalibBatchOpt,
    CalibOpt,
    CalibSamplesOpt,
    CropOpt,
    DecodeOpt,
    DecodeTolOpt,
    DeviceOpt,
    HeldoutOpt,
    LrOpt,
    MeanOpt,
    OutputKindOpt,
    RecoverBatchOpt,
    RecoverStepsOpt,
    SeedOpt,
    SizeOpt,
    StdOpt,
    WorkersOpt,
)
from .common import (
    ArgOpt,
    AtolOpt,
    DebugOpt,
    JsonOpt,
    ModelArg,
    NoStrictOpt,
    RtolOpt,
    SamplesOpt,
    ShapeOpt,
    TrustOpt,
    WeightsOpt,
    console,
    err_console,
    guarded,
    parse_shape,
    print_json,
    progress_for,
    torchrun_aware,
    validate_options,
)


@guarded
@torchrun_aware("onnx", "save", "report", "front_plot")
def convert(
    model: ModelArg = None,
    to: Annotated[str, typer.Option("--to", "-t", help="fold, or a norm target (see `normswap targets`).")] = "fold",
    onnx: Annotated[Optional[Path], typer.Option("--onnx", "-o", help="write the rewritten model as ONNX here (only if parity passes).")] = None,
    save: Annotated[Optional[Path], typer.Option("--save", help="save the conversion (safetensors + JSON record) into this directory.")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="write the JSON report here.")] = None,
    arg: ArgOpt = [],
    weights: WeightsOpt = None,
    trust_pickle: TrustOpt = False,
    no_strict: NoStrictOpt = False,
    input_shape_: ShapeOpt = None,
    samples: SamplesOpt = None,
    groups: Annotated[Optional[int], typer.Option("--groups", help="GroupNorm groups (default: 32, else the divisor of C closest to it).")] = None,
    exporter: Annotated[str, typer.Option("--exporter", help="auto, dynamo or torchscript.")] = "auto",
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default chosen per exporter).")] = None,
    atol: AtolOpt = DEFAULT_ATOL,
    rtol: RtolOpt = DEFAULT_RTOL,
    keep_failed: Annotated[bool, typer.Option("--keep-failed", help="write the ONNX even when parity fails.")] = False,
    calib: CalibOpt = None,
    calib_samples: CalibSamplesOpt = None,
    calib_batch: CalibBatchOpt = DEFAULT_CALIB_BATCH,
    recover_steps: RecoverStepsOpt = 0,
    recover_batch: RecoverBatchOpt = None,
    output_kind: OutputKindOpt = None,
    heldout: HeldoutOpt = None,
    decode: DecodeOpt = None,
    decode_tol: DecodeTolOpt = None,
    seed: SeedOpt = 0,
    lr: LrOpt = DEFAULT_LR,
    fold_norms: Annotated[Optional[str], typer.Option("--fold-norms", help="with --to fold --calib: which per-sample norms (GroupNorm, LayerNorm, ...) become fitted affines and fold: auto (while the held-out drop stays within --max-drop), all, or site names separated by commas.")] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="with --fold-norms auto: the largest held-out drop of the output kind's quality allowed (default 0.01).")] = None,
    front_latency: Annotated[bool, typer.Option("--front-latency", help="with --to fold --calib: also fold, export and time (onnxruntime CPU, batch 1, 1 thread) every point of the front (sites folded cheapest first): a table of held-out quality against latency ×the original, the latency each site saves, and a PNG (see --front-plot). Off by default: it adds 2-4 s to the digits models' fit-norms stage (one fold, ONNX export and timing per front point).")] = False,
    front_plot: Annotated[Optional[Path], typer.Option("--front-plot", help="the front's PNG, latency against held-out quality, the chosen point marked (implies --front-latency; default: beside --report as NAME.front.png).", show_default=False)] = None,
    images: Annotated[Optional[int], typer.Option("--images", help="the model takes a list of this many images (C,H,W from --input-shape); torchvision detectors are recognised and default to 1. The ONNX takes exactly that many.")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float16 or bfloat16: convert and verify a half-precision copy (fold only; default: the model's own dtype).")] = None,
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
    """Rewrite the model's BatchNorms (fold them, or swap them for another norm), export, verify."""

    # the CLI's own names for the options in every message; the library checks them again
    validate_options(atol=atol, rtol=rtol, groups=groups, calib_samples=calib_samples, calib_batch=calib_batch,
                     recover_steps=recover_steps, recover_batch=recover_batch, lr=lr, input_shape=input_shape_,
                     runtime=dict(device=device, amp=amp, workers=workers, size=size, crop=crop, mean=mean, std=std,
                                  calib=calib, recover_steps=recover_steps))
    from normswap.load import parse_kv_args
    from normswap.pipeline import run_conversion

    result = run_conversion(
        model, to, args=parse_kv_args(arg or []), weights=weights, trust_pickle=trust_pickle, strict=not no_strict,
        input_shape=None if input_shape_ is None else parse_shape(input_shape_), samples=samples, groups=groups,
        exporter=exporter, opset=opset, atol=atol, rtol=rtol, keep_failed=keep_failed, calib=calib,
        calib_samples=calib_samples, calib_batch=calib_batch, recover_steps=recover_steps, recover_batch=recover_batch,
        seed=seed, lr=lr, onnx=onnx, save=save, report=report, progress=progress_for(json_out), dtype=dtype,
        images=images, output_kind=output_kind, heldout=heldout, decode=decode, decode_tol=decode_tol, device=device, amp=amp, workers=workers, size=size,
        crop=crop, mean=mean, std=std, fold_norms=fold_norms, max_drop=max_drop,
        front_latency=front_latency, front_plot=front_plot,
    )
    if json_out:
        print_json(result.to_dict())
    else:
        for note in result.model_info["notes"]:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
        console.print(result)
    for note in result.notes:
        err_console.print(note, highlight=False)
    if result.exit_code:
        raise typer.Exit(result.exit_code)
