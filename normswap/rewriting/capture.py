"""Graph capture: torch.fx tracing with normalization layers kept as leaves.

When the whole model cannot be traced (data-dependent control flow, unsupported Python), capture
descends into its children and traces every subtree that holds a norm layer and *can* be traced,
so the passes still rewrite those; norm layers left outside every traced subtree are returned with
the reason, for the report.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import first_line
from .norm_sites import is_affine_norm
from ..norms.registry import site_kind

__all__ = ["TracedPart", "Capture", "NormTracer", "capture", "propagate_shapes", "is_norm_module", "trace", "first_line",
           "is_dynamic_pad_layer"]

# BatchNorm look-alikes that are not ``_BatchNorm`` subclasses; matched by class name so that
# neither torchvision nor timm has to be imported.


def is_norm_module(m: nn.Module) -> bool:
    """A module the tracer keeps whole: every BatchNorm (subclasses included, e.g. timm's
    ``BatchNormAct2d``), frozen BNs, SyncBN, and normswap's own layers.  Kept whole so a pass sees
    the module — tracing *into* ``BatchNormAct2d`` would hide it as ``F.batch_norm`` + act, and
    ``FrozenBatchNorm2d`` would dissolve into rsqrt/mul/add."""
    if site_kind(m) is not None:  # every BatchNorm kind normswap knows, frozen and sync included
        return True
    if is_affine_norm(m):  # GroupNorm, LayerNorm(2d), InstanceNorm, timm's GroupNormAct…: fold sites too
        return True
    mod = type(m).__module__
    return mod.startswith(("normswap.norms.", "normswap.rewriting.layers"))


# timm layers whose forward pads dynamically from the input's size (``timm.layers.padding.pad_same``):
# Python arithmetic on ``x.size()`` that torch.fx cannot trace, so a block holding one would fall
# back to its subtrees and leave its BatchNorms untraced.  They hold no norm layer and compute one
# known function each, so the tracer keeps them whole; matched by class name and module so timm
# need not be imported.  (``sites.py`` knows what Conv2dSame computes and folds into it.)
DYNAMIC_PAD_LAYERS = {"Conv2dSame", "AvgPool2dSame", "MaxPool2dSame"}


def is_dynamic_pad_layer(m: nn.Module) -> bool:
    """timm's ``Conv2dSame`` / ``AvgPool2dSame`` / ``MaxPool2dSame`` exactly (not subclasses: their
    forward may differ)."""
    return type(m).__name__ in DYNAMIC_PAD_LAYERS and type(m).__module__.startswith("timm.layers.")


def contains_norm(m: nn.Module) -> bool:
    return any(is_norm_module(s) for s in m.modules())


class NormTracer(fx.Tracer):
    """``fx.Tracer`` that treats norm layers (see :func:`is_norm_module`) and timm's dynamic-SAME-padding
    layers (see :func:`is_dynamic_pad_layer`) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_norm_module(m) or is_dynamic_pad_layer(m) or super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``module`` with :class:`NormTracer`.  The GraphModule shares the module's
    submodules and parameters (no copy)."""
    tracer = NormTracer()
    graph = tracer.trace(module)
    name = module.__class__.__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    return gm


@dataclass
class TracedPart:
    """One traced subtree: ``qualname`` is its path in the model (``""`` = the whole model)."""

    qualname: str
    graph: fx.GraphModule
    example_inputs: tuple[Any, ...] | None = None  # positional inputs it saw, if any were given
    shapes_known: bool = False


@dataclass
class Capture:
    root: nn.Module
    parts: list[TracedPart] = field(default_factory=list)
    # norm layers outside every traced part: (qualified name, why its parent could not be traced)
    untraced: list[tuple[str, str]] = field(default_factory=list)

    @property
    def whole(self) -> bool:
        return len(self.parts) == 1 and self.parts[0].qualname == ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def capture(model: nn.Module, example_inputs: tuple[Any, ...] | None = None) -> Capture:
    """Trace ``model`` (or, failing that, its traceable subtrees) and propagate shapes.

    ``model`` is used as is — the caller passes a copy if it will rewrite.  With
    ``example_inputs``, :func:`propagate_shapes` runs too (a pass that needs shapes only
    sometimes can call it later itself).
    """
    cap = Capture(root=model)

    def visit(mod: nn.Module, qual: str, why: str | None) -> None:
        if not contains_norm(mod):
            return
        if is_norm_module(mod) and why is not None:
            cap.untraced.append((qual, why))
            return
        try:
            gm = trace(mod)
        except Exception as exc:  # any tracing failure: descend
            reason = f"{type(mod).__name__} at '{qual or '<model>'}' is not traceable by torch.fx ({first_line(exc, 200)})"
            for name, child in mod.named_children():
                visit(child, _join(qual, name), reason)
            if is_norm_module(mod):
                cap.untraced.append((qual, reason))
            return
        cap.parts.append(TracedPart(qual, gm))
        # a leaf the tracer does not enter (e.g. a torch.nn container-like module) may still hold
        # norm layers: they get no graph, so list them as untraced rather than miss them
        for n in gm.graph.nodes:
            if n.op == "call_module":
                leaf = gm.get_submodule(n.target)
                if not is_norm_module(leaf):
                    for sub, m in leaf.named_modules():
                        if sub and is_norm_module(m):
                            cap.untraced.append((_join(_join(qual, str(n.target)), sub),
                                                 f"inside {type(leaf).__name__}, which torch.fx keeps as a leaf"))

    visit(model, "", None)
    if example_inputs is not None:
        propagate_shapes(cap, example_inputs)
    return cap


def propagate_shapes(cap: Capture, example_inputs: tuple[Any, ...]) -> None:
    """One eval forward pass that records each part's inputs and gives every node
    ``meta["tensor_meta"]`` (shape, dtype) via ``ShapeProp``.  A part whose inputs cannot be
    bound to its placeholders keeps ``shapes_known = False``."""
    if not cap.parts or all(p.shapes_known for p in cap.parts):
        return
    # restore every module's own flag afterwards (not root.train(was)): the root may share
    # layers with a caller whose modes must not change
    flags = [(m, m.training) for m in cap.root.modules()]
    cap.root.eval()
    try:
        if cap.whole:
            part = cap.parts[0]
            part.example_inputs = tuple(example_inputs)
        else:
            _record_part_inputs(cap, example_inputs)
        for part in cap.parts:
            if part.example_inputs is None:
                continue
            part.graph.eval()
            try:
                with torch.no_grad():
                    ShapeProp(part.graph).propagate(*part.example_inputs)
            except Exception:  # e.g. *args/**kwargs forwards: shapes stay unknown, passes stay safe
                continue
            part.shapes_known = True
    finally:
        for m, flag in flags:
            m.training = flag


def _record_part_inputs(cap: Capture, example_inputs: tuple[Any, ...]) -> None:
    """Run the model once, recording the positional inputs each traced part receives first."""
    modules = dict(cap.root.named_modules())
    handles = []
    for part in cap.parts:
        mod = modules[part.qualname]
        sig = inspect.signature(mod.forward)

        def hook(m: nn.Module, args: tuple, kwargs: dict, part: TracedPart = part, sig=sig) -> None:
            if part.example_inputs is None:
                bound = sig.bind(*args, **kwargs)
                bound.apply_defaults()
                part.example_inputs = tuple(bound.arguments.values())

        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            cap.root(*example_inputs)
    finally:
        for h in handles:
            h.remove()
