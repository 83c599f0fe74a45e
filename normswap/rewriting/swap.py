"""The swap pass: replace each BatchNorm by a registered norm target, by module surgery.

Unlike the fold pass (an inference graph), a swapped model is meant to be *trained*, so the pass
edits the module tree of a copy — keeping every ``if self.training`` branch, attribute and hook
of the original — and uses the traced graph only to learn what feeds each BatchNorm.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable

import torch
from torch import fx, nn

from .capture import capture
from .layers import NormAct
from ..norms import registry
from ..parity import eval_mode
from .passes import PassResult, SiteAction, set_module
from .sites import (
    PLAIN_FORWARDS,
    NormSite,
    bn_kind_reason,
    bn_post_ops,
    find_sites,
    module_call_count,
    node_module,
)

__all__ = ["swap"]

# spatial rank when no example input tells it; BatchNorm1d/SyncBatchNorm accept several ranks
_RANK_BY_CLASS = {"BatchNorm2d": 2, "BatchNorm3d": 3, "FrozenBatchNorm2d": 2, "BatchNormAct2d": 2, "FrozenBatchNormAct2d": 2}


def _input_shapes(model: nn.Module, names: set[str], inputs: tuple[Any, ...] | None) -> dict[str, set[tuple[int, ...]]]:
    """The input shape(s), batch dim dropped, each named norm module sees in one eval forward
    (hooks, so untraced code counts too)."""
    ranks: dict[str, set[tuple[int, ...]]] = {n: set() for n in names}
    if inputs is None:
        return ranks
    mods = dict(model.named_modules())
    handles = [
        mods[n].register_forward_pre_hook(lambda m, a, n=n: ranks[n].add(tuple(a[0].shape[1:])) if a and isinstance(a[0], torch.Tensor) else None)
        for n in names if n in mods
    ]
    try:
        with eval_mode(model):  # restores every submodule's own train/eval flag
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return ranks


def _producer(site: NormSite) -> tuple[str | None, nn.Module | None, str | None]:
    """(qualified name, module, why not) of the Conv/Linear that feeds only this BN."""
    if site.node is None or site.part is None:
        return None, None, "not in a traced graph"
    gm, n = site.part.graph, site.node
    src = n.args[0] if n.args else None
    m = node_module(gm, src)
    if m is None or not isinstance(src, fx.Node):
        return None, None, "its input is not a layer's output"
    if type(m).forward not in PLAIN_FORWARDS:
        return None, None, f"its input comes from {type(m).__name__}"
    if len(src.users) > 1 or module_call_count(gm, str(src.target)) > 1:
        return None, None, f"{src.target}'s output also feeds other nodes; reparameterizing it would change what they see"
    qual = f"{site.part.qualname}.{src.target}" if site.part.qualname else str(src.target)
    return qual, m, None


def swap(
    model: nn.Module,
    to: str,
    example_inputs: tuple[Any, ...] | None = None,
    *,
    skip: Iterable[str] = (),
    groups: int | None = None,
) -> PassResult:
    """Replace every BatchNorm of a copy of ``model`` by target ``to``; ``model`` is not touched.

    The copy keeps the caller's train/eval mode; parameters (γ, β, running statistics where the
    target has a BN path) are carried over by the target's builder.
    """
    target = registry.get_target(to)
    work = copy.deepcopy(model)
    cap = capture(work)  # shapes come from _input_shapes (hooks also see untraced code)
    sites = find_sites(cap)
    shapes = _input_shapes(work, {s.name for s in sites}, example_inputs)
    skip = set(skip)
    result = PassResult(model=work, pass_name=to)
    done: set[str] = set()
    for site in sites:
        act = SiteAction(site.name, site.kind, "refuse", exact=None)
        result.actions.append(act)
        if site.name in done:
            act.action, act.reason = "swapped", "same module already swapped at an earlier call"
            act.exact = target.exact
            continue
        if site.name in skip:
            act.reason = "skipped on request"
            continue
        why = bn_kind_reason(site.module)
        if why is not None:
            act.reason = why
            continue
        seen = shapes.get(site.name, set())
        if len({len(sh) for sh in seen}) > 1:
            act.reason = f"called with inputs of different ranks {sorted(seen)}"
            continue
        sizes = {math.prod(sh[1:]) for sh in seen}
        dims = (len(next(iter(seen))) - 1) if seen else _RANK_BY_CLASS.get(site.kind)
        if dims is None:
            act.reason = f"{site.kind} accepts several input ranks: give example inputs (--input-shape)"
            continue
        prod_name, prod, why_no_prod = _producer(site)
        sw = registry.SwapSite(bn=site.module, num_features=int(registry.bn_num_features(site.module) or 0),
                               spatial_dims=dims, producer=prod, producer_reason=why_no_prod, groups=groups,
                               spatial_size=min(sizes) if sizes else None)
        why = target.can_swap(sw)
        if why is not None:
            act.reason = why
            continue
        try:
            build = target.build(sw)
        except ValueError as e:  # a builder's own refusal, same contract as can_swap
            act.reason = str(e)
            continue
        norm = build.norm
        drop, post_act = bn_post_ops(site.module)
        if drop is not None or post_act is not None:
            norm = NormAct(norm, drop, post_act)
            build.notes.append("kept the BatchNormAct activation/dropout")
        set_module(work, site.name, norm)
        if build.producer is not None:
            assert prod_name is not None
            set_module(work, prod_name, build.producer)
            act.target = prod_name
        act.action, act.exact, act.notes = "swapped", target.exact, list(build.notes)
        done.add(site.name)
    result.model = work
    return result
