"""Norm sites beyond BatchNorm: which modules normalize with per-sample statistics, along which axis
their per-channel affine acts, and what those per-sample statistics are.

An eval BatchNorm is a fixed per-channel affine ``s·x + t`` (closed form). Every norm listed here is
not: its statistics are computed per sample (GroupNorm over ``(C/G, *S)``, LayerNorm over the last
axis, channels-LayerNorm over ``C`` at each position, InstanceNorm over ``*S``, Switchable /
Batch-Instance Norm partly over ``*S``). To fold one, ``--to fold --calib`` *fits* a per-channel
affine to its output (:mod:`normswap.keep.norm_fit`); this module only says what a site is.

One registry (:data:`NORM_FAMILIES`), no if-chains: each family names its match, its channel axis
(1, or -1 for a LayerNorm over the last axis of ``[N, *, C]``) and ``stats(module, x) -> (μ, σ)``,
each ``[N, U]``: the per-sample statistics the norm divides by, over its ``U`` statistic units
(groups, channels, positions). Their spread across samples is what decides whether a fixed affine can
stand in for the norm (:mod:`normswap.keep.norm_fit` reports it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["NormFamily", "NORM_FAMILIES", "norm_family", "is_affine_norm", "inner_norm", "norm_post_ops",
           "num_channels", "channel_axis"]


def _moments(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Per-unit mean and biased std over ``dims`` (float32 at least)."""
    x = x.detach().float() if x.dtype in (torch.float16, torch.bfloat16) else x.detach()
    var, mu = torch.var_mean(x, dim=dims, unbiased=False)
    return mu, var.clamp_min(0).sqrt()


def _group_stats(m: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """GroupNorm: μ, σ over ``(C/G, *S)`` per sample and group → ``[N, G]``."""
    return _moments(x.reshape(x.shape[0], m.num_groups, -1), (2,))


def _last_stats(m: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """LayerNorm on ``[N, *, C]``: μ, σ over C per token → ``[N, tokens]``."""
    mu, sd = _moments(x, (x.dim() - 1,))
    return mu.reshape(x.shape[0], -1), sd.reshape(x.shape[0], -1)


def _channel_stats(m: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Channels-LayerNorm on ``[N, C, *S]``: μ, σ over C per position → ``[N, positions]``."""
    mu, sd = _moments(x, (1,))
    return mu.reshape(x.shape[0], -1), sd.reshape(x.shape[0], -1)


def _instance_stats(m: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """InstanceNorm (and the IN branch of SN / BIN): μ, σ over ``*S`` per sample and channel →
    ``[N, C]``; on ``[N, C]`` features (no space) the LayerNorm statistics over C."""
    if x.dim() == 2:
        mu, sd = _moments(x, (1,))
        return mu[:, None], sd[:, None]
    return _moments(x.reshape(x.shape[0], x.shape[1], -1), (2,))


def _named(m: nn.Module, name: str, *prefixes: str) -> bool:
    return type(m).__name__ == name and type(m).__module__.startswith(prefixes)


def _is_group(m: nn.Module) -> bool:
    # nn.GroupNorm and subclasses that keep its forward (timm's GroupNorm, GroupNorm1), and timm's
    # GroupNormAct (group_norm, then drop, then act: norm_post_ops keeps those)
    return isinstance(m, nn.GroupNorm) and (type(m).forward is nn.GroupNorm.forward or _named(m, "GroupNormAct", "timm."))


def _is_last_ln(m: nn.Module) -> bool:
    return type(m).forward is nn.LayerNorm.forward and isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1


def _is_channels_ln(m: nn.Module) -> bool:
    # timm's and torchvision ConvNeXt's LayerNorm2d (permute → layer_norm over C → permute back), and
    # normswap's own ChannelsLayerNorm (--to ln-channels)
    return (isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1 and
            (_named(m, "LayerNorm2d", "timm.", "torchvision.")) or _named(m, "ChannelsLayerNorm", "normswap.norms."))


def _is_instance(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class NormFamily:
    """One family of per-sample norms: how to recognise a module, its channel axis, its statistics."""

    name: str
    summary: str
    matches: Callable[[nn.Module], bool]
    stats: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]]
    axis: int = 1  # the axis its per-channel affine acts on: 1 ([N, C, *S]) or -1 (last, [N, *, C])


NORM_FAMILIES: tuple[NormFamily, ...] = (
    NormFamily("group", "GroupNorm: statistics over (C/G, *S) per sample", _is_group, _group_stats),
    NormFamily("layer", "LayerNorm over the last axis of [N, *, C] (per token)", _is_last_ln, _last_stats, axis=-1),
    NormFamily("layer-channels", "channels LayerNorm (LayerNorm2d): statistics over C at each position",
               _is_channels_ln, _channel_stats),
    NormFamily("instance", "InstanceNorm: statistics over *S per sample and channel", _is_instance, _instance_stats),
    NormFamily("switchable", "Switchable Norm: a mix of IN, LN and BN statistics (IN's shown)",
               lambda m: _named(m, "SwitchableNorm", "normswap.norms."), _instance_stats),
    NormFamily("batch-instance", "Batch-Instance Norm: BN and IN statistics mixed by ρ (IN's shown)",
               lambda m: _named(m, "BatchInstanceNorm", "normswap.norms."), _instance_stats),
)


def inner_norm(m: nn.Module) -> nn.Module:
    """The norm inside normswap's ``NormAct`` wrapper (a swapped timm BatchNormAct2d), else ``m``."""
    return m.norm if type(m).__name__ == "NormAct" and type(m).__module__ == "normswap.rewriting.layers" else m


#: the built-in families' matchers accept only instances of these types or of these class names — a
#: pre-check that lets the fold's site search skip every other module at the cost of one isinstance
_BUILTIN_FAMILIES = NORM_FAMILIES
_FAMILY_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_FAMILY_NAMES = frozenset({"SwitchableNorm", "BatchInstanceNorm", "ChannelsLayerNorm"})


def norm_family(m: nn.Module) -> NormFamily | None:
    """The family of a per-sample norm module (``NormAct``-wrapped ones included), None otherwise."""
    inner = inner_norm(m)
    if (NORM_FAMILIES is _BUILTIN_FAMILIES and not isinstance(inner, _FAMILY_TYPES)
            and type(inner).__name__ not in _FAMILY_NAMES):
        return None  # (with families added to NORM_FAMILIES, every matcher is asked)
    return next((f for f in NORM_FAMILIES if f.matches(inner)), None)


def is_affine_norm(m: nn.Module) -> bool:
    """A non-BatchNorm norm site: folded only through a fitted affine."""
    return norm_family(m) is not None


def norm_post_ops(m: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """``(drop, act)`` the site applies after normalizing (``NormAct``, timm's ``GroupNormAct``); None
    for each one that is absent or an identity."""
    if not (inner_norm(m) is not m or _named(m, "GroupNormAct", "timm.")):
        return None, None
    drop, act = getattr(m, "drop", None), getattr(m, "act", None)
    keep = [None if x is None or type(x) is nn.Identity else x for x in (drop, act)]
    return keep[0], keep[1]


def num_channels(m: nn.Module) -> int | None:
    """The number of channels of the site's per-channel affine."""
    inner = inner_norm(m)
    for attr in ("num_channels", "num_features"):
        v = getattr(inner, attr, None)
        if isinstance(v, int):
            return v
    shape = getattr(inner, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    w = getattr(inner, "weight", None)
    return int(w.numel()) if isinstance(w, Tensor) else None


def channel_axis(m: nn.Module) -> int:
    f = norm_family(m)
    return 1 if f is None else f.axis
