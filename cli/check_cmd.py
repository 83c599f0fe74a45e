"""``normswap check``: does an ONNX file compute what the PyTorch model does?

The verdict cannot lie: before anything is compared, the command refuses (exit 2, one line) what
would make a pass or a failure meaningless --

* tolerances that are negative or not finite;
* an ONNX path that is not a readable ONNX model (missing, a directory, empty, truncated, text);
  checked before the PyTorch model is loaded;
* a reference model whose weights are a random initialisation (``--against`` a spec built without
  ``--weights`` or a pretrained argument: every load draws new weights, so no export can match);
* an ONNX input whose static shape does not fit the reference model's input (typically: no
  ``--against`` given, so the bundled digits ResNet, ``[N, 1, 8, 8]``, is used).

Which model the file is compared against is always said: one line before the table, and under
``"against"`` in ``--json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

import normswap
from normswap.defaults import DEFAULT_ATOL, DEFAULT_RTOL
from normswap.errors import InputError

from .common import (
    ArgOpt, AtolOpt, DebugOpt, JsonOpt, NoStrictOpt, RtolOpt, SamplesOpt,
    ShapeOpt, TrustOpt, WeightsOpt, console, guarded, input_shape, load, load_samples, print_json, verdict_exit_code,
)

BUNDLED = "the bundled digits ResNet"
_AGAINST_DEFAULT = "default"


def _one_line(text: object, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _not_readable(path: Path, why: str) -> InputError:
    return InputError(
        f"{path} is not a readable ONNX model ({why}); pass the file normswap convert --onnx wrote"
    )


def read_onnx_inputs(path: Path) -> list[tuple[str, list[int | None]]]:
    """Check that ``path`` is a readable ONNX model -- cheaply, without loading external data or
    building an onnxruntime session -- and return its graph inputs as ``(name, dims)`` (a dim is
    None when symbolic, e.g. a dynamic batch).  :class:`InputError` naming the problem otherwise."""
    if not path.exists():
        raise InputError(f"ONNX file {path} not found; pass the path normswap convert --onnx wrote")
    if path.is_dir():
        raise _not_readable(path, "it is a directory")
    if not path.is_file():
        raise _not_readable(path, "not a regular file")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise _not_readable(path, _one_line(e)) from e
    if size == 0:
        raise _not_readable(path, "the file is empty, 0 bytes")

    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError for text / truncated files, OSError for unreadable ones
        raise _not_readable(path, f"{type(e).__name__}: {_one_line(e, 120)}") from e
    graph = model.graph
    if model.ir_version <= 0 or not model.opset_import or not graph.output:
        raise _not_readable(path, "it parses, but has no IR version, opset or graph outputs: truncated or not ONNX")
    try:
        onnx.checker.check_model(str(path))  # by path: external data and models over 2 GB work
    except Exception as e:  # noqa: BLE001 - ValidationError, missing external data, ...
        raise _not_readable(path, f"onnx.checker: {_one_line(e, 150)}") from e
    initializers = {t.name for t in graph.initializer}
    inputs: list[tuple[str, list[int | None]]] = []
    for v in graph.input:
        if v.name in initializers:
            continue
        dims: list[int | None] = []
        tt = v.type.tensor_type if v.type.HasField("tensor_type") else None
        if tt is not None and tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        inputs.append((v.name, dims))
    return inputs


def _fmt_dims(dims: list[int | None] | tuple[int, ...]) -> str:
    return "[" + ",".join("N" if i == 0 else ("?" if d is None else str(d)) for i, d in enumerate(dims)) + "]"


def _fits(onnx_dims: list[int | None], shape: tuple[int, ...]) -> bool:
    """``shape`` (batch first) fits the ONNX input: same rank, equal wherever the ONNX fixes a
    non-batch dimension."""
    if len(onnx_dims) != len(shape):
        return False
    return all(d is None or d == s for d, s in zip(onnx_dims[1:], shape[1:]))


def _describe(against: str, args: list[str], weights: Optional[str]) -> str:
    if against == _AGAINST_DEFAULT:
        return f"{BUNDLED} (no --against given)"
    text = against
    if args:
        text += " with " + " ".join(f"--arg {a}" for a in args)
    if weights:
        text += f" and --weights {weights}" if args else f" with --weights {weights}"
    return text


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
    normswap.parity.check_tolerances(atol, rtol)
    onnx_inputs = read_onnx_inputs(onnx_file)  # before the (possibly slow) PyTorch model is loaded
    bundled = against == _AGAINST_DEFAULT
    described = _describe(against, arg, weights)

    loaded = load(None if bundled else against, arg, weights, trust_pickle, no_strict)
    if getattr(loaded, "random_init", False) and weights is None:
        spec = described if arg else against
        raise InputError(
            f"--against {spec} builds random weights on every load, so no export can match it; "
            "pass --weights FILE (the weights the ONNX was exported from) or the spec's pretrained argument"
        )

    shape, shape_src = input_shape(loaded, input_shape_)
    single = onnx_inputs[0][1] if len(onnx_inputs) == 1 else None
    if single and input_shape_ is None and loaded.input_shape is None and all(d is not None for d in single[1:]):
        shape, shape_src = (1, *(int(d) for d in single[1:])), "the ONNX file's input"  # type: ignore[arg-type]
    if single and not _fits(single, shape):
        name = onnx_inputs[0][0]
        if bundled and input_shape_ is None:
            raise InputError(
                f"{onnx_file} takes input '{name}' {_fmt_dims(single)} but {BUNDLED} (used when no "
                f"--against is given) takes {_fmt_dims(shape)}; pass --against MODEL (with --weights), "
                "the PyTorch model the ONNX was exported from"
            )
        raise InputError(
            f"{onnx_file} takes input '{name}' {_fmt_dims(single)} but the input shape from "
            f"{shape_src} is {list(shape)}; pass --input-shape matching the ONNX input, or --against "
            "the model the ONNX was exported from"
        )

    if not json_out:
        console.print(f"comparing against {described}", markup=False, highlight=False)
    res = normswap.check_parity(loaded.model, None, onnx_file, input_shape=shape, samples=load_samples(samples), atol=atol, rtol=rtol)
    against_info: dict[str, Any] = {
        "description": described,
        "bundled_default": bundled,
        "spec": loaded.spec or _bundled_spec(),
        "args": loaded.args,
        "weights": loaded.weights,
        "input_shape": list(shape),
        "input_shape_from": shape_src,
        "notes": list(loaded.notes),
    }
    if json_out:
        print_json({"onnx": str(onnx_file), "model": loaded.spec, "against": against_info,
                    "passed": bool(res), "parity": res.to_dict()})
    else:
        console.print(res)
    if not res:
        raise typer.Exit(verdict_exit_code(res))


def _bundled_spec() -> str:
    from normswap.load import DEFAULT_MODEL_SPEC

    return DEFAULT_MODEL_SPEC
