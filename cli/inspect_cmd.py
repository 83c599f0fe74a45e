"""``normswap inspect``: every norm site and what a pass would do there, or why not."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

import normswap
from normswap.report import sites_table

from .common import (
    ArgOpt, DebugOpt, JsonOpt, ModelArg, NoStrictOpt, ShapeOpt, TrustOpt, WeightsOpt,
    console, guarded, parse_shape, print_json, validate_options,
)


@guarded
def inspect(
    model: ModelArg = None,
    to: Annotated[str, typer.Option("--to", "-t", help="the pass to plan: fold or a norm target.")] = "fold",
    arg: ArgOpt = [],
    weights: WeightsOpt = None,
    trust_pickle: TrustOpt = False,
    no_strict: NoStrictOpt = False,
    input_shape_: ShapeOpt = None,
    groups: Annotated[Optional[int], typer.Option("--groups", help="GroupNorm groups, for swap targets.")] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List every norm site: name, type, producer, what --to would do there, or why not."""
    from normswap.load import parse_kv_args
    from normswap.pipeline import example_input, example_shape, load_stage

    validate_options(groups=groups, input_shape=input_shape_)
    loaded = load_stage(model, args=parse_kv_args(arg or []), weights=weights, trust_pickle=trust_pickle, strict=not no_strict)
    shape, src = example_shape(loaded, None if input_shape_ is None else parse_shape(input_shape_), batch_sizes=(1,))
    rows = normswap.inspect(loaded.model, (example_input(shape),), to=to, groups=groups)
    if json_out:
        print_json({"model": loaded.spec, "input_shape": list(shape), "to": to, "sites": rows})
        return
    console.print(sites_table(rows, title=f"{loaded.spec or 'bundled digits ResNet'}: {len(rows)} norm site(s), --to {to}, input {list(shape)} ({src})"))
