"""Finding every BatchNorm site and what surrounds it, and deciding — in one place — what the fold
pass may do with it.

A *site* is one call of a BatchNorm-like module in a traced graph (or a BatchNorm module outside
every traced part).  :func:`can_fold` returns a :class:`FoldPlan`: the action and, when the
preferred action is not possible, the reason — so ``normswap inspect`` and the report can say *why*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .capture import Capture, TracedPart, is_dynamic_pad_layer
from .graph_ops import (
    CAT_FUNCTIONS,
    is_add,
    is_eval_identity,
    is_flat_view,
    node_shape,
    plus_zero,
    sum_leaves,
    value_users,
)
from .layers import FittedAffine, is_identity
from .norm_sites import is_affine_norm, norm_family, norm_post_ops, num_channels
from ..norms.registry import site_kind

__all__ = [
    "NormSite",
    "FoldPlan",
    "BNParams",
    "find_sites",
    "bn_params",
    "bn_kind_reason",
    "bn_post_ops",
    "can_fold",
    "site_affine",
    "SiteAffine",
    "is_fold_site",
    "NEEDS_CALIBRATION",
    "FOLD_ACTIONS",
    "MergePlan",
    "folds_like_conv",
    "is_eval_identity",
    "needs_shapes",
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
    "into-producers": "folded slice by slice into the layers whose outputs are concatenated before it",
    "merged": "identity-BatchNorm branch merged with the parallel convolution branches into one convolution "
              "(structural re-parameterization)",
    "affine": "replaced by a per-channel scale-and-shift",
    "ws-baked": "weight-standardized convolution replaced by a plain one holding the standardized weights",
    "refuse": "left unchanged",
    "kept": "kept as it is: a per-sample norm --fold-norms did not choose (the reason says why)",
}


@dataclass
class BNParams:
    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    # float64 (s, t) of BN(x) = s·x + t (bn_scale_shift), computed by bn_params' check
    scale: torch.Tensor
    shift: torch.Tensor


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
    if isinstance(m, FittedAffine) or is_affine_norm(m):
        drop, act = (m.drop, m.act) if isinstance(m, FittedAffine) else norm_post_ops(m)
        return (None if is_identity(drop) else drop), (None if is_identity(act) else act)
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
    from .fold import bn_scale_shift

    w, b, eps = getattr(m, "weight", None), getattr(m, "bias", None), float(m.eps)
    scale, shift = bn_scale_shift(rm, rv, w, b, eps)
    dtype = w.dtype if w is not None and w.is_floating_point() else rm.dtype
    limit = torch.finfo(dtype).max if dtype.is_floating_point else math.inf
    # one check covers every reason below (a NaN/Inf in μ, σ², γ, β or a zero σ²+ε makes s or t
    # non-finite; σ² = +Inf or σ² < 0 fails the range test): the reason itself is sought only when it fails
    if bool((torch.isfinite(scale) & torch.isfinite(shift) & (rv >= 0) & (rv < math.inf) & (scale.abs() <= limit)).all()):
        return BNParams(rm, rv, w, b, eps, scale, shift)
    if not torch.isfinite(rm).all() or not torch.isfinite(rv).all():
        return "running statistics contain NaN or Inf"
    if (rv < 0).any():
        return "running_var has negative entries"
    if w is not None and not torch.isfinite(w).all() or b is not None and not torch.isfinite(b).all():
        return "affine weight or bias contains NaN or Inf"
    zero = int(((rv.detach().to(torch.float64) + eps) <= 0).sum())
    if zero:  # 1/√(σ²+ε) is infinite: the BN itself outputs Inf/NaN, no finite fold exists
        return f"running_var + eps is 0 in {zero} channel(s) (eps={eps:g}): the BN divides by zero"
    scale = (1.0 if w is None else w.detach().to(torch.float64).abs()) * torch.rsqrt(rv.detach().to(torch.float64) + eps)
    if dtype.is_floating_point and bool((scale > torch.finfo(dtype).max).any()):
        return f"the folded scale γ/√(σ²+ε) overflows {str(dtype).replace('torch.', '')}: the fold would not be finite"
    return "the folded shift β − μ·γ/√(σ²+ε) is not finite (it overflows float64)"


NEEDS_CALIBRATION = ("needs calibration data: it normalizes with per-sample statistics, so its eval-time affine is "
                     "fitted, not read off (--to fold --calib DATA)")


@dataclass
class SiteAffine:
    """One model of a site: its eval-time ``y = scale·x + shift`` (float64, per channel), the dtype
    to fold it in and, for a BatchNorm, the checked parameters it was computed from."""

    scale: torch.Tensor
    shift: torch.Tensor
    dtype: torch.dtype
    params: BNParams | None = None


def _fitted_affine(m: nn.Module) -> SiteAffine | str:
    s, t = m.scale.detach().to(torch.float64), m.shift.detach().to(torch.float64)
    if not (torch.isfinite(s).all() and torch.isfinite(t).all()):
        return "the fitted affine contains NaN or Inf"
    return SiteAffine(s, t, m.scale.dtype)


def _unfitted(m: nn.Module) -> str:
    return NEEDS_CALIBRATION


def _bn_affine(m: nn.Module) -> SiteAffine | str:
    """Closed form: ``s = γ/√(σ²+ε)``, ``t = β − μ·s`` (:func:`normswap.rewriting.fold.bn_scale_shift`, by :func:`bn_params`)."""
    why = bn_kind_reason(m)
    if why is not None:
        return why
    p = bn_params(m)
    if isinstance(p, str):
        return p
    s, t = p.scale, p.shift
    return SiteAffine(s, t, p.weight.dtype if p.weight is not None else p.running_mean.dtype, p)


#: how each kind of site gets its (scale, shift), first match wins: a fitted affine reads its own, a
#: per-sample norm needs one fitted first, everything else is read as an eval BatchNorm
_AFFINES = (
    (lambda m: isinstance(m, FittedAffine), _fitted_affine),
    (is_affine_norm, _unfitted),
    (lambda m: True, _bn_affine),
)


def site_affine(site: NormSite) -> SiteAffine | str:
    """The site's eval-time affine ``(scale, shift)``, or the reason it has none."""
    return next(fn for match, fn in _AFFINES if match(site.module))(site.module)


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
        m = self.module
        return f"FittedAffine({m.source})" if isinstance(m, FittedAffine) and m.source else type(m).__name__

    @property
    def axis(self) -> int:
        """The axis of the site's per-channel affine: 1, or -1 (a LayerNorm on ``[N, *, C]``)."""
        m = self.module
        if isinstance(m, FittedAffine):
            return m.axis
        fam = norm_family(m)
        return 1 if fam is None else fam.axis

    @property
    def last_axis(self) -> bool:
        """The affine acts on the last axis of a tensor of rank > 2 (tokens), not on dim 1."""
        return self.axis == -1 and self.spatial_dims != 0

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
    if is_affine_norm(m):
        return num_channels(m)
    rm = getattr(m, "running_mean", None)
    if getattr(m, "num_features", None) is not None:
        return int(m.num_features)
    return int(rm.numel()) if rm is not None else None


