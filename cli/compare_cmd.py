"""``normswap compare``: every requested norm target side by side on one model (options and rendering;
the stages are :func:`normswap.pipeline.run_comparison`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


from normswap.defaults import DEFAULT_CALIB_BATCH

from .calibrate_cmd import CalibBatchOpt, CalibOpt, CalibSamplesOpt
from .common import (
    ArgOpt,
    DebugOpt,
    JsonOpt,
    ModelArg,
    NoStrictOpt,
    ShapeOpt,
    TrustOpt,
    WeightsOpt,
    console,
    guarded,
    is_main_process,
    parse_shape,
    print_json,
    progress_for,
    torchrun_aware,
    validate_options,
)

DEFAULT_TARGETS = "fold,gn-ws,gn,ln,ln-channels,in,sn,bin,wn,frozen"


@guarded
@torchrun_aware("report")
def compare(
    model: ModelArg = None,
    targets: Annotated[str, typer.Option("--targets", help="comma-separated targets (fold and/or norm targets).")] = DEFAULT_TARGETS,
    calib: CalibOpt = None,
    calib_samples: CalibSamplesOpt = 256,
    calib_batch: CalibBatchOpt = DEFAULT_CALIB_BATCH,
    groups: Annotated[int | None, typer.Option("--groups", help="GroupNorm groups (default: 32, else the divisor of C closest to it).")] = None,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="skip the ONNX export and onnxruntime timing.")] = False,
    runs: Annotated[int, typer.Option("--runs", help="onnxruntime runs per timing round.")] = 20,
    threads: Annotated[int, typer.Option("--threads", help="onnxruntime intra-op threads for timing.")] = 1,
    report: Annotated[Path | None, typer.Option("--report", help="write the JSON here.")] = None,
    arg: ArgOpt = [],  # noqa: B006 - typer reads the default, never mutates it
    weights: WeightsOpt = None,
    trust_pickle: TrustOpt = False,
    no_strict: NoStrictOpt = False,
    input_shape_: ShapeOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compare norm targets: parameters, onnxruntime latency vs the BN-folded model, agreement and
    per-layer drift vs the original (after calibration with --calib), batch independence, exactness."""
    from normswap.load import parse_kv_args
    from normswap.pipeline import run_comparison

    validate_options(groups=groups, calib_samples=calib_samples, calib_batch=calib_batch, input_shape=input_shape_)
    rep = run_comparison(
        model, targets.split(","), args=parse_kv_args(arg or []), weights=weights, trust_pickle=trust_pickle,
        strict=not no_strict, input_shape=None if input_shape_ is None else parse_shape(input_shape_), calib=calib,
        calib_samples=calib_samples, calib_batch=calib_batch, groups=groups, latency=not no_latency, runs=runs,
        threads=threads, report=report, progress=progress_for(json_out), write=is_main_process(),
    )
    if json_out:
        print_json(rep.to_dict())
    else:
        console.print(rep)
