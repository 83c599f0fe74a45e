"""Finding every BatchNorm site and what surrounds it, and deciding — in one place — what the fold
pass may do with it.

A *site* is one call of a BatchNorm-like module in a traced graph (or a BatchNorm module outside
every traced part).  :func:`can_fold` returns a :class:`FoldPlan`: the action and, when the
preferred action is not possible, the reason — so ``normswap inspect`` and the report can say *why*.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .capture import Capture, TracedPart
from .layers import is_identity
from .norms.registry import site_kind

__all__ = [
    "NormSite",
    "FoldPlan",
    "BNParams",
    "find_sites",
    "bn_params",
    "bn_kind_reason",
    "bn_post_ops",
    "can_fold",
    "FOLD_ACTIONS",
]

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
WEIGHTED = CONV + CONVT + (nn.Linear,)  # the layers a BatchNorm folds into
# Subclasses that override forward (timm's StdConv2d, Conv2dSame…) compute something else.
PLAIN_FORWARDS = {k.forward for k in WEIGHTED}
_STD_FORWARDS = {
    nn.modules.batchnorm._BatchNorm.forward,
    nn.SyncBatchNorm.forward,
}
# timm classes whose forward is "batch norm, then self.drop, then self.act" (read from timm's
# norm_act.py); matched by name and module so timm need not be imported.
_NORM_ACT = {"BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"}

FOLD_ACTIONS = {
    "into-producer": "folded into the preceding layer's weights",
    "into-producer-copy": "folded into a copy of the preceding layer (its output also feeds other nodes)",
    "into-consumer": "folded forward into the following layer's weights",
    "affine": "replaced by a per-channel scale-and-shift",
    "ws-baked": "weight-standardized convolution replaced by a plain one holding the standardized weights",
    "refuse": "left unchanged",
}


@dataclass
class BNParams:
    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def _is_timm(m: nn.Module, names: set[str]) -> bool:
    return type(m).__name__ in names and type(m).__module__.startswith("timm.")


def _is_frozen(m: nn.Module) -> bool:
    """torchvision's / timm's FrozenBatchNorm2d(Act2d) and normswap's own FrozenBatchNorm (the output
    of ``--to frozen``): one definition, :func:`normswap.norms.registry.site_kind`."""
    return site_kind(m) == "frozen" and hasattr(m, "eps")


def is_bn_site_module(m: nn.Module) -> bool:
    """A module that computes (eval) BatchNorm: ``_BatchNorm`` subclasses and frozen BNs."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or _is_frozen(m)


def bn_kind_reason(m: nn.Module) -> str | None:
    """Why normswap cannot know what this BatchNorm-like module computes, or None if it can.

    A ``_BatchNorm`` subclass that overrides ``forward`` may do anything after (or instead of)
    normalizing; only the known ones (timm's norm+act layers) are accepted.
    """
    if _is_frozen(m) or _is_timm(m, _NORM_ACT):
        return None
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if type(m).forward in _STD_FORWARDS:
            return None
        return (
            f"{type(m).__module__}.{type(m).__name__} subclasses BatchNorm but overrides forward; "
            "normswap cannot tell what else it computes"
        )
    return f"{type(m).__name__} is not a BatchNorm"


