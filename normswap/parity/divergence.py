"""First-divergence search: the first graph node of the rewritten model whose output differs
from its counterpart in the original (both run under ``torch.fx.Interpreter``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.fx as fx
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from normswap.defaults import DEFAULT_ATOL, DEFAULT_RTOL

from .inputs import _as_tuple
from .rule import compare_arrays
from .running import _clone_inputs, eval_mode


class _StopRun(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


_COMPARED_OPS = ("call_module", "call_function", "call_method", "output")


def _node_label(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_module" or node.op == "call_method":
        return str(t)
    if node.op == "output":
        return "output"
    return getattr(t, "__name__", None) or str(t)


def _tensor_leaves(x: Any) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(x) if isinstance(t, Tensor)]


def first_divergence(
    original: fx.GraphModule | nn.Module,
    rewritten: fx.GraphModule | nn.Module,
    node_map: Mapping[str, str | None] | None,
    inputs: Sequence[Any],
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
) -> str | None:
    """Name the first node of ``rewritten`` whose output differs from its original counterpart.

    Both graphs run (eval, no_grad) under a ``torch.fx.Interpreter``. Rewritten nodes are
    visited in execution order; a node is compared when ``node_map`` maps its name to an
    original node name, or, absent from ``node_map``, when the original graph has a node with
    the same name (map a name to ``None`` to skip it — a conv whose BN was folded into it has
    the same name but must be compared with the BN's output). Tolerance is the pass rule of
    :mod:`normswap.parity.rule` applied per node. Returns e.g.
    ``"layer1.0.conv2 (call_module layer1_0_conv2): max rel err 3.2e-02"`` or None.
    Plain modules are symbolically traced first.
    """
    gm_o = original if isinstance(original, fx.GraphModule) else fx.symbolic_trace(original)
    gm_r = rewritten if isinstance(rewritten, fx.GraphModule) else fx.symbolic_trace(rewritten)
    node_map = dict(node_map or {})
    orig_names = {n.name for n in gm_o.graph.nodes}

    def mapped(name: str) -> str | None:
        if name in node_map:
            target = node_map[name]
            return target if target in orig_names else None
        return name if name in orig_names else None

    wanted = {m for n in gm_r.graph.nodes if n.op in _COMPARED_OPS and (m := mapped(n.name)) is not None}
    xs = _as_tuple(inputs)

    recorded: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in wanted:  # clone: a later in-place op (ReLU(inplace=True)) would overwrite it
                recorded[n.name] = pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, out)
            return out

    class Comparer(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.op in _COMPARED_OPS:
                oname = mapped(n.name)
                if oname is not None and oname in recorded:
                    msg = _node_mismatch(n, oname, recorded[oname], out, atol, rtol)
                    if msg is not None:
                        raise _StopRun(msg)
            return out

    with eval_mode(gm_o, gm_r):
        Recorder(gm_o).run(*_clone_inputs(xs))
        try:
            Comparer(gm_r).run(*_clone_inputs(xs))
        except _StopRun as stop:
            return stop.message
    return None


def _node_mismatch(n: fx.Node, oname: str, ref: Any, out: Any, atol: float, rtol: float) -> str | None:
    where = f"{_node_label(n)} ({n.op} {n.name}" + ("" if oname == n.name else f" ↔ original {oname}") + ")"
    rl, cl = _tensor_leaves(ref), _tensor_leaves(out)
    if not rl and not cl:
        return None
    if len(rl) != len(cl):
        return f"{where}: {len(cl)} tensor outputs vs {len(rl)} in the original"
    for r, c in zip(rl, cl):
        s = compare_arrays(r, c, pair="original↔rewritten", output=n.name, batch="-", atol=atol, rtol=rtol)
        if not s.passed:
            if s.note:
                return f"{where}: {s.note}"
            return f"{where}: max rel err {s.max_rel:.1e} (max abs {s.max_abs:.1e})"
    return None
