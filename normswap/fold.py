"""The fold pass: eval-time BatchNorm folded into neighbouring layers, exactly.

The pure arithmetic (tensors in, tensors out) comes first; the graph surgery that calls it
(:func:`fold`) comes after.  Eval-mode BatchNorm is a per-channel affine map

    BN(x)_c = γ_c (x_c − μ_c) / √(σ²_c + ε) + β_c = s_c · x_c + t_c,
    s = γ / √(σ² + ε),   t = β − μ · s.

Every function here computes in float64 and casts the result back to the dtype of the weight it
replaces, so an fp16/bf16 model keeps its dtype while the fold itself loses no precision.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import Tensor, fx, nn

from .capture import Capture, capture, is_norm_module, propagate_shapes
from .layers import ChannelAffine, PostNorm
from .passes import PassResult, SiteAction, assemble, set_module, unique_target
from .sites import CONVT, WEIGHTED, BNParams, bn_post_ops, can_fold, find_sites, is_bn_site_module

__all__ = [
    "fold",
    "SiteAction",
    "bn_scale_shift",
    "fold_conv_bn_weights",
    "fold_linear_bn_weights",
    "fold_bn_into_conv_input",
    "fold_bn_into_linear_input",
    "ws_kind",
    "bake_ws_weight",
    "bake_ws",
]


def bn_scale_shift(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Return float64 ``(s, t)`` with ``BN(x) = s·x + t``: ``s = γ/√(σ²+ε)``, ``t = β − μ·s``.

    ``weight``/``bias`` may be None (``affine=False``): γ = 1, β = 0.
    """
    mean = running_mean.detach().to(torch.float64)
    var = running_var.detach().to(torch.float64)
    gamma = torch.ones_like(mean) if weight is None else weight.detach().to(torch.float64)
    beta = torch.zeros_like(mean) if bias is None else bias.detach().to(torch.float64)
    scale = gamma * torch.rsqrt(var + float(eps))
    return scale, beta - mean * scale


def _bias64(bias: Tensor | None, n: int, like: Tensor) -> Tensor:
    if bias is None:
        return torch.zeros(n, dtype=torch.float64, device=like.device)
    return bias.detach().to(torch.float64)


