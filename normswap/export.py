"""ONNX export: export-form substitution, exporter choice, atomic writes, load checks.

:func:`export_onnx` writes a model that has been checked before it appears at the destination:
``onnx.checker`` passes, the installed onnxruntime loads it (so its IR version and opset are
accepted), and onnxruntime's outputs match torch's at batch 1 and 3 to a loose tolerance
(structural check; tight parity is :mod:`normswap.parity`'s job).

Exporter choice (``exporter="auto"``). Measured on torch 2.14.1 / onnxscript 0.7.2 /
onnxruntime 1.31.1, CPU with 2 cores *shared with other jobs* (load average 4–7, so absolute
numbers are noisy; the ratios held in every run), random weights, batch-1 example, dynamic batch,
opset 20. Seconds are the whole ``export_onnx`` call (prepare, export, checker, onnxruntime load,
verification at batch 1 and 3), best of two; "max rel" is :func:`normswap.parity.check_parity`
of the file against torch at batch 1 and 3 (both exporters agree to the digit):

    model               input  torchscript  dynamo   max rel  nodes (ts / dynamo)
    resnet18            64       2.3 s        4.1 s  7e-07      65 / 49
    mobilenet_v3_small  64       3.2 s        7.8 s  7e-07     159 / 122
    efficientnet_b0     64       3.9 s        8.6 s  5e-08     298 / 239
    densenet121         64       7.2 s       23.9 s  6e-07     617 / 368
    inception_v3        96       9.3 s       20.3 s  2e-07     298 / 219
    googlenet           96       3.3 s       21.4 s  1e-07     179 / 139
    regnet_y_400mf      64       5.7 s       10.4 s  5e-07     265 / 217
    shufflenet_v2_x0_5  64       5.7 s       10.8 s  1e-07     955 / 173
    mnasnet0_5          64       9.1 s        9.6 s  8e-07     139 / 99
    vgg11_bn            64       fails       20.1 s  1e-06       - / 42
    vgg11_bn            224     21.6 s       28.1 s  1e-06      33 / 28
    maxvit_t            224     33.8 s       46.9 s  8e-07    3981 / 962

TorchScript fails on vgg11_bn below 224 px ("adaptive_avg_pool2d, output size that are not
factor of input size"); everything else exports and passes parity (≤ 1e-6 relative) with both.
TorchScript is 1.05–6.5× faster; the first dynamo export in a process also pays several seconds of
imports. onnxruntime latency of the two files is within noise of each other (TorchScript's
graphs have more shape nodes, which onnxruntime folds). Decision: ``auto`` tries TorchScript
first for opset ≤ 20 and falls back to dynamo when TorchScript raises, is missing (a future
torch) or its file fails any check (checker, onnxruntime load, verification); vgg11_bn at 64 px
lands on dynamo this way. For opset ≥ 21 ``auto`` uses dynamo only.

Default opset 20: the highest the TorchScript exporter supports (it accepts 21–23 with an
"unsupported" warning and still emits its opset-20 lowering), torch's own default for both
exporters, and accepted by onnxruntime 1.31 (which loads opsets up to 26). Ask for 21 to get
ONNX's per-channel ``GroupNormalization`` from the dynamo exporter (at 18–20 both exporters lower
GroupNorm to Reshape → InstanceNormalization → Mul/Add; opset-18 GroupNormalization has the
per-group scale/bias spec bug). With the exporters' default lowerings, a GroupNorm resnet18 at
224 px ran about 6% slower in onnxruntime at opset 21 (GroupNormalization, expanded by the CPU
provider) than at opset 20 (InstanceNormalization lowering) — another reason to stay at 20.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import math
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from normswap.atomic import default_file_mode, staging_dir
from normswap.errors import InputError, NormswapError
from normswap.norms.registry import EXPORT_FORMS, ExportForm
from normswap.parity import flatten_outputs, make_session, session_feed
from normswap.parity.rule import judge
from normswap.parity.running import _clone_inputs

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "ExportResult",
    "export_onnx",
    "onnx_op_counts",
    "prepare_for_export",
    "supported_opsets",
]

EXPORTERS = ("auto", "torchscript", "dynamo")
#: ONNX ops that normalize (counted in the report line)
NORM_OP_TYPES = ("BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization")
DEFAULT_OPSET = 20
TORCHSCRIPT_MAX_OPSET = 20  # torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
TORCHSCRIPT_MIN_OPSET = 7
DYNAMO_MIN_OPSET = 18  # torchlib's base opset; lower requests go through a version converter
ORT_MAX_OPSET_FALLBACK = 26  # what onnxruntime 1.31 loads (27 is refused); see ort_max_opset()
EXTERNAL_DATA_THRESHOLD = int(1.5 * 2**30)  # bytes of parameters + buffers
VERIFY_ATOL = 1e-4  # loose: catches a wrong graph (baked batch size, dropped branch), not rounding
VERIFY_RTOL = 1e-2
VERIFY_BATCHES = (1, 3)

_QUIET_LOGGERS = (
    "torch.onnx",
    "torch.export",
    "torch._export",
    "torch._dynamo",
    "torch.fx",
    "torch._subclasses",
    "torch.utils._sympy",
    "onnxscript",
    "onnx_ir",
)


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class ExportResult:
    """What was written and how."""

    path: Path
    exporter: str  # "dynamo" | "torchscript"
    opset: int
    input_names: list[str]
    output_names: list[str]
    op_counts: dict[str, int]  # ONNX op_type -> count (main graph + functions + subgraphs)
    external_data: bool
    seconds: float  # wall time of the whole export_onnx call
    ir_version: int = 0
    data_path: Path | None = None  # the external data file, when external_data
    dynamic_batch: bool = True
    verified_batches: list[int] = field(default_factory=list)
    max_rel_err: float | None = None  # onnxruntime vs torch over the verified batches
    attempts: list[dict[str, Any]] = field(default_factory=list)  # {"exporter", "seconds", "error"}
    notes: list[str] = field(default_factory=list)
    #: registered export forms used (label -> modules), e.g. each nn.GroupNorm as InstanceNormalization + BatchNormalization
    export_forms: dict[str, int] = field(default_factory=dict)

    def move_into(self, directory: str | os.PathLike[str]) -> None:
        """Move the ONNX file and its external data file (same names: the model refers to its data
        by file name) into ``directory``, each with an atomic rename; the paths here follow."""
        directory = Path(directory)
        dest = directory / Path(self.path).name
        if self.data_path is not None:
            data = directory / Path(self.data_path).name
            os.replace(self.data_path, data)
            self.data_path = data
        os.replace(self.path, dest)
        self.path = dest

    def line(self, where: Any = None) -> str:
        """One line for the report: where, how many nodes, the normalization nodes by type and why."""
        counts = self.op_counts
        norms = [f"{counts[op]} {op}" for op in NORM_OP_TYPES if counts.get(op)]
        forms = "".join(f"; {n} {label}" for label, n in self.export_forms.items())
        return (f"ONNX: {self.path if where is None else where} — {sum(counts.values())} nodes, "
                f"normalization nodes: {', '.join(norms) or 'none'}{forms}, exporter {self.exporter}, opset {self.opset}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["data_path"] = None if self.data_path is None else str(self.data_path)
        return d


# ---------------------------------------------------------------------------------------------
# preparing the module


def prepare_for_export(model: nn.Module, forms: Counter[str] | None = None, *,
                       registered: Mapping[type, ExportForm] = EXPORT_FORMS) -> nn.Module:
    """A deep copy in eval mode with every module that has ``export_form()`` replaced by its result,
    and every module of a class with a ``registered`` :class:`~normswap.norms.registry.ExportForm`
    (nn.GroupNorm) by that form; ``forms``, when given, counts the registered forms used by label
    (``registered={}``: torch's classes as the exporters lower them).

    ``export_form()`` returns a plain, exporter-friendly equivalent (e.g. a weight-standardized
    conv returns an ``nn.Conv2d`` holding the standardized weights). Replacements are applied
    recursively (a replacement's own children are visited too) and a module shared in several
    places is replaced once. The argument is never modified.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"expected a torch.nn.Module to export, got {type(model).__name__}; pass the model object")
    try:
        clone = copy.deepcopy(model)
    except Exception as e:
        raise InputError(f"the model cannot be deep-copied ({type(e).__name__}: {e}); remove non-copyable attributes") from e
    sub = _Substitution(registered, forms)
    with torch.no_grad():
        root = _export_form(clone, sub)
        _replace_children(root, sub, set())
    return root.eval()


@dataclass
class _Substitution:
    """One prepare_for_export pass: the registered forms, their use counts, the replacement of every
    module seen (by id: a module shared in several places is replaced once)."""

    registered: Mapping[type, ExportForm]
    counts: Counter[str] | None
    memo: dict[int, nn.Module] = field(default_factory=dict)


def _export_form(m: nn.Module, sub: _Substitution) -> nn.Module:
    if id(m) in sub.memo:
        return sub.memo[id(m)]
    fn = getattr(m, "export_form", None)
    form = sub.registered.get(type(m)) if fn is None else None
    if form is not None:  # a torch class (nn.GroupNorm): its form is registered with the norm family
        fn = functools.partial(_registered_form, m, form, sub.counts)
    new = m
    seen = {id(m)}
    while callable(fn):
        out = fn()
        if not isinstance(out, nn.Module):
            raise NormswapError(f"{type(new).__name__}.export_form() returned {type(out).__name__}, not an nn.Module; fix that layer")
        if id(out) in seen:  # returned itself (or a cycle): nothing more to substitute
            break
        seen.add(id(out))
        new = out
        fn = getattr(new, "export_form", None)
    sub.memo[id(m)] = new
    return new


def _registered_form(m: nn.Module, form: ExportForm, counts: Counter[str] | None) -> nn.Module:
    out = form.build(m)
    if out is None:
        return m
    if counts is not None:
        counts[form.label] += 1
    return out


def _replace_children(module: nn.Module, sub: _Substitution, visited: set[int]) -> None:
    if id(module) in visited:
        return
    visited.add(id(module))
    for name, child in list(module._modules.items()):  # not named_children(): it skips repeats of a shared module
        if child is None:
            continue
        new = _export_form(child, sub)
        if new is not child:
            setattr(module, name, new)
        _replace_children(new, sub, visited)


# ---------------------------------------------------------------------------------------------
# op counts


def onnx_op_counts(model_or_path: Any) -> dict[str, int]:
    """Count ONNX ``op_type``s in the main graph, local functions and every subgraph (If/Loop/Scan).

    Accepts a path or an ``onnx.ModelProto``. Ops of a non-default domain are keyed ``domain::Op``.
    Sorted by descending count, then name.
    """
    import onnx

    if isinstance(model_or_path, (str, os.PathLike)):
        try:
            model = onnx.load(str(model_or_path), load_external_data=False)
        except Exception as e:
            raise InputError(f"cannot read ONNX file {model_or_path}: {e}; check the path") from e
    else:
        model = model_or_path
    counts: Counter[str] = Counter()

    def walk(nodes: Any) -> None:
        for node in nodes:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            counts[key] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g.node)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        walk(g.node)

    walk(model.graph.node)
    for fn in model.functions:
        walk(fn.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@functools.lru_cache(maxsize=1)
def ort_max_opset() -> int:
    """The highest ai.onnx opset the installed onnxruntime loads (probed once with a one-node model)."""
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper

        so = ort.SessionOptions()
        so.log_severity_level = 4
        vi = helper.make_tensor_value_info
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                                  [vi("x", TensorProto.FLOAT, [1])], [vi("y", TensorProto.FLOAT, [1])])
        for opset in range(onnx.defs.onnx_opset_version(), TORCHSCRIPT_MAX_OPSET, -1):
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
            try:
                ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
                return opset
            except Exception:
                continue
        return TORCHSCRIPT_MAX_OPSET
    except Exception:  # pragma: no cover - a broken onnx/onnxruntime install fails later, loudly
        return ORT_MAX_OPSET_FALLBACK