def submodule(root: nn.Module, target: str) -> nn.Module:
    """``root.get_submodule(target)`` through the ``_modules`` dicts directly (the site predicates look
    modules up thousands of times per fold; torch's checks at every level cost more than the walk), with
    torch's lookup — and its error — for anything the plain walk does not find."""
    m = root
    try:
        for part in target.split(".") if target else ():
            m = m._modules[part]
    except (KeyError, AttributeError):
        return root.get_submodule(target)
    if m is None:
        return root.get_submodule(target)
    return m


def node_module(gm: fx.GraphModule, n: Any) -> nn.Module | None:
    if isinstance(n, fx.Node) and n.op == "call_module":
        return submodule(gm, n.target)
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


def is_fold_site(m: nn.Module) -> bool:
    """A module the fold pass has a site for: a BatchNorm, a fitted affine, or any other norm (which
    folds only once its affine is fitted: :func:`site_affine`)."""
    return is_bn_site_module(m) or isinstance(m, FittedAffine) or is_affine_norm(m)


def find_sites(cap: Capture, *, every_norm: bool = False) -> list[NormSite]:
    """Every BatchNorm-like call in the captured parts, in graph order, then those left untraced;
    with ``every_norm`` also every other norm (:mod:`normswap.rewriting.norm_sites`) and fitted affine."""
    sites: list[NormSite] = []
    wanted = is_fold_site if every_norm else is_bn_site_module
    for part in cap.parts:
        gm = part.graph
        for n in gm.graph.nodes:
            m = node_module(gm, n)
            if m is None or not wanted(m):
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
        if wanted(m):
            sites.append(
                NormSite(qual, m, None, None, None, "unknown (untraced code)", [], untraced_reason=why)
            )
    return sites


