"""The fold pass: eval-time BatchNorm folded into neighbouring layers, exactly.

The pure arithmetic (tensors in, tensors out) comes first; the graph surgery that calls it
(:func:`fold`) comes after.  Eval-mode BatchNorm is a per-channel affine map

    BN(x)_c = γ_c (x_c − μ_c) / √(σ²_c + ε) + β_c = s_c · x_c + t_c,
    s = γ / √(σ² + ε),   t = β − μ · s.

Every function here computes in float64 and casts the result back to the dtype of the weight it
replaces, so an fp16/bf16 model keeps its dtype while the fold itself loses no precision.

Where ``(s, t)`` goes is decided per site by :func:`normswap.rewriting.sites.can_fold`: into the layer that
produced the BN's input (also through reshapes that keep a Linear's feature axis last, as LeViT's
``flatten(0, 1)``), slice ``[o_i, o_i + C_i)`` into each layer whose outputs a ``cat`` joined (MixNet,
Inception), forward into the next layer, merged with the parallel convolution branches of a
RepVGG/MobileOne block (arithmetic in :mod:`normswap.rewriting.reparam`), else a per-channel scale-and-shift.
Weight-standardized convolutions are baked first (:mod:`normswap.rewriting.ws_bake`).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import Tensor, fx, nn

from .capture import Capture, capture, is_norm_module, propagate_shapes
from .layers import ChannelAffine, FittedAffine, PostNorm
from .passes import PassResult, SiteAction, assemble, paused_gc, set_module, unique_target
from .reparam import merge_parallel_convs
from .sites import (
    CONVT,
    WEIGHTED,
    FoldPlan,
    NormSite,
    bn_post_ops,
    can_fold,
    find_sites,
    is_fold_site,
    module_call_count,
    needs_shapes,
    submodule,
    value_users,
)

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
    "WSPadSame",
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



from .ws_bake import WSPadSame, bake_ws, bake_ws_weight, ws_kind  # noqa: E402  (re-exported: part of the fold pass)

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
    if _plain_layer(layer):
        return _fresh_layer(layer, nn.Parameter(weight, requires_grad=req), nn.Parameter(bias, requires_grad=req))
    memo: dict[int, Any] = {id(layer.weight): nn.Parameter(weight, requires_grad=req)}
    if layer.bias is not None:
        memo[id(layer.bias)] = nn.Parameter(bias, requires_grad=req)
    new = copy.deepcopy(layer, memo)
    if layer.bias is None:
        new.bias = nn.Parameter(bias, requires_grad=req)
    return new


#: layers whose whole state is their weight, bias and plain attributes (ints, tuples, strings)
_PLAIN_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def _plain_layer(layer: nn.Module) -> bool:
    """Exactly a torch Conv/ConvTranspose/Linear, with no hooks, submodules or buffers and no
    parameter but weight and bias: a copy needs no deepcopy."""
    d = layer.__dict__
    return (type(layer) in _PLAIN_LAYERS and not layer._modules and not layer._buffers
            and set(layer._parameters) <= {"weight", "bias"}
            and not any(v for k, v in d.items() if "hook" in k and isinstance(v, dict)))


def _fresh_layer(layer: nn.Module, weight: nn.Parameter, bias: nn.Parameter) -> nn.Module:
    """A new module of ``layer``'s type with its plain attributes, fresh containers (hook tables and
    the like: nothing shared with ``layer``) and the given weight and bias — what a deepcopy with
    those two in its memo gives, without walking the object graph."""
    new = object.__new__(type(layer))
    new.__dict__.update({k: (copy.copy(v) if isinstance(v, (dict, list, set)) else v) for k, v in layer.__dict__.items()})
    new._parameters["weight"], new._parameters["bias"] = weight, bias
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


def _affine(bn: nn.Module, s: Tensor, t: Tensor, dtype: torch.dtype) -> nn.Module:
    """The scale-and-shift left where nothing can absorb the site (a last-axis one stays last-axis)."""
    if isinstance(bn, FittedAffine):
        out = FittedAffine(s.to(dtype), t.to(dtype), bn.axis, bn.source, *bn_post_ops(bn))
        return out.requires_grad_(False)
    return ChannelAffine(s.to(dtype), t.to(dtype), *bn_post_ops(bn))


def _copy_sharing_weights(model: nn.Module) -> tuple[nn.Module, set[int]]:
    """Deep-copy ``model`` except its Conv/ConvTranspose/Linear layers and its eval-mode BatchNorms, which stay shared objects.

    The fold never mutates them — it builds new modules with new weight tensors — and they hold no
    state a forward pass changes, so copying them first (as ``copy.deepcopy`` + torch.fx's ``fuse``
    do) is wasted work; :func:`_unshare` copies whatever of the caller's model is still referenced
    at the end, so the result never aliases it.  (A BatchNorm in training mode is copied: a forward
    pass would update its statistics; :func:`_shareable_bn`.)  Nothing here may flip a shared layer's
    ``training`` flag: see :func:`_eval_owned`. Containers are always copied, even for a model that
    torch.fx traces whole: tracing runs their ``forward``, and one with side effects (a call counter,
    a cache) or a ``self.training`` branch would otherwise act on, or be traced as, the caller's object.
    Returns the copy and the ids of every module, parameter and buffer of the caller's model.
    """
    memo: dict[int, object] = {}
    for m in model.modules():
        if isinstance(m, WEIGHTED) or _shareable_bn(m):
            memo[id(m)] = m
    owned = {id(m) for m in model.modules()} | {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    return copy.deepcopy(model, memo), owned


def _shareable_bn(m: nn.Module) -> bool:
    """A plain BatchNorm already in eval mode, with no submodules: the fold only reads it (its folded
    arithmetic makes new tensors), and a forward in eval mode (shape propagation) does not change its
    statistics — so it need not be copied first either; one the fold leaves in place is copied by
    :func:`_unshare` like every other module of the caller's still referenced at the end."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and not m._modules


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
    """Shapes matter only where a BN touches a Linear (is its output ``[N, C]``?) or follows a
    reshape or a concatenation (:func:`normswap.rewriting.sites.needs_shapes`); skipping the shape-propagation
    forward pass elsewhere keeps the pass cheap on big inputs."""
    for part in cap.parts:
        gm = part.graph
        for n in gm.graph.nodes:
            if n.op == "call_module" and is_norm_module(submodule(gm, n.target)) and needs_shapes(gm, n):
                return True
    return False