def _accepts(exporter: str, opset: int) -> bool:
    if exporter == "dynamo" and DYNAMO_MIN_OPSET <= opset <= TORCHSCRIPT_MAX_OPSET:
        return True  # no need to probe onnxruntime for the common case
    return opset in supported_opsets(exporter)


def supported_opsets(exporter: str) -> range:
    """The opsets :func:`export_onnx` accepts for an exporter ("torchscript" or "dynamo").

    TorchScript: 7–20 (torch accepts 21–23 with an "unsupported" warning and keeps its opset-20
    lowering, so they are refused here). Dynamo: 18 (torchlib's base opset; lower requests go
    through a version converter) up to what the installed onnxruntime loads (26 for 1.31; the
    exporter itself writes 27 happily).
    """
    if exporter == "torchscript":
        return range(TORCHSCRIPT_MIN_OPSET, TORCHSCRIPT_MAX_OPSET + 1)
    if exporter == "dynamo":
        return range(DYNAMO_MIN_OPSET, ort_max_opset() + 1)
    raise InputError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")


# ---------------------------------------------------------------------------------------------
# export


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Silence the exporters' progress prints, warnings and log records unless verbose."""
    if verbose:
        yield
        return
    saved = [(lg, lg.level) for lg in (logging.getLogger(n) for n in _QUIET_LOGGERS)]
    try:
        for lg, _ in saved:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _silence_fds():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