@dataclass
class MergePlan:
    """A sum of parallel branches that all read the same tensor ``x``: the identity BatchNorm of the
    site, and convolutions of ``x`` (RepVGG / MobileOne blocks, their conv-side BatchNorms already
    folded).  ``top`` is the node whose value the merged convolution ``main`` replaces; ``inner``
    the add / eval-identity nodes between the branches and ``top`` (``top`` included)."""

    main: fx.Node
    others: list[fx.Node]
    top: fx.Node
    inner: list[fx.Node]


@dataclass
class FoldPlan:
    """What the fold pass will do at a site, and why not something better."""

    action: str  # one of FOLD_ACTIONS
    reason: str | None = None  # why the better actions are not possible (or why refused)
    target: str | None = None  # the layer it folds into
    params: BNParams | None = field(default=None, repr=False, compare=False)  # checked, when not refused
    affine: SiteAffine | None = field(default=None, repr=False, compare=False)  # (scale, shift), when not refused
    # into-producer(-copy): the shape-only view nodes between the producer and the BN (LeViT's
    # flatten); into-consumer: the eval-identity nodes (Dropout) between the BN and the consumer
    path: tuple[fx.Node, ...] = field(default=(), repr=False, compare=False)
    # into-producers: the concatenated layer outputs, in channel order
    sources: tuple[fx.Node, ...] = field(default=(), repr=False, compare=False)
    merge: MergePlan | None = field(default=None, repr=False, compare=False)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "target": self.target, "reason": self.reason}


# timm's Conv2dSame: ``F.conv2d(pad_same(x), W, b, stride, 0, dilation, groups)`` — the padding is
# applied to its *input*, so scaling its output channels is exactly scaling W and b.
_SAME_CONVS = {"Conv2dSame"}


def folds_like_conv(m: nn.Module | None) -> bool:
    """A Conv/ConvTranspose/Linear whose output channel ``o`` is ``W_o · (input) + b_o``: the plain
    torch classes and timm's ``Conv2dSame`` (its dynamic padding acts on the input)."""
    if not isinstance(m, WEIGHTED):
        return False
    return type(m).forward in PLAIN_FORWARDS or (is_dynamic_pad_layer(m) and type(m).__name__ in _SAME_CONVS)