def fold_conv_bn_weights(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    transpose: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fold ``y = s·conv(x; W, b) + t`` into one convolution.

    ``W'_o = s_o · W_o`` for every output channel ``o`` and ``b' = s·b + t``.

    A convolution's weight is ``[C_out, C_in/g, *K]``; a transposed convolution's is
    ``[C_in, C_out/g, *K]``, where output channel ``o = group·(C_out/g) + j`` lives at
    ``W[group·(C_in/g) : …, j]`` — so with ``groups > 1`` the scale must be laid out per group
    (``torch.nn.utils.fusion`` assumes ``groups == 1`` here).
    """
    w = weight.detach().to(torch.float64, copy=True)  # a fresh tensor even for float64 models: scaled in place below
    k = w.dim() - 2
    if transpose:
        c_in, c_out_g = w.shape[0], w.shape[1]
        s = scale.reshape(groups, 1, c_out_g, *([1] * k))
        w.view(groups, c_in // groups, c_out_g, *w.shape[2:]).mul_(s)
        c_out = c_out_g * groups
    else:
        c_out = w.shape[0]
        w.mul_(scale.reshape(c_out, *([1] * (k + 1))))
    b = _bias64(bias, c_out, w) * scale + shift
    return w.to(weight.dtype), b.to(weight.dtype)


def fold_linear_bn_weights(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """Fold ``y = s·(W x + b) + t`` (BatchNorm1d on ``[N, C]``): ``W' = diag(s) W``, ``b' = s·b + t``."""
    w = weight.detach().to(torch.float64)
    b = _bias64(bias, w.shape[0], w) * scale + shift
    return (w * scale[:, None]).to(weight.dtype), b.to(weight.dtype)


def fold_bn_into_conv_input(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *, groups: int = 1
) -> tuple[Tensor, Tensor]:
    """Fold a BN that *feeds* a convolution: ``conv(s·x + t; W, b) = conv(x; W', b')``.

    ``W'[o, j] = W[o, j] · s[i]`` and ``b'_o = b_o + Σ_{j,k} W[o, j, k] · t[i]`` where
    ``i = group(o)·(C_in/g) + j`` is the input channel that filter slice reads.  Exact only when
    every output position reads a full window of real inputs — no zero padding (the caller checks).
    """
    w = weight.detach().to(torch.float64)
    c_out, c_in_g = w.shape[0], w.shape[1]
    k = w.dim() - 2
    # [g, C_in/g] -> one row of input-channel factors per output channel of that group
    s = scale.reshape(groups, 1, c_in_g).expand(groups, c_out // groups, c_in_g).reshape(c_out, c_in_g)
    t = shift.reshape(groups, 1, c_in_g).expand(groups, c_out // groups, c_in_g).reshape(c_out, c_in_g)
    b = _bias64(bias, c_out, w) + (w.sum(dim=tuple(range(2, 2 + k))) * t).sum(dim=1)
    w = w * s.reshape(c_out, c_in_g, *([1] * k))
    return w.to(weight.dtype), b.to(weight.dtype)


def fold_bn_into_linear_input(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """Fold a BatchNorm1d on ``[N, C]`` that feeds a Linear: ``W' = W diag(s)``, ``b' = b + W t``."""
    w = weight.detach().to(torch.float64)
    b = _bias64(bias, w.shape[0], w) + w @ shift
    return (w * scale[None, :]).to(weight.dtype), b.to(weight.dtype)


# --------------------------------------------------------------------------------------------
# Weight standardization, baked: a WS convolution becomes a plain one with Ŵ as its weight.
# --------------------------------------------------------------------------------------------

# timm.layers.std_conv: matched by class name and module so timm need not be imported
_TIMM_WS = {"StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"}


def ws_kind(m: nn.Module) -> str | None:
    """``"normswap"`` for normswap's WSConv1d/2d/3d, ``"timm"`` for timm's (Scaled)StdConv2d(Same),
    None for anything else (subclasses of the timm classes are not matched: their forward may differ)."""
    from .norms.ws import WS_CONVS

    if isinstance(m, WS_CONVS):
        return "normswap"
    if type(m).__name__ in _TIMM_WS and type(m).__module__.startswith("timm."):
        return "timm"
    return None


def bake_ws_weight(weight: Tensor, eps: float, gain: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Ŵ = (W − μ)/√(σ² + ε) per output channel (biased variance, ε inside the root — what both
    normswap's WSConv and timm's ``F.batch_norm(W.reshape(1, C_out, -1), training=True)`` compute),
    times ``gain·scale`` per output channel for timm's ScaledStdConv2d. Computed in float64, returned
    in ``weight``'s dtype."""
    from .norms.ws import standardize

    w = standardize(weight.detach().to(torch.float64), float(eps))
    if gain is not None or scale is not None:
        g = torch.ones(w.shape[0], dtype=torch.float64) if gain is None else gain.detach().to(torch.float64).reshape(-1)
        w = w * (g * (1.0 if scale is None else float(scale))).reshape(-1, *([1] * (w.dim() - 1)))
    return w.to(weight.dtype)


def _ws_pad_same(x: Tensor, kernel_size: Any, stride: Any, dilation: Any) -> Tensor:
    """timm's own dynamic SAME padding (``timm.layers.padding.pad_same``), called exactly as the
    ``*Same`` convolutions call it; an opaque call for torch.fx (its size arithmetic is not traceable)."""
    from timm.layers.padding import pad_same

    return pad_same(x, kernel_size, stride, dilation)


fx.wrap("_ws_pad_same")


class WSPadSame(nn.Module):
    """The dynamic SAME padding of a baked timm ``StdConv2dSame`` / ``ScaledStdConv2dSame``."""

    def __init__(self, kernel_size: Any, stride: Any, dilation: Any) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)

    def forward(self, x: Tensor) -> Tensor:
        return _ws_pad_same(x, self.kernel_size, self.stride, self.dilation)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