def _copy_call(gm: fx.GraphModule, node: fx.Node, module: nn.Module, base: str) -> fx.Node:
    """A new call of ``module`` (registered under a fresh name from ``base``) with ``node``'s
    arguments, right after ``node``."""
    target = unique_target(gm, base)
    gm.add_submodule(target, module)
    with gm.graph.inserting_after(node):
        return gm.graph.call_module(target, node.args, dict(node.kwargs))


def _finish(gm: fx.GraphModule, site: NormSite, out: fx.Node, nmap: dict[str, str | None]) -> None:
    """Route the BN node's users to ``out`` (through the BN's kept dropout + activation, if any)
    and erase the BN node."""
    n = site.node
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


def _into_producer(gm: fx.GraphModule, site: NormSite, plan: FoldPlan, action: SiteAction,
                   s: Tensor, t: Tensor, nmap: dict[str, str | None]) -> None:
    """Fold into the layer before the BN (reached through ``plan.path``'s reshapes), or into a copy
    of it when its output also feeds other nodes: the copy and copies of the reshapes then carry
    the BN's path."""
    path = list(plan.path)
    src = path[0].args[0] if path else site.node.args[0]
    folded = _fold_into_producer(gm.get_submodule(str(src.target)), s, t)
    if plan.action == "into-producer":
        set_module(gm, str(src.target), folded)
        chain = [src, *path]
    else:  # a copy carries the BN path; the original keeps feeding everyone else
        new = _copy_call(gm, src, folded, f"{src.target}_bnfold")
        action.target = str(new.target)
        copies = {src: new}
        for v in path:
            with gm.graph.inserting_after(v):
                copies[v] = gm.graph.node_copy(v, lambda a: copies.get(a, a))
        chain = list(copies.values())
    for v in chain[:-1]:  # values changed (or new nodes): no counterpart in the original
        nmap[v.name] = None
    _finish(gm, site, chain[-1], nmap)