def needs_shapes(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether planning BN node ``n`` needs tensor shapes: a Linear or a reshape before it, a
    concatenation (its axis may be negative) or a Linear after it."""
    src = n.args[0] if n.args else None
    if is_flat_view(src):
        return True
    if isinstance(src, fx.Node) and src.op == "call_function" and src.target in CAT_FUNCTIONS:
        dim = src.args[1] if len(src.args) > 1 else src.kwargs.get("dim", 0)
        return not isinstance(dim, int) or dim < 0
    near = [src] + [v for u in n.users for v in (u, *u.users)]
    return any(isinstance(node_module(gm, m), nn.Linear) for m in near)


def _producer_reason(gm: fx.GraphModule, site: NormSite) -> tuple[str | None, nn.Module | None, tuple[fx.Node, ...]]:
    """Why the node feeding the BN cannot absorb it (None = it can), plus its module and the
    reshapes between them (only a Linear is looked for through reshapes)."""
    n = site.node
    assert n is not None
    if len(n.args) != 1 or n.kwargs:
        return "BatchNorm is called with extra arguments", None, ()
    src = n.args[0]
    path: list[fx.Node] = []
    while is_flat_view(src):  # LeViT: Linear → flatten(0, 1) → BatchNorm1d
        path.insert(0, src)
        src = src.args[0]
    m = node_module(gm, src)
    if m is None:
        return f"its input comes from {describe_node(gm, src)}, not a Conv/ConvTranspose/Linear", None, ()
    assert isinstance(src, fx.Node)
    if len(src.args) != 1 or src.kwargs:
        return f"{src.target} is called with extra arguments", m, ()
    c = _num_features(site.module)
    if isinstance(m, WEIGHTED) and not folds_like_conv(m):
        return f"{src.target} ({type(m).__name__}) overrides forward", m, ()
    if isinstance(m, CONV + CONVT):
        if site.last_axis:
            return f"its affine acts on the last axis, not on {src.target}'s channels", m, ()
        if path:
            return f"{describe_node(gm, path[-1])} reshapes {src.target}'s output on its way to the BatchNorm", m, ()
        if m.out_channels != c:
            return f"{src.target} has {m.out_channels} output channels, BatchNorm has {c}", m, ()
        return None, m, ()
    if isinstance(m, nn.Linear):
        if m.out_features != c:
            return f"{src.target} has {m.out_features} outputs, BatchNorm has {c}", m, ()
        if site.spatial_dims is None and site.axis != -1:
            return "Linear→BatchNorm fold needs the input rank: give example inputs", m, ()
        if site.spatial_dims != 0 and site.axis != -1:  # a last-axis affine folds into any Linear
            return "Linear output is not [N, C]: BatchNorm1d normalizes dim 1, not the Linear's features", m, ()
        for v in path:  # BN1d on [M, C] normalizes the last axis: every reshape must keep it whole
            shape = node_shape(v)
            if shape is None or not shape or shape[-1] != c:
                return f"{describe_node(gm, v)} does not keep the Linear's {c} features as its last axis", m, ()
        return None, m, tuple(path)
    return f"its input comes from {src.target} ({type(m).__name__}), not a Conv/ConvTranspose/Linear", m, ()


def _cat_reason(gm: fx.GraphModule, site: NormSite) -> tuple[str | None, tuple[fx.Node, ...]]:
    """Why the BN cannot be folded slice by slice into the layers whose outputs are concatenated
    (along the channel axis) right before it (None = it can), plus those layers' nodes."""
    n = site.node
    assert n is not None
    src = n.args[0] if len(n.args) == 1 and not n.kwargs else None
    if not (isinstance(src, fx.Node) and src.op == "call_function" and src.target in CAT_FUNCTIONS):
        return "not a concatenation", ()
    if site.last_axis:
        return "its affine acts on the last axis, not on cat()'s channels", ()
    tensors = src.args[0] if src.args else src.kwargs.get("tensors")
    dim = src.args[1] if len(src.args) > 1 else src.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return "cat() with inputs normswap cannot read", ()
    shape = node_shape(src)
    if dim < 0:
        if shape is None:
            return "cat() along a negative axis: give example inputs", ()
        dim += len(shape)
    if dim != 1:
        return f"cat() joins axis {dim}, not the channel axis", ()
    if len(set(map(id, tensors))) != len(tensors):
        return "cat() joins the same tensor twice", ()
    total = 0
    for t in tensors:
        m = node_module(gm, t)
        if not folds_like_conv(m) or isinstance(m, nn.Linear) and site.spatial_dims != 0:
            return f"cat() also joins {describe_node(gm, t)}, not a Conv/ConvTranspose/Linear", ()
        assert isinstance(t, fx.Node)
        if len(t.args) != 1 or t.kwargs:
            return f"{t.target} is called with extra arguments", ()
        total += m.out_features if isinstance(m, nn.Linear) else m.out_channels
    c = _num_features(site.module)
    if total != c:
        return f"cat() joins {total} channels, BatchNorm has {c}", ()
    return None, tuple(tensors)


def _consumer_reason(gm: fx.GraphModule, site: NormSite) -> tuple[str | None, fx.Node | None, tuple[fx.Node, ...]]:
    """Why the BN cannot be folded forward into the single layer it feeds (None = it can), plus that
    layer's node and the eval-identity nodes (Dropout) in between."""
    n = site.node
    assert n is not None
    if bn_post_ops(site.module) != (None, None):
        return "its activation sits between it and the next layer", None, ()
    path: list[fx.Node] = []
    cur = n
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return f"its output feeds {len(users)} nodes", None, ()
        u = users[0]
        m = node_module(gm, u)
        if m is None or u.args[0] is not cur or len(u.args) != 1 or u.kwargs:
            return f"it feeds {describe_node(gm, u)}, not a Conv/Linear", None, ()
        if not is_eval_identity(m):
            break
        if module_call_count(gm, u.target) != 1:
            return f"{u.target} is called more than once", None, ()
        path.append(u)
        cur = u
    if module_call_count(gm, u.target) != 1:
        return f"{u.target} is called more than once", None, ()
    if isinstance(m, CONV) and site.last_axis:
        return f"its affine acts on the last axis, not on {u.target}'s input channels", None, ()
    if isinstance(m, CONV) and type(m).forward in PLAIN_FORWARDS:
        # Zero padding pads the *normalized* tensor with 0, which is not s·0 + t: only padding
        # that copies real values (reflect/replicate/circular) commutes with a per-channel affine.
        pads = m.padding if isinstance(m.padding, tuple) else (m.padding,)
        if m.padding_mode == "zeros" and (m.padding == "same" or any(p != 0 for p in pads)):
            return f"{u.target} zero-pads its input, so folding forward would not be exact", None, ()
        return None, u, tuple(path)
    if isinstance(m, CONV) and folds_like_conv(m):
        return f"{u.target} ({type(m).__name__}) zero-pads its input, so folding forward would not be exact", None, ()
    if isinstance(m, nn.Linear) and type(m).forward in PLAIN_FORWARDS:
        if site.spatial_dims != 0 and site.axis != -1:  # W(s⊙x + t) + c over the last axis: any rank
            return "the next Linear does not see [N, C] features", None, ()
        return None, u, tuple(path)
    return f"it feeds {describe_node(gm, u)}, not a Conv/Linear", None, ()


def _centred_padding(m: nn.Module) -> bool:
    """Every output position of conv ``m`` is centred on the input position it is computed at:
    odd kernel, padding ``d·(k−1)/2`` (``'same'`` included)."""
    for k, d, i in zip(m.kernel_size, m.dilation, range(len(m.kernel_size))):
        if k % 2 == 0:
            return False
        p = 0 if m.padding == "valid" else d * (k - 1) // 2 if m.padding == "same" else m.padding[i]
        if p != d * (k - 1) // 2:
            return False
    return True


def _merge_leaves_reason(gm: fx.GraphModule, site: NormSite, leaves: list[fx.Node]) -> tuple[str | None, fx.Node | None]:
    """Why the branches ``leaves`` (the BN node among them) cannot become one convolution, or the
    convolution they merge into."""
    n = site.node
    x = n.args[0]
    convs = [v for v in leaves if v is not n]
    if not convs:
        return "no convolution branch to merge into", None
    if len(set(leaves)) != len(leaves):
        return "the sum adds one branch more than once", None
    for v in convs:
        if len(v.users) != 1:
            return f"{describe_node(gm, v)}'s output is also used outside the sum", None
        m = node_module(gm, v)
        if not isinstance(m, CONV) or type(m).forward not in PLAIN_FORWARDS:
            return f"the sum also adds {describe_node(gm, v)}, not a plain convolution", None
        if v.args != (x,) or v.kwargs:
            return f"{v.target} does not read the BatchNorm's input", None
    mods = {v: node_module(gm, v) for v in convs}
    main = max(convs, key=lambda v: (math.prod(mods[v].kernel_size), -convs.index(v)))
    mm = mods[main]
    c = _num_features(site.module)
    if not (mm.in_channels == mm.out_channels == c):
        return f"{main.target} maps {mm.in_channels} to {mm.out_channels} channels; an identity branch of {c} cannot merge", None
    if any(s != 1 for s in mm.stride):
        return f"{main.target} has stride {tuple(mm.stride)}; the identity branch has stride 1", None
    for v, m in mods.items():
        what = f"{v.target} and {main.target}"
        if type(m) is not type(mm) or (m.in_channels, m.out_channels, m.groups) != (mm.in_channels, mm.out_channels, mm.groups):
            return f"{what} differ in type, channels or groups", None
        if tuple(m.stride) != tuple(mm.stride) or tuple(m.dilation) != tuple(mm.dilation) and any(k > 1 for k in m.kernel_size):
            return f"{what} differ in stride or dilation", None
        if any(k > K for k, K in zip(m.kernel_size, mm.kernel_size)):
            return f"{v.target}'s kernel does not fit inside {main.target}'s", None
        if not _centred_padding(m):
            return f"{v.target} (kernel {tuple(m.kernel_size)}, padding {m.padding}) is not centred", None
        if m.padding_mode != mm.padding_mode and any(k > 1 for k in m.kernel_size):
            return f"{what} pad differently ({m.padding_mode} vs {mm.padding_mode})", None
        if m.weight.dtype != mm.weight.dtype:
            return f"{what} have different dtypes", None
    return None, main


def _merge_reason(gm: fx.GraphModule, site: NormSite) -> tuple[str | None, MergePlan | None]:
    """Why the BN — an identity branch summed with convolutions of its own input (RepVGG,
    MobileOne) — cannot be merged with them into one convolution (None = it can).

    The largest sum (climbing additions and eval-identity modules from the BN) whose every term is
    the BN or a convolution of the BN's input wins; the merged kernel is the sum of the branches'
    kernels, each centred in the largest, plus ``s_c`` at the centre tap of channel ``c``'s own input.
    """
    n = site.node
    assert n is not None
    if len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], fx.Node):
        return "BatchNorm is called with extra arguments", None
    tops: list[fx.Node] = []
    cur = n
    while len(cur.users) == 1:
        (u,) = cur.users
        if is_add(u):
            tops.append(u)
        elif not (is_eval_identity(node_module(gm, u)) and u.args == (cur,)) and plus_zero(u) is not cur:
            break
        cur = u
    if not tops:
        return "its output is not added to other branches", None
    if site.last_axis:
        return "its affine acts on the last axis", None
    if bn_post_ops(site.module) != (None, None):
        return "its activation sits on the identity branch", None
    smallest_why = None
    for top in reversed(tops):  # the largest sum first
        leaves, inner = sum_leaves(gm, top)
        why, main = _merge_leaves_reason(gm, site, leaves)
        if why is None:
            assert main is not None
            others = [v for v in leaves if v is not n and v is not main]
            return None, MergePlan(main, others, top, inner)
        smallest_why = why  # ends as the reason for the smallest sum
    return smallest_why, None