@contextlib.contextmanager
def _silence_fds() -> Iterator[None]:
    """Point file descriptors 1 and 2 at /dev/null: the TorchScript exporter's C++ side prints the
    whole IR graph to stdout when a symbolic fails, which Python-level redirection cannot catch."""
    saved: list[tuple[int, int]] = []
    try:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                stream.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                saved.append((fd, os.dup(fd)))
                os.dup2(devnull, fd)
        yield
    finally:
        for fd, copy_fd in saved:
            os.dup2(copy_fd, fd)
            os.close(copy_fd)
        os.close(devnull)


def _root_cause(e: BaseException) -> str:
    """First line of the innermost exception with a message (exporters wrap the real error)."""
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in chain and len(chain) < 20:
        chain.append(cur)
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    for exc in reversed(chain):
        for line in str(exc).splitlines():
            line = line.strip().lstrip("#").strip()
            if line:
                if len(line) > 160 and ". " in line[40:]:  # keep the first sentence of long messages
                    line = line[: line.index(". ", 40) + 1]
                text = f"{type(exc).__name__}: {line}"
                return text if len(text) <= 240 else text[:239] + "…"
    return type(e).__name__


def _param_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class _FlatOutputs(nn.Module):
    """Wraps a model so that it returns only its tensor leaves, as a flat tuple."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> tuple[Tensor, ...]:
        return tuple(t for _, t in flatten_outputs(self.model(*args)))


def _batch_inputs(example: tuple[Tensor, ...], batch: int, seed: int) -> tuple[Tensor, ...]:
    """Inputs like ``example`` with batch size ``batch``: random floats, integers drawn from the example."""
    g = torch.Generator().manual_seed(seed * 7919 + batch)
    out = []
    for x in example:
        shape = (batch, *x.shape[1:])
        if x.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g, dtype=torch.float32).to(x.dtype))
        elif x.numel() == 0:
            out.append(torch.zeros(shape, dtype=x.dtype))
        else:
            flat = x.reshape(-1)
            idx = torch.randint(0, flat.numel(), (math.prod(shape),), generator=g)
            out.append(flat[idx].reshape(shape))
    return tuple(out)


def _eager(model: nn.Module, xs: tuple[Any, ...]) -> Any:
    with torch.no_grad():
        return model(*_clone_inputs(xs))


def _export_torchscript(
    model: nn.Module, args: tuple[Tensor, ...], file: Path, opset: int, in_names: list[str], out_names: list[str],
    batch_outputs: list[str], dynamic_batch: bool, external: bool,
) -> None:
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {n: {0: "batch"} for n in [*in_names, *batch_outputs]}
    torch.onnx.export(
        model, args, str(file), dynamo=False, opset_version=opset, input_names=in_names, output_names=out_names,
        dynamic_axes=dynamic_axes, do_constant_folding=True,
    )
    if external or any(p.name != file.name for p in file.parent.iterdir()):
        _consolidate(file, external)  # a >2 GB TorchScript export writes one file per tensor


def _export_dynamo(
    model: nn.Module, args: tuple[Tensor, ...], file: Path, opset: int, in_names: list[str], out_names: list[str],
    dynamic_batch: bool, external: bool,
) -> None:
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in args)
        if isinstance(model, _FlatOutputs):  # forward(*args): the specs go under the varargs name
            dynamic_shapes = {"args": dynamic_shapes}
    prog = torch.onnx.export(
        model, args, dynamo=True, opset_version=opset, input_names=in_names, output_names=out_names,
        dynamic_shapes=dynamic_shapes, optimize=True, report=False, verify=False,
    )
    if prog is None:  # pragma: no cover - torch returns the program when f is None
        raise NormswapError("the dynamo exporter returned no program; upgrade torch")
    prog.save(str(file), external_data=external)
    # torch names the data file "<file>.data"; make sure that is what we ship
    produced = [p for p in file.parent.iterdir() if p.name != file.name]
    if produced and (external is False or [p.name for p in produced] != [file.name + ".data"]):
        _consolidate(file, external)


def _consolidate(file: Path, external: bool) -> None:
    """Re-save the export in ``file``'s (private) folder as exactly ``file`` plus, when ``external``,
    one ``file.data`` holding every tensor — whatever files the exporter wrote."""
    import onnx

    proto = onnx.load(str(file))
    for p in file.parent.iterdir():
        p.unlink()
    onnx.save_model(proto, str(file), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=file.name + ".data", size_threshold=0)


def _check_and_verify(
    file: Path, model: nn.Module, example: tuple[Tensor, ...], dynamic_batch: bool, verify: bool, n_outputs: int,
    refs: dict[int, tuple[tuple[Tensor, ...], Any]],
) -> tuple[list[int], float | None, int, dict[str, int]]:
    """onnx.checker, onnxruntime load, then (optionally) torch-vs-onnxruntime at batch 1 and 3.
    ``refs`` caches the torch side per batch size across exporter attempts. Returns the verified
    batches, the worst relative error, the IR version and the op counts."""
    import onnx

    try:
        onnx.checker.check_model(str(file))  # by path: also works for models over 2 GB
    except Exception as e:
        raise NormswapError(f"the exported model fails onnx.checker: {_root_cause(e)}") from e
    proto = onnx.load(str(file), load_external_data=False)  # the graph only, parsed once
    ir_version, op_counts = proto.ir_version, onnx_op_counts(proto)
    try:
        sess = make_session(file)  # fails when the runtime refuses the IR version, the opset or an op
    except NormswapError as e:
        import onnxruntime

        cause = _root_cause(e.__cause__) if e.__cause__ is not None else str(e)
        raise NormswapError(f"onnxruntime {onnxruntime.__version__} cannot load the exported model "
                            f"(IR {ir_version}): {cause}") from e
    if len(sess.get_outputs()) != n_outputs:
        raise NormswapError(f"the exported model has {len(sess.get_outputs())} outputs but torch returns {n_outputs}")
    if not verify:
        return [], None, ir_version, op_counts
    batches = list(VERIFY_BATCHES) if dynamic_batch else [len(example[0]) if isinstance(example[0], (list, tuple)) else int(example[0].shape[0])]
    worst = 0.0
    for b in batches:
        if b not in refs:
            xs = _batch_inputs(example, b, seed=0) if dynamic_batch else example
            refs[b] = (xs, _eager(model, xs))
        xs, ref = refs[b]
        try:
            got = sess.run(None, session_feed(sess, xs))
        except Exception as e:
            raise NormswapError(f"onnxruntime fails on the exported model at batch {b}: {_root_cause(e)}") from e
        # judge: an output the model itself changes under float32 noise (a detector's post-NMS boxes)
        # is "not comparable", never a failure of the export
        stats, _ = judge(model, ref, got, xs, pair="torch↔onnxruntime", batch=b, atol=VERIFY_ATOL, rtol=VERIFY_RTOL)
        for s in stats:
            if not s.passed:
                why = s.note if s.note and not s.note.startswith("exact") else f"max rel err {s.max_rel:.1e}"
                raise NormswapError(f"the exported model disagrees with torch at batch {b} on {s.output}: {why}")
            if math.isfinite(s.max_rel) and not s.vacuous:
                worst = max(worst, s.max_rel)
    return batches, worst, ir_version, op_counts


def export_onnx(
    model: nn.Module,
    example_inputs: tuple[Tensor, ...] | Tensor,
    path: str | os.PathLike[str],
    *,
    exporter: str = "auto",
    opset: int | None = None,
    dynamic_batch: bool = True,
    external_data: bool | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    verify: bool = True,
    verbose: bool = False,
) -> ExportResult:
    """Export ``model`` to ONNX at ``path`` atomically, checked and verified before it lands.

    - ``prepare_for_export`` first (deep copy, eval, ``export_form()`` substitution).
    - ``exporter``: "torchscript", "dynamo" or "auto" (TorchScript, falling back to dynamo, for
      opset ≤ 20; dynamo for 21+). ``opset`` defaults to :data:`DEFAULT_OPSET` (20).
    - ``dynamic_batch``: dim 0 of every input (and of every output that carries it) is named
      "batch". A batch-1 example is doubled for tracing so nothing specialises on size 1.
    - Outputs may be a tensor or nested tuple/list/dict; names default to "output",
      "output_0", ... or the dict keys (see :func:`normswap.parity.flatten_outputs`).
    - ``external_data``: None → only when parameters exceed 1.5 GB; True → ``<name>.data`` beside.
    - The file is built in a temporary folder beside ``path``, passes ``onnx.checker``, loads in
      onnxruntime and (``verify``) matches torch at batch 1 and 3, then is ``os.replace``d into
      place; on any failure or interrupt nothing is left at ``path``.

    Raises InputError for bad arguments or a model that fails on its own example input, and
    NormswapError when the exporter(s) fail.
    """
    t0 = time.perf_counter()
    if exporter not in EXPORTERS:
        raise InputError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if exporter == "auto":
        order = ["torchscript", "dynamo"] if opset <= TORCHSCRIPT_MAX_OPSET else ["dynamo"]
    else:
        order = [exporter]
    order = [e for e in order if _accepts(e, opset)]
    if not order:
        lo = TORCHSCRIPT_MIN_OPSET if exporter != "dynamo" else DYNAMO_MIN_OPSET
        hi = TORCHSCRIPT_MAX_OPSET if exporter == "torchscript" else ort_max_opset()
        hint = "; use --exporter dynamo for opset 21+" if exporter == "torchscript" and opset > TORCHSCRIPT_MAX_OPSET else ""
        raise InputError(f"opset {opset} is not supported by the {exporter} exporter (use {lo}–{hi}){hint}")

    if isinstance(example_inputs, Tensor):
        example_inputs = (example_inputs,)
    example = tuple(example_inputs)
    # a list of images (torchvision's detectors): one ONNX input per image, at a fixed count and size —
    # the form torchvision's own ONNX tests export; the batch-doubling trace would hard-wire the count
    image_list = len(example) == 1 and isinstance(example[0], (list, tuple))
    if image_list:
        images = list(example[0])
        if not images or not all(isinstance(x, Tensor) for x in images):
            raise InputError("a list input must be a non-empty list of image tensors, e.g. ([torch.rand(3, 320, 320)],)")
        dynamic_batch = False
    if not example or not (image_list or all(isinstance(x, Tensor) for x in example)):
        raise InputError("example_inputs must be a non-empty tuple of tensors; pass e.g. (torch.randn(1, 3, 224, 224),)")
    if dynamic_batch and any(x.dim() == 0 for x in example):
        raise InputError("a scalar input has no batch dimension; pass dynamic_batch=False or give it a batch dim")
    n_inputs = len(example[0]) if image_list else len(example)
    if input_names is None:
        if image_list:
            in_names = [f"image_{i}" for i in range(n_inputs)]
        else:
            in_names = ["input"] if len(example) == 1 else [f"input_{i}" for i in range(len(example))]
    else:
        in_names = [str(n) for n in input_names]
        if len(in_names) != n_inputs or len(set(in_names)) != len(in_names):
            raise InputError(f"input_names {in_names} must be {n_inputs} distinct names, one per example input")

    dest = Path(path)
    if dest.is_dir():
        raise InputError(f"output path {dest} is a directory; give a file name such as {dest / 'model.onnx'}")

    forms: Counter[str] = Counter()
    prepared = prepare_for_export(model, forms)
    if dynamic_batch and any(x.shape[0] == 1 for x in example):
        trace_args = tuple(torch.cat([x, x]) if x.shape[0] == 1 else x for x in example)
    else:
        trace_args = example
    try:
        ref = _eager(prepared, trace_args)
    except Exception as e:
        shapes = ", ".join(str(tuple(x.shape)) for x in torch.utils._pytree.tree_leaves(trace_args) if isinstance(x, Tensor))
        raise InputError(f"the model fails on the example input {shapes}: {_root_cause(e)}; check the input shape") from e

    ref_leaves = flatten_outputs(ref)
    if not ref_leaves:
        raise InputError("the model returns no tensors; nothing to export")
    if output_names is None:
        out_names = [n for n, _ in ref_leaves]
    else:
        out_names = [str(n) for n in output_names]
        if len(out_names) != len(ref_leaves) or len(set(out_names)) != len(out_names):
            raise InputError(f"output_names {out_names} must be {len(ref_leaves)} distinct names, one per output tensor")
    clash = set(in_names) & set(out_names)
    if clash:
        raise InputError(f"names {sorted(clash)} are used for both inputs and outputs; rename them")
    tb = len(trace_args[0]) if image_list else int(trace_args[0].shape[0])
    batch_outputs = [n for n, (_, t) in zip(out_names, ref_leaves) if t.dim() > 0 and t.shape[0] == tb]

    # exporters handle nested tuple/list/dict outputs natively; only non-tensor leaves need the wrapper
    leaves = torch.utils._pytree.tree_leaves(ref)
    target: nn.Module = prepared if all(isinstance(t, Tensor) for t in leaves) else _FlatOutputs(prepared).eval()

    nbytes = _param_bytes(prepared)
    external = bool(external_data) if external_data is not None else nbytes > EXTERNAL_DATA_THRESHOLD
    notes: list[str] = []
    attempts: list[dict[str, Any]] = []
    errors: list[tuple[str, str]] = []

    # the torch side of the verification, per batch size; the example batch itself is already run
    refs: dict[int, tuple[tuple[Tensor, ...], Any]] = {} if dynamic_batch else {tb: (trace_args, ref)}
    with staging_dir(dest) as stage:
        for name in order:
            work = stage / name
            work.mkdir()
            file = work / dest.name
            t1 = time.perf_counter()
            try:
                with _quiet(verbose):
                    if name == "torchscript":
                        _export_torchscript(target, trace_args, file, opset, in_names, out_names, batch_outputs,
                                            dynamic_batch, external)
                    else:
                        _export_dynamo(target, trace_args, file, opset, in_names, out_names, dynamic_batch, external)
                    batches, max_rel, ir_version, op_counts = _check_and_verify(
                        file, prepared, trace_args, dynamic_batch, verify, len(out_names), refs)
            except Exception as e:
                err = str(e) if isinstance(e, NormswapError) else _root_cause(e)
                attempts.append({"exporter": name, "seconds": round(time.perf_counter() - t1, 3), "error": err})
                errors.append((name, err))
                continue
            attempts.append({"exporter": name, "seconds": round(time.perf_counter() - t1, 3), "error": None})
            if errors:
                notes.append(f"{errors[-1][0]} exporter failed ({errors[-1][1]}); used {name}")
            data_tmp = work / (dest.name + ".data")
            data_dest = dest.with_name(dest.name + ".data")
            has_data = data_tmp.exists()
            mode = default_file_mode()
            if has_data:
                os.chmod(data_tmp, mode)
                os.replace(data_tmp, data_dest)  # data first: the .onnx that lands must find its data
            os.chmod(file, mode)
            os.replace(file, dest)
            if not has_data and data_dest.exists():
                data_dest.unlink()  # a stale data file from an earlier export of the same name
                notes.append(f"removed stale {data_dest.name}")
            break
        else:
            raise NormswapError(_failure_message(errors, exporter))

    return ExportResult(
        path=dest,
        exporter=name,
        opset=opset,
        input_names=in_names,
        output_names=out_names,
        op_counts=op_counts,
        external_data=has_data,
        seconds=round(time.perf_counter() - t0, 3),
        ir_version=ir_version,
        data_path=data_dest if has_data else None,
        dynamic_batch=dynamic_batch,
        verified_batches=batches,
        max_rel_err=max_rel,
        attempts=attempts,
        export_forms=dict(forms),
        notes=notes,
    )


def _failure_message(errors: list[tuple[str, str]], requested: str) -> str:
    if len(errors) == 1:
        name, err = errors[0]
        other = "dynamo" if name == "torchscript" else "torchscript"
        return f"ONNX export with the {name} exporter failed: {err}; try --exporter {other}"
    detail = "; ".join(f"{n}: {e}" for n, e in errors)
    return f"ONNX export failed with every exporter ({detail}); replace or wrap the operator it names, or simplify the model's forward"