def _into_producers(gm: fx.GraphModule, site: NormSite, plan: FoldPlan, s: Tensor, t: Tensor,
                    nmap: dict[str, str | None]) -> list[str]:
    """Fold channel slice ``[off, off + c_i)`` into the i-th layer concatenated before the BN; a
    layer whose output is also used elsewhere (or the whole concatenation, if it is) is copied.
    Returns notes for the report."""
    n = site.node
    cat = n.args[0]
    cat_shared = len(value_users(cat)) > 1
    new_inputs: list[fx.Node] = []
    copied: list[str] = []
    off = 0
    for v in plan.sources:
        layer = gm.get_submodule(str(v.target))
        c = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        folded = _fold_into_producer(layer, s[off:off + c], t[off:off + c])
        off += c
        if cat_shared or len(v.users) > 1 or module_call_count(gm, str(v.target)) > 1:
            new_inputs.append(_copy_call(gm, v, folded, f"{v.target}_bnfold"))
            copied.append(str(v.target))
        else:
            set_module(gm, str(v.target), folded)
            new_inputs.append(v)
        nmap[new_inputs[-1].name] = None
    if cat_shared:
        with gm.graph.inserting_after(cat):
            out = gm.graph.node_copy(cat, lambda a: a)
        out.args = (new_inputs, *out.args[1:]) if out.args else ()
        if not out.args:
            out.kwargs = {**out.kwargs, "tensors": new_inputs}
    else:
        out = cat
        if cat.args:
            cat.args = (new_inputs, *cat.args[1:])
        else:
            cat.kwargs = {**cat.kwargs, "tensors": new_inputs}
    _finish(gm, site, out, nmap)
    return [f"copied (their outputs are also used elsewhere): {', '.join(copied)}"] if copied else []


def _into_consumer(gm: fx.GraphModule, site: NormSite, plan: FoldPlan, s: Tensor, t: Tensor,
                   nmap: dict[str, str | None]) -> None:
    """Fold forward into the layer after the BN (past ``plan.path``'s eval-identity Dropouts)."""
    n = site.node
    target = str(plan.target)
    set_module(gm, target, _fold_into_consumer(gm.get_submodule(target), s, t))
    for v in plan.path:  # now carries the un-normalized value
        nmap[v.name] = None
    n.replace_all_uses_with(n.args[0])
    gm.graph.erase_node(n)


def _merge(gm: fx.GraphModule, site: NormSite, plan: FoldPlan, s: Tensor, t: Tensor,
           nmap: dict[str, str | None]) -> str:
    """Replace the sum ``conv₀(x) + Σ convᵢ(x) + BN(x)`` by one convolution
    (:func:`normswap.rewriting.reparam.merge_parallel_convs`). Returns the merged layer's target."""
    mp = plan.merge
    assert mp is not None
    main = gm.get_submodule(str(mp.main.target))
    others = [gm.get_submodule(str(v.target)) for v in mp.others]
    w, b = merge_parallel_convs((main.weight, main.bias), [(m.weight, m.bias) for m in others], (s, t))
    merged = _with_weights(main, w, b)
    if module_call_count(gm, str(mp.main.target)) > 1:
        target = unique_target(gm, f"{mp.main.target}_merged")
        gm.add_submodule(target, merged)
        mp.main.target = target
    else:
        set_module(gm, str(mp.main.target), merged)
    mp.top.replace_all_uses_with(mp.main)
    for v in [*mp.inner, site.node, *mp.others]:  # each one's users are erased before it
        gm.graph.erase_node(v)
    nmap[mp.main.name] = mp.top.name
    return str(mp.main.target)