def _baked_ws(m: nn.Module) -> tuple[nn.Module, list[str]]:
    """The plain convolution (or ``Sequential(WSPadSame, Conv2d)``) computing what WS conv ``m``
    computes, with notes for the report."""
    w = m.weight
    notes: list[str] = []
    if ws_kind(m) == "normswap":  # its own export form is exactly this bake
        conv = m.export_form()
        conv.weight.requires_grad_(w.requires_grad)
        if m.bias is not None:
            conv.bias.requires_grad_(m.bias.requires_grad)
        return conv, notes
    # timm: F.conv2d with self.padding, padding_mode ignored (always zeros)
    gain = getattr(m, "gain", None)
    scale = getattr(m, "scale", None) if gain is not None else None
    baked = bake_ws_weight(w, m.eps, gain, scale)
    if gain is not None:
        notes.append("gain·scale (ScaledStdConv2d) baked in")
    conv = nn.Conv2d(
        m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
        groups=m.groups, bias=m.bias is not None, device=w.device, dtype=w.dtype,
    )
    with torch.no_grad():
        conv.weight = nn.Parameter(baked, requires_grad=w.requires_grad)
        if m.bias is not None:
            conv.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
    new: nn.Module = conv
    if getattr(m, "same_pad", False):
        new = nn.Sequential(WSPadSame(m.kernel_size, m.stride, m.dilation), conv)
        notes.append("timm's dynamic SAME padding kept (WSPadSame before the convolution)")
    return new.train(m.training), notes


def bake_ws(model: nn.Module, owned: set[int] = frozenset()) -> tuple[nn.Module, list[SiteAction]]:
    """Replace every weight-standardized convolution under ``model`` by its baked form (in place on
    ``model``'s containers; the WS convs themselves are not touched, so they may be shared with the
    caller's model). Modules whose id is in ``owned`` (the caller's) are never modified. A WS conv
    used at several places becomes one baked module used at the same places.
    Returns the model (a new root if the root itself is a WS conv) and one ``ws-baked`` action each."""
    actions: list[SiteAction] = []
    memo: dict[int, nn.Module] = {}

    def baked(name: str, m: nn.Module) -> nn.Module:
        if id(m) not in memo:
            new, notes = _baked_ws(m)
            memo[id(m)] = new
            target = f"{name}.1" if isinstance(new, nn.Sequential) else name
            actions.append(SiteAction(name or "<model>", type(m).__name__, "ws-baked", target=target,
                                      exact=True, notes=notes))
        return memo[id(m)]

    if ws_kind(model) is not None:
        return baked("", model), actions
    stack: list[tuple[str, nn.Module]] = [("", model)]
    visited: set[int] = set()
    while stack:
        prefix, mod = stack.pop(0)
        if id(mod) in visited:
            continue
        visited.add(id(mod))
        for name, child in list(mod._modules.items()):
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            if ws_kind(child) is not None and id(mod) not in owned:
                mod._modules[name] = baked(path, child)
            else:
                stack.append((path, child))
    return model, actions


# --------------------------------------------------------------------------------------------
# The pass: graph surgery that calls the arithmetic above.
# --------------------------------------------------------------------------------------------

def _with_weights(layer: nn.Module, weight: Tensor, bias: Tensor) -> nn.Module:
    """A copy of ``layer`` with new weight and bias (never touches ``layer``'s tensors).

    A deep copy whose memo maps the old weight/bias to the new ones (so they are not copied for
    nothing): a shallow ``copy.copy`` would share the hook tables (``_forward_hooks``…) and the
    other dicts of the caller's layer, so registering a hook on the result would register it on
    the caller's model.
    """
    req = layer.weight.requires_grad
    memo: dict[int, Any] = {id(layer.weight): nn.Parameter(weight, requires_grad=req)}
    if layer.bias is not None:
        memo[id(layer.bias)] = nn.Parameter(bias, requires_grad=req)
    new = copy.deepcopy(layer, memo)
    if layer.bias is None:
        new.bias = nn.Parameter(bias, requires_grad=req)
    return new


