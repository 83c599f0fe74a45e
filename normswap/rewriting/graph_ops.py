"""What an fx node computes, for the fold pass's pattern matching (:mod:`normswap.rewriting.sites`): reshapes
that keep element order, shape-only uses, concatenations, additions and the trees they form,
and modules that are the identity in eval mode.  Graph queries only — no decisions, no reasons."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

__all__ = [
    "is_eval_identity", "is_flat_view", "shape_only_use", "value_users", "node_shape", "is_add", "plus_zero",
    "sum_leaves", "is_cat", "CAT_FUNCTIONS",
]


def _module(gm: fx.GraphModule, n: Any) -> nn.Module | None:
    return gm.get_submodule(n.target) if isinstance(n, fx.Node) and n.op == "call_module" else None


def is_eval_identity(m: nn.Module | None) -> bool:
    """A module that returns its input unchanged in eval mode: ``nn.Identity``, ``nn.Dropout*`` and
    timm's ``DropPath`` (the folded model is an inference graph)."""
    return m is not None and (
        type(m) is nn.Identity
        or isinstance(m, nn.modules.dropout._DropoutNd)
        or (type(m).__name__ == "DropPath" and type(m).__module__.startswith("timm."))
    )


# reshapes that keep row-major element order: a reshape that keeps the size of the last axis keeps
# every element's index along it (flat index f ↦ f mod C), so a per-feature affine commutes with it
_FLAT_METHODS = {"flatten", "reshape", "view", "reshape_as", "view_as", "contiguous"}
_FLAT_FUNCTIONS = {torch.flatten, torch.reshape}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


def is_flat_view(n: Any) -> bool:
    if not isinstance(n, fx.Node) or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    if any(isinstance(a, torch.dtype) for a in n.args) or "dtype" in n.kwargs:  # .view(dtype) reinterprets bits
        return False
    return (n.op == "call_method" and n.target in _FLAT_METHODS) or (
        n.op == "call_function" and n.target in _FLAT_FUNCTIONS
    )


def shape_only_use(user: fx.Node, n: fx.Node) -> bool:
    """``user`` reads only ``n``'s shape (``y.reshape_as(n)``, ``n.size()``, ``n.shape``)."""
    if user.op == "call_method" and user.target in ("reshape_as", "view_as", "expand_as"):
        return user.args[0] is not n and n in user.args[1:]
    if user.op == "call_method" and user.target in ("size", "dim"):
        return True
    return user.op == "call_function" and user.target is getattr and len(user.args) > 1 and user.args[1] in ("shape", "ndim")


def value_users(n: fx.Node) -> list[fx.Node]:
    """The users of ``n`` that read its values (not only its shape)."""
    return [u for u in n.users if not shape_only_use(u, n)]


def node_shape(n: Any) -> tuple[int, ...] | None:
    meta = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(shape)


def sum_leaves(gm: fx.GraphModule, top: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """(leaves, inner nodes) of the tree of tensor additions and eval-identity modules under ``top``;
    an inner node other than ``top`` whose value is also used elsewhere is a leaf."""
    leaves: list[fx.Node] = []
    inner: list[fx.Node] = []

    def visit(v: fx.Node, is_top: bool) -> None:
        if not is_top and len(v.users) != 1:
            leaves.append(v)
        elif is_add(v):
            inner.append(v)
            for a in v.args:
                visit(a, False)
        elif is_eval_identity(_module(gm, v)) and len(v.args) == 1 and isinstance(v.args[0], fx.Node):
            inner.append(v)
            visit(v.args[0], False)
        elif plus_zero(v) is not None:
            inner.append(v)
            visit(plus_zero(v), False)
        else:
            leaves.append(v)

    visit(top, True)
    return leaves, inner


def is_add(v: Any) -> bool:
    return (isinstance(v, fx.Node) and v.op == "call_function" and v.target in _ADD_FUNCTIONS
            and len(v.args) == 2 and not v.kwargs and all(isinstance(a, fx.Node) for a in v.args))


def plus_zero(v: Any) -> fx.Node | None:
    """``a`` when ``v`` is ``a + 0`` or ``0 + a`` (MobileOne's ``0 + identity`` when a branch is
    absent), else None."""
    if not (isinstance(v, fx.Node) and v.op == "call_function" and v.target in _ADD_FUNCTIONS
            and len(v.args) == 2 and not v.kwargs):
        return None
    a, b = v.args
    if isinstance(a, fx.Node) and not isinstance(b, fx.Node) and b == 0:
        return a
    if isinstance(b, fx.Node) and not isinstance(a, fx.Node) and a == 0:
        return b
    return None


def is_cat(n: Any) -> bool:
    """``torch.cat`` / ``concat`` / ``concatenate``."""
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in CAT_FUNCTIONS
