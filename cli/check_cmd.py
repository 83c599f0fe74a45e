"""``normswap check``: does an ONNX file compute what the PyTorch model does?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import normswap
from normswap.errors import InputError

from .common import (
    EXIT_PARITY, ArgOpt, AtolOpt, DebugOpt, JsonOpt, NoStrictOpt, RtolOpt, SamplesOpt,
    ShapeOpt, TrustOpt, WeightsOpt, console, guarded, input_shape, load, load_samples, print_json,
)


@guarded
def check(
    onnx_file: Annotated[Path, typer.Argument(help="the ONNX file to verify.", show_default=False)],
    against: Annotated[str, typer.Option("--against", help="the PyTorch model it must match (a MODEL spec; 'default' = the bundled digits ResNet).")] = "default",
    arg: ArgOpt = [],
    weights: WeightsOpt = None,
    trust_pickle: TrustOpt = False,
    no_strict: NoStrictOpt = False,
    input_shape_: ShapeOpt = None,
    samples: SamplesOpt = None,
    atol: AtolOpt = normswap.parity.DEFAULT_ATOL,
    rtol: RtolOpt = normswap.parity.DEFAULT_RTOL,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compare an ONNX file (run in onnxruntime) with the original PyTorch model, batches 1 and 3."""
    if not onnx_file.is_file():
        raise InputError(f"ONNX file {onnx_file} not found; pass the path normswap convert --onnx wrote")
    loaded = load(None if against == "default" else against, arg, weights, trust_pickle, no_strict)
    shape, _ = input_shape(loaded, input_shape_)
    res = normswap.check_parity(loaded.model, None, onnx_file, input_shape=shape, samples=load_samples(samples), atol=atol, rtol=rtol)
    if json_out:
        print_json({"onnx": str(onnx_file), "model": loaded.spec, "passed": bool(res), "parity": res.to_dict()})
    else:
        console.print(res)
    if not res:
        raise typer.Exit(EXIT_PARITY)