def _fold_into_producer(layer: nn.Module, s: Tensor, t: Tensor) -> nn.Module:
    if isinstance(layer, nn.Linear):
        w, b = fold_linear_bn_weights(layer.weight, layer.bias, s, t)
    else:
        w, b = fold_conv_bn_weights(
            layer.weight, layer.bias, s, t,
            transpose=isinstance(layer, CONVT), groups=layer.groups,
        )
    return _with_weights(layer, w, b)


def _fold_into_consumer(layer: nn.Module, s: Tensor, t: Tensor) -> nn.Module:
    if isinstance(layer, nn.Linear):
        w, b = fold_bn_into_linear_input(layer.weight, layer.bias, s, t)
    else:
        w, b = fold_bn_into_conv_input(layer.weight, layer.bias, s, t, groups=layer.groups)
    return _with_weights(layer, w, b)


def _post(bn: nn.Module) -> PostNorm | None:
    drop, act = bn_post_ops(bn)
    return None if drop is None and act is None else PostNorm(drop, act)


def _param_dtype(p: BNParams) -> torch.dtype:
    return p.weight.dtype if p.weight is not None else p.running_mean.dtype


def _affine(bn: nn.Module, s: Tensor, t: Tensor, dtype: torch.dtype) -> ChannelAffine:
    return ChannelAffine(s.to(dtype), t.to(dtype), *bn_post_ops(bn))


