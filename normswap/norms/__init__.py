"""The norm family: one module per normalization, each registering its swap target(s).

Importing this package imports every family module, so :data:`TARGETS` is complete.
"""

from __future__ import annotations

from . import batch_instance, frozen, group, instance, layer, switchable, sync, weight_norm, ws  # noqa: F401
from .batch_instance import BatchInstanceNorm
from .frozen import FrozenBatchNorm
from .group import choose_groups, group_norm_from_bn
from .instance import instance_norm
from .layer import ChannelsLayerNorm, layer_norm_from_bn
from .registry import (
    SITE_KINDS,
    TARGETS,
    BNState,
    NormTarget,
    SwapBuild,
    SwapSite,
    bn_state,
    get_target,
    register,
    site_kind,
)
from .switchable import SwitchableNorm
from .sync import from_sync_bn, to_sync_bn
from .weight_norm import MeanOnlyBatchNorm, WNConv, from_conv_bn
from .ws import WSConv1d, WSConv2d, WSConv3d, ws_conv_from

__all__ = [
    "SITE_KINDS",
    "TARGETS",
    "BNState",
    "BatchInstanceNorm",
    "ChannelsLayerNorm",
    "FrozenBatchNorm",
    "MeanOnlyBatchNorm",
    "NormTarget",
    "SwapBuild",
    "SwapSite",
    "SwitchableNorm",
    "WNConv",
    "WSConv1d",
    "WSConv2d",
    "WSConv3d",
    "bn_state",
    "choose_groups",
    "from_conv_bn",
    "from_sync_bn",
    "get_target",
    "group_norm_from_bn",
    "instance_norm",
    "layer_norm_from_bn",
    "register",
    "site_kind",
    "to_sync_bn",
    "ws_conv_from",
]