def _apply(work: nn.Module, site: NormSite, plan: FoldPlan, nmap: dict[str, str | None]) -> SiteAction:
    """Carry out ``plan`` at ``site``; the action for the report."""
    action = SiteAction(site.name, site.kind, plan.action, plan.target, plan.reason, notes=list(plan.notes))
    action.exact = plan.action != "refuse"
    if plan.action == "refuse":
        return action
    aff = plan.affine  # (scale, shift): the arithmetic below never asks which norm they came from
    assert aff is not None
    s, t = aff.scale, aff.shift
    if site.node is None:  # outside every traced part: swap the module itself
        set_module(work, site.name, _affine(site.module, s, t, aff.dtype))
        return action
    gm, n = site.part.graph, site.node
    if plan.action == "affine":
        set_module(gm, str(n.target), _affine(site.module, s, t, aff.dtype))
    elif plan.action == "into-consumer":
        _into_consumer(gm, site, plan, s, t, nmap)
    elif plan.action == "into-producers":
        action.notes += _into_producers(gm, site, plan, s, t, nmap)
    elif plan.action == "merged":
        action.target = _merge(gm, site, plan, s, t, nmap)
    else:
        _into_producer(gm, site, plan, action, s, t, nmap)
    return action


def fold(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | None = None,
    *,
    skip: Iterable[str] = (),
) -> PassResult:
    """Fold every eval-mode BatchNorm of ``model`` away, exactly; ``model`` is not touched.

    Returns the rewritten (eval-mode, inference) model and one :class:`SiteAction` per site.
    ``skip`` names sites to leave alone (used to re-apply a saved conversion faithfully).

    Two rounds: every site in graph order, except that a traced site whose plan is a scale-and-shift
    waits for the second round, when it is planned again against the graph with every other fold
    applied — a RepVGG identity branch merges only once its convolution branches' BNs are folded.
    """
    with paused_gc():
        return _fold(model, example_inputs, skip)


def _fold(model: nn.Module, example_inputs: tuple[Any, ...] | None, skip: Iterable[str]) -> PassResult:
    work, shared = _copy_sharing_weights(model)
    # weight standardization first: a BN after a WS conv then folds into a plain conv (folding into
    # the WS conv's raw weight would be a no-op: standardization removes the scale)
    work, baked = bake_ws(work, shared)
    _eval_owned(work, shared)
    cap = capture(work)
    if example_inputs is not None and _needs_shapes(cap):
        propagate_shapes(cap, example_inputs)
    sites = find_sites(cap, every_norm=True)
    skip = set(skip)
    result = PassResult(model=work, pass_name="fold", actions=list(baked))
    maps: dict[str, dict[str, str | None]] = {p.qualname: {} for p in cap.parts}
    actions: list[SiteAction | None] = []
    later: list[tuple[int, NormSite]] = []
    for site in sites:
        if site.name in skip:
            actions.append(SiteAction(site.name, site.kind, "refuse", reason="skipped on request"))
            continue
        plan = can_fold(site)  # computed against the graph as already rewritten: chains compose
        if plan.action == "affine" and site.node is not None:
            later.append((len(actions), site))
            actions.append(None)
            continue
        actions.append(_apply(work, site, plan, maps[site.part.qualname] if site.part else {}))
    for i, site in later:
        actions[i] = _apply(work, site, can_fold(site), maps[site.part.qualname])
    result.actions += [a for a in actions if a is not None]
    # unshare first, then eval: ``.eval()`` on a model still holding the caller's layers (those
    # not folded, e.g. a classifier Linear) would flip the caller's ``training`` flags
    result.model = _unshare(assemble(cap), shared).eval()
    # safety net: a BN the site search did not reach is reported, never silently left behind
    seen = {a.site for a in result.actions}
    for name, m in result.model.named_modules():
        if name in seen or isinstance(m, (ChannelAffine, FittedAffine)) or not is_fold_site(m):
            continue
        parts = name.split(".")
        inside = any(".".join(parts[:i]) in seen for i in range(1, len(parts)))  # e.g. the GroupNorm of a NormAct site
        if not inside:
            result.actions.append(SiteAction(name, type(m).__name__, "refuse", reason="not reached by the site search (please report)"))
    result.graphs = {p.qualname: p.graph for p in cap.parts}
    result.node_maps = maps
    return result