def _copy_sharing_weights(model: nn.Module) -> tuple[nn.Module, set[int]]:
    """Deep-copy ``model`` except its Conv/ConvTranspose/Linear layers, which stay shared objects.

    The fold never mutates them — it builds new modules with new weight tensors — and they hold no
    state a forward pass changes, so copying them first (as ``copy.deepcopy`` + torch.fx's ``fuse``
    do) is wasted work; :func:`_unshare` copies whatever of the caller's model is still referenced
    at the end, so the result never aliases it.  (BatchNorms are copied: a forward pass in
    training mode would update their statistics.)  Nothing here may flip a shared layer's
    ``training`` flag: see :func:`_eval_owned`.
    Returns the copy and the ids of every module, parameter and buffer of the caller's model.
    """
    memo: dict[int, object] = {}
    for m in model.modules():
        if isinstance(m, WEIGHTED):
            memo[id(m)] = m
    owned = {id(m) for m in model.modules()} | {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    return copy.deepcopy(model, memo), owned


def _eval_owned(model: nn.Module, owned: set[int]) -> nn.Module:
    """``model.eval()`` for every module that is not the caller's (shared layers keep their flag)."""
    for m in model.modules():
        if id(m) not in owned:
            m.training = False
    return model


def _unshare(model: nn.Module, owned: set[int]) -> nn.Module:
    """Replace every module, parameter and buffer still belonging to the caller's model by a copy.

    One deep-copy memo for all of them: an object referenced at several places (a layer used twice,
    a weight tied between two layers) stays one object in the result, as in the caller's model.
    """
    memo: dict[int, Any] = {}
    stack = [model]
    while stack:
        m = stack.pop()
        for name, child in list(m._modules.items()):
            if child is None:
                continue
            if id(child) in owned:
                m._modules[name] = copy.deepcopy(child, memo)
            else:
                stack.append(child)
        for name, p in list(m._parameters.items()):  # e.g. a folded layer's untouched extra params
            if p is not None and id(p) in owned:
                m._parameters[name] = copy.deepcopy(p, memo)
        for name, b in list(m._buffers.items()):
            if b is not None and id(b) in owned:
                m._buffers[name] = copy.deepcopy(b, memo)
    return model


def _needs_shapes(cap: Capture) -> bool:
    """Shapes matter only where a BN touches a Linear (is its output ``[N, C]``?); skipping the
    shape-propagation forward pass elsewhere keeps the pass cheap on big inputs."""
    for part in cap.parts:
        gm = part.graph
        for n in gm.graph.nodes:
            if n.op == "call_module" and is_norm_module(gm.get_submodule(n.target)):
                near = [a for a in n.args if isinstance(a, fx.Node)] + list(n.users)
                if any(m.op == "call_module" and isinstance(gm.get_submodule(m.target), nn.Linear) for m in near):
                    return True
    return False


def fold(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | None = None,
    *,
    skip: Iterable[str] = (),
) -> PassResult:
    """Fold every eval-mode BatchNorm of ``model`` away, exactly; ``model`` is not touched.

    Returns the rewritten (eval-mode, inference) model and one :class:`SiteAction` per site.
    ``skip`` names sites to leave alone (used to re-apply a saved conversion faithfully).
    """
    work, shared = _copy_sharing_weights(model)
    # weight standardization first: a BN after a WS conv then folds into a plain conv (folding into
    # the WS conv's raw weight would be a no-op: standardization removes the scale)
    work, baked = bake_ws(work, shared)
    _eval_owned(work, shared)
    cap = capture(work)
    if example_inputs is not None and _needs_shapes(cap):
        propagate_shapes(cap, example_inputs)
    sites = find_sites(cap)
    skip = set(skip)
    result = PassResult(model=work, pass_name="fold", actions=list(baked))
    maps: dict[str, dict[str, str | None]] = {p.qualname: {} for p in cap.parts}
    for site in sites:
        if site.name in skip:
            result.actions.append(SiteAction(site.name, site.kind, "refuse", reason="skipped on request"))
            continue
        plan = can_fold(site)  # computed against the graph as already rewritten: chains compose
        action = SiteAction(site.name, site.kind, plan.action, plan.target, plan.reason)
        action.exact = plan.action != "refuse"
        result.actions.append(action)
        if plan.action == "refuse":
            continue
        p = plan.params
        assert p is not None
        s, t = bn_scale_shift(p.running_mean, p.running_var, p.weight, p.bias, p.eps)
        if site.node is None:  # outside every traced part: swap the module itself
            set_module(work, site.name, _affine(site.module, s, t, _param_dtype(p)))
            continue
        gm, n = site.part.graph, site.node
        nmap = maps[site.part.qualname]
        if plan.action == "affine":
            set_module(gm, str(n.target), _affine(site.module, s, t, _param_dtype(p)))
        elif plan.action == "into-consumer":
            (u,) = n.users
            set_module(gm, str(u.target), _fold_into_consumer(gm.get_submodule(str(u.target)), s, t))
            u.args = (n.args[0],)
            gm.graph.erase_node(n)
        else:
            src = n.args[0]
            assert isinstance(src, fx.Node)
            layer = gm.get_submodule(str(src.target))
            folded = _fold_into_producer(layer, s, t)
            if plan.action == "into-producer":
                set_module(gm, str(src.target), folded)
                out = src
            else:  # a copy carries the BN path; the original keeps feeding everyone else
                new_target = unique_target(gm, f"{src.target}_bnfold")
                gm.add_submodule(new_target, folded)
                with gm.graph.inserting_after(src):
                    out = gm.graph.call_module(new_target, src.args, dict(src.kwargs))
                action.target = new_target
            post = _post(site.module)
            if post is not None:  # keep BatchNormAct's dropout + activation, at the BN's own path
                set_module(gm, str(n.target), post)
                with gm.graph.inserting_after(out):
                    post_node = gm.graph.call_module(str(n.target), (out,))
                nmap[out.name] = None  # pre-activation value: no counterpart in the original
                out = post_node
            n.replace_all_uses_with(out)
            gm.graph.erase_node(n)
            nmap[out.name] = n.name
    # unshare first, then eval: ``.eval()`` on a model still holding the caller's layers (those
    # not folded, e.g. a classifier Linear) would flip the caller's ``training`` flags
    result.model = _unshare(assemble(cap), shared).eval()
    # safety net: a BN the site search did not reach is reported, never silently left behind
    seen = {a.site for a in result.actions}
    for name, m in result.model.named_modules():
        if is_bn_site_module(m) and name not in seen:
            result.actions.append(SiteAction(name, type(m).__name__, "refuse", reason="not reached by the site search (please report)"))
    result.graphs = {p.qualname: p.graph for p in cap.parts}
    result.node_maps = maps
    return result
