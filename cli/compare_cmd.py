"""``normswap compare``: every requested norm target side by side on one model (options and rendering;
the stages are :func:`normswap.pipeline.run_comparison`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


from normswap.defaults import DEFAULT_CALIB_BATCH

from .shared_options import (
    CalibBatchOpt,
    CalibOpt,
    CalibSamplesOpt,
    CropOpt,
    DecodeOpt,
    DecodeTolOpt,
    DeviceOpt,
    HeldoutOpt,
    MeanOpt,
    OutputKindOpt,
    SizeOpt,
    StdOpt,
    WorkersOpt,
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
    guarded,
    is_main_process,
    parse_shape,
    print_json,
    progress_for,
    torchrun_aware,
    validate_options,
)

DEFAULT_TARGETS = "fold,gn-ws,gn,ln,ln-channels,in,sn,bin,wn,frozen"
DEFAULT_BATCH_SIZES = "1,2,4,8,32"  # --batch-sizes default (normswap.compare.DEFAULT_BATCH_SIZES)


def parse_batch_sizes(text: str) -> list[int]:
    """'1,2,8,32' or 'default' → sorted distinct batch sizes ≥ 1; one InputError line otherwise
    (torch-free: bad input exits 2 before torch is imported)."""
    from normswap.errors import InputError

    raw = DEFAULT_BATCH_SIZES if text.strip().lower() == "default" else text
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not parts:
        raise InputError("--batch-sizes is empty; e.g. --batch-sizes 1,2,8,32 (or 'default': 1,2,4,8,32)")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--batch-sizes '{text}' is not a comma-separated list of integers; "
                         "e.g. --batch-sizes 1,2,8,32 (or 'default': 1,2,4,8,32)") from None
    bad = [b for b in sizes if b < 1]
    if bad:
        raise InputError(f"--batch-sizes: {bad[0]} is not a batch size; give integers >= 1, e.g. 1,2,8,32")
    return sorted(set(sizes))


def default_plot_path(report: Path | None) -> Path:
    """The sweep's PNG when --plot is not given: beside --report (``cmp.json`` → ``cmp.batch.png``), else
    ``compare.batch.png`` in the current directory."""
    return report.with_suffix(".batch.png") if report is not None else Path("compare.batch.png")


@guarded
@torchrun_aware("report", "plot")
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
    batch_sizes: Annotated[str | None, typer.Option(
        "--batch-sizes", help="also sweep the batch size in training mode: comma-separated sizes, or 'default' "
        f"({DEFAULT_BATCH_SIZES}); prints the sweep and writes a PNG (see --plot).", show_default=False)] = None,
    batch_samples: Annotated[int, typer.Option("--batch-samples", help="samples each batch size is measured on.")] = 256,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="the batch-size sweep's PNG (default: beside --report as NAME.batch.png, else ./compare.batch.png).",
        show_default=False)] = None,
    output_kind: OutputKindOpt = None,
    heldout: HeldoutOpt = None,
    decode: DecodeOpt = None,
    decode_tol: DecodeTolOpt = None,
    latency_budget: Annotated[float, typer.Option(
        "--latency-budget", help="the recommendation considers targets within this × the folded model's onnxruntime latency.")] = 2.0,
    arg: ArgOpt = [],  # noqa: B006 - typer reads the default, never mutates it
    weights: WeightsOpt = None,
    trust_pickle: TrustOpt = False,
    no_strict: NoStrictOpt = False,
    input_shape_: ShapeOpt = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = 0,
    size: SizeOpt = None,
    crop: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compare norm targets: parameters, onnxruntime latency vs the BN-folded model, agreement and
    per-layer drift vs the original (after calibration with --calib), batch independence, exactness;
    with --batch-sizes, how each target's training-mode output and agreement move with the batch size."""

    validate_options(groups=groups, calib_samples=calib_samples, calib_batch=calib_batch, input_shape=input_shape_,
                     runtime=dict(device=device, workers=workers, size=size, crop=crop, mean=mean, std=std, calib=calib))
    sizes = None if batch_sizes is None else parse_batch_sizes(batch_sizes)
    if sizes is None and plot is not None:
        from normswap.errors import InputError

        raise InputError("--plot draws the batch-size sweep; add --batch-sizes (e.g. --batch-sizes 1,2,8,32)")
    if sizes is not None:
        from normswap import validate

        validate.positive_int("--batch-samples", batch_samples)
        if plot is None and is_main_process():
            plot = default_plot_path(report)
    from normswap.load import parse_kv_args
    from normswap.pipeline import run_comparison

    rep = run_comparison(
        model, targets.split(","), args=parse_kv_args(arg or []), weights=weights, trust_pickle=trust_pickle,
        strict=not no_strict, input_shape=None if input_shape_ is None else parse_shape(input_shape_), calib=calib,
        calib_samples=calib_samples, calib_batch=calib_batch, groups=groups, latency=not no_latency, runs=runs,
        threads=threads, report=report, progress=progress_for(json_out), write=is_main_process(),
        batch_sizes=sizes, batch_samples=batch_samples, plot=plot, output_kind=output_kind, heldout=heldout, decode=decode, decode_tol=decode_tol,
        latency_budget=latency_budget, device=device, workers=workers, size=size, crop=crop, mean=mean, std=std,
    )
    if json_out:
        print_json(rep.to_dict())
    else:
        console.print(rep)