def can_fold(site: NormSite) -> FoldPlan:
    """Every reason a fold is refused or degraded, in one predicate.

    Preference: into the producer (through reshapes that keep a Linear's feature axis last) → into a
    copy of a shared producer → slice by slice into concatenated producers → forward into the
    consumer (through eval-identity Dropout) → merged with parallel convolution branches (RepVGG)
    → per-channel affine (always exact) → refuse (no exact eval function exists).
    """
    aff = site_affine(site)  # BatchNorm: closed form; a fitted affine: its own; another norm: refused
    if isinstance(aff, str):
        return FoldPlan("refuse", aff)
    params = aff.params
    if site.node is None or site.part is None:
        return FoldPlan("affine", f"not in a traced graph: {site.untraced_reason}", params=params, affine=aff)
    gm = site.part.graph
    why_prod, prod, path = _producer_reason(gm, site)
    notes = [f"through {', '.join(describe_node(gm, v) for v in path)}"] if path else []
    if why_prod is None:
        src = path[0].args[0] if path else site.node.args[0]
        assert isinstance(src, fx.Node)
        shared = []
        chain = [src, *path]
        for a, b in zip(chain, [*path, site.node]):
            others = [u for u in value_users(a) if u is not b]
            if others:
                shared.append(f"{describe_node(gm, a)} also feeds {len(others)} other node(s)")
        if module_call_count(gm, src.target) > 1:
            shared.append("the layer is called more than once")
        if shared:
            return FoldPlan("into-producer-copy", f"{src.target}: " + "; ".join(shared), str(src.target), params,
                            path=path, notes=notes, affine=aff)
        return FoldPlan("into-producer", None, str(src.target), params, path=path, notes=notes, affine=aff)
    why_cat, sources = _cat_reason(gm, site)
    if why_cat is None:
        return FoldPlan("into-producers", None, ", ".join(str(v.target) for v in sources), params, sources=sources, affine=aff)
    if why_cat != "not a concatenation":
        why_prod = why_cat
    why_cons, cons, path = _consumer_reason(gm, site)
    if why_cons is None:
        assert cons is not None
        notes = [f"through {', '.join(describe_node(gm, v) for v in path)} (identity in eval)"] if path else []
        return FoldPlan("into-consumer", why_prod, str(cons.target), params, path=path, notes=notes, affine=aff)
    why_merge, merge = _merge_reason(gm, site)
    if why_merge is None:
        assert merge is not None
        names = ", ".join(str(v.target) for v in merge.others)
        notes = [f"identity BatchNorm{' and ' + names if names else ''} merged into {merge.main.target}"]
        return FoldPlan("merged", None, str(merge.main.target), params, merge=merge, notes=notes, affine=aff)
    return FoldPlan("affine", f"{why_prod}; forward: {why_cons}; merge: {why_merge}", params=params, affine=aff)