def bn_post_ops(m: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """``(drop, act)`` a norm+act layer applies after normalizing (timm's ``BatchNormAct2d``…);
    ``None`` for each one that is absent or an ``nn.Identity`` (nothing to keep)."""
    if _is_timm(m, _NORM_ACT):
        drop, act = getattr(m, "drop", None), getattr(m, "act", None)
        return (None if is_identity(drop) else drop), (None if is_identity(act) else act)
    return None, None


def bn_params(m: nn.Module) -> BNParams | str:
    """The eval-mode statistics and affine parameters, or the reason they cannot define an exact
    eval-time affine map."""
    rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
    if rm is None or rv is None or (
        isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats
    ):
        return "no running statistics (track_running_stats=False): it normalizes with batch statistics even in eval"
    if getattr(rm, "is_meta", False) or isinstance(rm, nn.parameter.UninitializedBuffer):
        return "running statistics are not materialized (lazy module never run)"
    if not torch.isfinite(rm).all() or not torch.isfinite(rv).all():
        return "running statistics contain NaN or Inf"
    if (rv < 0).any():
        return "running_var has negative entries"
    w = getattr(m, "weight", None)
    b = getattr(m, "bias", None)
    if w is not None and not torch.isfinite(w).all() or b is not None and not torch.isfinite(b).all():
        return "affine weight or bias contains NaN or Inf"
    eps = float(m.eps)
    zero = int(((rv.detach().to(torch.float64) + eps) <= 0).sum())
    if zero:  # 1/√(σ²+ε) is infinite: the BN itself outputs Inf/NaN, no finite fold exists
        return f"running_var + eps is 0 in {zero} channel(s) (eps={eps:g}): the BN divides by zero"
    scale = (1.0 if w is None else w.detach().to(torch.float64).abs()) * torch.rsqrt(rv.detach().to(torch.float64) + eps)
    dtype = w.dtype if w is not None and w.is_floating_point() else rm.dtype
    if dtype.is_floating_point and bool((scale > torch.finfo(dtype).max).any()):
        return f"the folded scale γ/√(σ²+ε) overflows {str(dtype).replace('torch.', '')}: the fold would not be finite"
    return BNParams(rm, rv, w, b, eps)


@dataclass
class NormSite:
    """One BatchNorm call site."""

    name: str  # qualified module name in the model
    module: nn.Module
    part: TracedPart | None  # the traced part holding the node; None = outside every traced part
    node: fx.Node | None
    spatial_dims: int | None  # 0 for [N, C], 1–3 for conv features; None when shapes are unknown
    producer: str  # human description of what feeds it
    consumers: list[str] = field(default_factory=list)
    untraced_reason: str | None = None

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.kind,
            "num_features": _num_features(self.module),
            "spatial_dims": self.spatial_dims,
            "producer": self.producer,
            "consumers": self.consumers,
            "traced": self.node is not None,
        }


def _num_features(m: nn.Module) -> int | None:
    rm = getattr(m, "running_mean", None)
    if getattr(m, "num_features", None) is not None:
        return int(m.num_features)
    return int(rm.numel()) if rm is not None else None


def node_module(gm: fx.GraphModule, n: Any) -> nn.Module | None:
    if isinstance(n, fx.Node) and n.op == "call_module":
        return gm.get_submodule(n.target)
    return None


def describe_node(gm: fx.GraphModule, n: Any) -> str:
    if not isinstance(n, fx.Node):
        return f"constant {n!r}"
    if n.op == "call_module":
        return f"{n.target} ({type(gm.get_submodule(n.target)).__name__})"
    if n.op == "placeholder":
        return f"input '{n.target}'"
    if n.op == "call_function":
        return f"{getattr(n.target, '__name__', str(n.target))}()"
    if n.op == "call_method":
        return f".{n.target}()"
    return f"{n.op} {n.target}"


def _spatial_dims(n: fx.Node) -> int | None:
    meta = n.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else len(shape) - 2


def module_call_count(gm: fx.GraphModule, target: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def find_sites(cap: Capture) -> list[NormSite]:
    """Every BatchNorm-like call in the captured parts, in graph order, then those left untraced."""
    sites: list[NormSite] = []
    for part in cap.parts:
        gm = part.graph
        for n in gm.graph.nodes:
            m = node_module(gm, n)
            if m is None or not is_bn_site_module(m):
                continue
            name = f"{part.qualname}.{n.target}" if part.qualname else str(n.target)
            src = n.args[0] if n.args else None
            sites.append(
                NormSite(
                    name=name,
                    module=m,
                    part=part,
                    node=n,
                    spatial_dims=_spatial_dims(n) if part.shapes_known else None,
                    producer=describe_node(gm, src),
                    consumers=[describe_node(gm, u) for u in n.users],
                )
            )
    for qual, why in cap.untraced:
        m = cap.root.get_submodule(qual)
        if is_bn_site_module(m):
            sites.append(
                NormSite(qual, m, None, None, None, "unknown (untraced code)", [], untraced_reason=why)
            )
    return sites


@dataclass
class FoldPlan:
    """What the fold pass will do at a site, and why not something better."""

    action: str  # one of FOLD_ACTIONS
    reason: str | None = None  # why the better actions are not possible (or why refused)
    target: str | None = None  # the layer it folds into
    params: BNParams | None = field(default=None, repr=False, compare=False)  # checked, when not refused

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "target": self.target, "reason": self.reason}


