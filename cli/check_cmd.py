"""``normswap check``: does an ONNX file compute what the PyTorch model does? Options and rendering;
the checks and the verdict are :func:`normswap.pipeline.run_check`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from normswap.defaults import DEFAULT_ATOL, DEFAULT_RTOL

from .common import (
    ArgOpt, AtolOpt, DebugOpt, JsonOpt, NoStrictOpt, RtolOpt, SamplesOpt,
    ShapeOpt, TrustOpt, WeightsOpt, console, guarded, parse_shape, print_json, validate_options,
)

_AGAINST_DEFAULT = "default"


@guarded
def check(
    onnx_file: Annotated[Path, typer.Argument(help="the ONNX file to verify.", show_default=False)],
    against: Annotated[str, typer.Option("--against", help="the PyTorch model it must match (a MODEL spec, with --weights for its trained weights; 'default' = the bundled digits ResNet).")] = _AGAINST_DEFAULT,
    arg: ArgOpt = [],
    weights: WeightsOpt = None,
    trust_pickle: TrustOpt = False,
    no_strict: NoStrictOpt = False,
    input_shape_: ShapeOpt = None,
    samples: SamplesOpt = None,
    atol: AtolOpt = DEFAULT_ATOL,
    rtol: RtolOpt = DEFAULT_RTOL,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compare an ONNX file (run in onnxruntime) with the original PyTorch model, batches 1 and 3."""
    from normswap.load import parse_kv_args
    from normswap.pipeline import run_check

    validate_options(atol=atol, rtol=rtol, input_shape=input_shape_)
    result = run_check(
        onnx_file, None if against == _AGAINST_DEFAULT else against, args=parse_kv_args(arg or []), weights=weights,
        trust_pickle=trust_pickle, strict=not no_strict, input_shape=None if input_shape_ is None else parse_shape(input_shape_),
        samples=samples, atol=atol, rtol=rtol,
    )
    if json_out:
        print_json(result.to_dict())
    else:
        console.print(result)
    if result.exit_code:
        raise typer.Exit(result.exit_code)
