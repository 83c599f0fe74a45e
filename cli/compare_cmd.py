"""``normswap compare``: every requested norm target side by side on one model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


from .calibrate_cmd import (
    DEFAULT_CALIB_BATCH,
    CalibBatchOpt,
    CalibOpt,
    CalibSamplesOpt,
    calib_data,
    heldout_for,
)
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
    example_input,
    guarded,
    input_shape,
    load,
    print_json,
    torchrun_aware,
    validate_options,
    write_json,
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
    from normswap.compare import compare_targets
    from normswap.errors import InputError

    from normswap import validate

    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise InputError("--targets is empty; e.g. --targets fold,gn-ws,ln,sn")
    validate_options(groups=groups, calib_samples=calib_samples, calib_batch=calib_batch, input_shape=input_shape_)
    validate.positive_int("--runs", runs)
    validate.positive_int("--threads", threads)
    validate.output_paths({"--report": report}, {"--weights": weights, "--calib": calib, "MODEL": validate.spec_path(model)})
    loaded = load(model, arg, weights, trust_pickle, no_strict)
    shape, _ = input_shape(loaded, input_shape_)
    validate.input_size(shape)
    x = example_input(shape)
    data = calib_data(calib, loaded, calib_samples, calib_batch) if calib is not None else None
    heldout, hname = heldout_for(loaded) if data is not None else (None, None)
    if heldout is not None:
        hx = heldout[0]
        heldout = [(hx[i:i + 256],) for i in range(0, len(hx), 256)]
    rep = compare_targets(
        loaded.model, names, (x,), calib=data, heldout=heldout, heldout_name=hname, groups=groups,
        latency=not no_latency, runs=runs, threads=threads,
        model_name=loaded.spec or "bundled digits ResNet",
    )
    if report is not None:
        write_json(report, rep.to_dict())
    if json_out:
        print_json(rep.to_dict())
    else:
        console.print(rep)