def _producer_reason(gm: fx.GraphModule, site: NormSite) -> tuple[str | None, nn.Module | None]:
    """Why the node feeding the BN cannot absorb it (None = it can), plus its module."""
    n = site.node
    assert n is not None
    if len(n.args) != 1 or n.kwargs:
        return "BatchNorm is called with extra arguments", None
    src = n.args[0]
    m = node_module(gm, src)
    if m is None:
        return f"its input comes from {describe_node(gm, src)}, not a Conv/ConvTranspose/Linear", None
    assert isinstance(src, fx.Node)
    if len(src.args) != 1 or src.kwargs:
        return f"{src.target} is called with extra arguments", m
    c = _num_features(site.module)
    if isinstance(m, WEIGHTED) and type(m).forward not in PLAIN_FORWARDS:
        return f"{src.target} ({type(m).__name__}) overrides forward", m
    if isinstance(m, CONV + CONVT):
        if m.out_channels != c:
            return f"{src.target} has {m.out_channels} output channels, BatchNorm has {c}", m
        return None, m
    if isinstance(m, nn.Linear):
        if m.out_features != c:
            return f"{src.target} has {m.out_features} outputs, BatchNorm has {c}", m
        if site.spatial_dims is None:
            return "Linear→BatchNorm fold needs the input rank: give example inputs", m
        if site.spatial_dims != 0:
            return "Linear output is not [N, C]: BatchNorm1d normalizes dim 1, not the Linear's features", m
        return None, m
    return f"its input comes from {src.target} ({type(m).__name__}), not a Conv/ConvTranspose/Linear", m


def _consumer_reason(gm: fx.GraphModule, site: NormSite) -> tuple[str | None, fx.Node | None]:
    """Why the BN cannot be folded forward into the single layer it feeds (None = it can)."""
    n = site.node
    assert n is not None
    if bn_post_ops(site.module) != (None, None):
        return "its activation sits between it and the next layer", None
    users = list(n.users)
    if len(users) != 1:
        return f"its output feeds {len(users)} nodes", None
    u = users[0]
    m = node_module(gm, u)
    if m is None or u.args[0] is not n or len(u.args) != 1 or u.kwargs:
        return f"it feeds {describe_node(gm, u)}, not a Conv/Linear", None
    if module_call_count(gm, u.target) != 1:
        return f"{u.target} is called more than once", None
    if isinstance(m, CONV) and type(m).forward in PLAIN_FORWARDS:
        # Zero padding pads the *normalized* tensor with 0, which is not s·0 + t: only padding
        # that copies real values (reflect/replicate/circular) commutes with a per-channel affine.
        pads = m.padding if isinstance(m.padding, tuple) else (m.padding,)
        if m.padding_mode == "zeros" and (m.padding == "same" or any(p != 0 for p in pads)):
            return f"{u.target} zero-pads its input, so folding forward would not be exact", None
        return None, u
    if isinstance(m, nn.Linear) and type(m).forward in PLAIN_FORWARDS:
        if site.spatial_dims != 0:
            return "the next Linear does not see [N, C] features", None
        return None, u
    return f"it feeds {describe_node(gm, u)}, not a Conv/Linear", None


def can_fold(site: NormSite) -> FoldPlan:
    """Every reason a fold is refused or degraded, in one predicate.

    Preference: into the producer → into a copy of a shared producer → forward into the consumer →
    per-channel affine (always exact) → refuse (no exact eval function exists).
    """
    why_kind = bn_kind_reason(site.module)
    if why_kind is not None:
        return FoldPlan("refuse", why_kind)
    params = bn_params(site.module)
    if isinstance(params, str):
        return FoldPlan("refuse", params)
    if site.node is None or site.part is None:
        return FoldPlan("affine", f"not in a traced graph: {site.untraced_reason}", params=params)
    gm = site.part.graph
    why_prod, prod = _producer_reason(gm, site)
    if why_prod is None:
        src = site.node.args[0]
        assert isinstance(src, fx.Node)
        shared = []
        if len(src.users) > 1:
            shared.append(f"its output also feeds {len(src.users) - 1} other node(s)")
        if module_call_count(gm, src.target) > 1:
            shared.append("the layer is called more than once")
        if shared:
            return FoldPlan("into-producer-copy", f"{src.target}: " + "; ".join(shared), str(src.target), params)
        return FoldPlan("into-producer", None, str(src.target), params)
    why_cons, cons = _consumer_reason(gm, site)
    if why_cons is None:
        assert cons is not None
        return FoldPlan("into-consumer", why_prod, str(cons.target), params)
    return FoldPlan("affine", f"{why_prod}; and forward: {why_cons}", params=params)
