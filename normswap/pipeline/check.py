"""``run_check``: does an ONNX file compute what a PyTorch model does (``normswap check``)?

The verdict cannot lie: before anything is compared it refuses (:class:`InputError`) what would
make a pass or a failure meaningless — tolerances that are negative or not finite; a path that is
not a readable ONNX model (checked before the PyTorch model is loaded); a reference model whose
weights are a random initialisation (every load draws new weights, so no export can match); an ONNX
input whose static shape does not fit the reference model's input. Which model the file is compared
against is always said (:attr:`CheckResult.against`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from normswap.defaults import DEFAULT_ATOL, DEFAULT_RTOL
from normswap.errors import InputError

from .stages import example_shape, load_stage
from .verdict import Verdict, check_verdict

__all__ = ["CheckResult", "run_check", "read_onnx_inputs"]

BUNDLED = "the bundled digits ResNet"


def _one_line(text: object, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _not_readable(path: Path, why: str) -> InputError:
    return InputError(f"{path} is not a readable ONNX model ({why}); pass the file normswap convert --onnx wrote")


def read_onnx_inputs(path: Path) -> list[tuple[str, list[int | None]]]:
    """Check that ``path`` is a readable ONNX model -- cheaply, without loading external data or
    building an onnxruntime session -- and return its graph inputs as ``(name, dims)`` (a dim is
    None when symbolic, e.g. a dynamic batch). :class:`InputError` naming the problem otherwise."""
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


def _fmt_dims(dims: Sequence[int | None]) -> str:
    return "[" + ",".join("N" if i == 0 else ("?" if d is None else str(d)) for i, d in enumerate(dims)) + "]"


def _fits(onnx_dims: Sequence[int | None], shape: Sequence[int]) -> bool:
    """``shape`` (batch first) fits the ONNX input: same rank, equal wherever the ONNX fixes a
    non-batch dimension."""
    return len(onnx_dims) == len(shape) and all(d is None or d == s for d, s in zip(onnx_dims[1:], shape[1:]))


def _describe(against: str | None, args: Mapping[str, Any], weights: Any) -> str:
    if against is None:
        return f"{BUNDLED} (no --against given)"
    text = against
    if args:
        text += " with " + " ".join(f"--arg {k}={v}" for k, v in args.items())
    if weights:
        text += f" and --weights {weights}" if args else f" with --weights {weights}"
    return text


@dataclass
class CheckResult:
    """The parity of an ONNX file against its PyTorch model, and which model that was."""

    onnx: str
    against: dict[str, Any]
    parity: Any
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> Verdict:
        return check_verdict(self.parity)

    @property
    def exit_code(self) -> int:
        return self.verdict.exit_code

    def __bool__(self) -> bool:
        return self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        return {"onnx": self.onnx, "model": self.against["spec"], "against": self.against, "passed": bool(self.parity),
                "verdict": self.verdict.to_dict(), "parity": self.parity.to_dict()}

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        style = {0: "bold green", 3: "bold red", 4: "bold yellow"}.get(self.exit_code, "bold")
        return Group(Text(f"comparing against {self.against['description']}"), self.parity, Text(self.verdict.line, style=style))


def run_check(
    onnx_file: str | Path,
    against: str | None = None,
    *,
    args: Mapping[str, Any] | None = None,
    weights: Any = None,
    trust_pickle: bool = False,
    strict: bool = True,
    input_shape: Sequence[int] | None = None,
    samples: Any = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> CheckResult:
    """Compare ``onnx_file`` (onnxruntime) with the PyTorch model ``against`` (a spec, or None for the
    bundled digits ResNet) at batches 1 and 3 (and ``samples``); see the module docstring."""
    from normswap import validate
    from normswap.parity import check_parity

    onnx_file = Path(onnx_file)
    args = dict(args or {})
    validate.options(atol=atol, rtol=rtol)
    onnx_inputs = read_onnx_inputs(onnx_file)  # before the (possibly slow) PyTorch model is loaded
    described = _describe(against, args, weights)
    loaded = load_stage(against, args=args, weights=weights, trust_pickle=trust_pickle, strict=strict)
    if getattr(loaded, "random_init", False) and weights is None:
        raise InputError(
            f"--against {described if args else against} builds random weights on every load, so no export can match it; "
            "pass --weights FILE (the weights the ONNX was exported from) or the spec's pretrained argument"
        )
    from normswap.detection import takes_image_list

    if takes_image_list(loaded.model):
        return _check_detector(onnx_file, onnx_inputs, loaded, described, against, samples, atol, rtol)
    shape, shape_src = example_shape(loaded, input_shape)
    single = onnx_inputs[0][1] if len(onnx_inputs) == 1 else None
    if single and input_shape is None and loaded.input_shape is None and all(d is not None for d in single[1:]):
        shape, shape_src = (1, *(int(d) for d in single[1:])), "the ONNX file's input"  # type: ignore[arg-type]
    if single and not _fits(single, shape):
        name = onnx_inputs[0][0]
        if against is None and input_shape is None:
            raise InputError(
                f"{onnx_file} takes input '{name}' {_fmt_dims(single)} but {BUNDLED} (used when no "
                f"--against is given) takes {_fmt_dims(shape)}; pass --against MODEL (with --weights), "
                "the PyTorch model the ONNX was exported from")
        raise InputError(
            f"{onnx_file} takes input '{name}' {_fmt_dims(single)} but the input shape from {shape_src} is "
            f"{list(shape)}; pass --input-shape matching the ONNX input, or --against the model the ONNX was exported from")
    if isinstance(samples, (str, Path)):
        from normswap.load import load_tensor_file

        samples = load_tensor_file(samples)
    res = check_parity(loaded.model, None, onnx_file, input_shape=shape, samples=samples, atol=atol, rtol=rtol)
    from normswap.load import DEFAULT_MODEL_SPEC

    info = {"description": described, "bundled_default": against is None, "spec": loaded.spec or DEFAULT_MODEL_SPEC,
            "args": loaded.args, "weights": loaded.weights, "input_shape": list(shape), "input_shape_from": shape_src,
            "notes": list(loaded.notes)}
    return CheckResult(onnx=str(onnx_file), against=info, parity=res)


def _check_detector(onnx_file: Path, onnx_inputs: list[tuple[str, list[int | None]]], loaded: Any, described: str,
                    against: str | None, samples: Any, atol: float, rtol: float) -> CheckResult:
    """A detector's ONNX (one fixed-size input per image, as ``convert`` exports it) against the model: the
    same images through both, the post-processed outputs judged against the model's own noise floor."""
    from normswap.load import DEFAULT_MODEL_SPEC
    from normswap.parity import check_parity

    from .image_lists import parity_batches

    dims = [d for _, d in onnx_inputs]
    if not all(len(d) == 3 and None not in d and d == dims[0] for d in dims):
        raise InputError(f"{onnx_file} takes {', '.join(f'{n} {_fmt_dims(d)}' for n, d in onnx_inputs)}, but a detector's "
                         "ONNX takes one fixed C×H×W input per image (as `normswap convert` exports it)")
    shape = tuple(int(x) for x in dims[0])  # type: ignore[arg-type]
    batches, notes = parity_batches(shape, len(dims), samples, model=loaded.model)
    res = check_parity(loaded.model, None, onnx_file, inputs=batches, atol=atol, rtol=rtol)
    res.notes.extend(notes)
    res.notes.append("detector: the ONNX holds only the post-processed outputs, judged against the model's own "
                     "noise floor (a near-tied box that reorders is not comparable, not a pass)")
    info = {"description": described, "bundled_default": against is None, "spec": loaded.spec or DEFAULT_MODEL_SPEC,
            "args": loaded.args, "weights": loaded.weights, "input_shape": list(shape), "images": len(dims),
            "input_shape_from": "the ONNX file's inputs", "notes": list(loaded.notes)}
    return CheckResult(onnx=str(onnx_file), against=info, parity=res)
