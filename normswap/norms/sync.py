"""BatchNorm <-> SyncBatchNorm, one module at a time, copying parameters and buffers exactly.

``nn.SyncBatchNorm.convert_sync_batchnorm`` converts a whole tree; the swap pass needs per-module
converters (so that every site is reported), and the way back needs the spatial rank, which a
SyncBatchNorm does not record (it accepts any rank) and the caller knows from shape propagation.

Both directions compute the same function in eval mode (identical parameters and running statistics).
In training, SyncBatchNorm pools batch statistics across the process group (it needs CUDA for that);
without an initialized multi-process group it computes exactly what BatchNorm does.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import NormTarget, SwapBuild, bn_state, like_bn, register

_BN_FOR_RANK = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _copy_bn_(dst: nn.Module, src: nn.Module) -> None:
    """Copy parameters (incl. requires_grad) and buffers of one BN into another of the same config."""
    with torch.no_grad():
        if src.affine:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
            dst.weight.requires_grad_(src.weight.requires_grad)
            dst.bias.requires_grad_(src.bias.requires_grad)
        if src.running_mean is not None and dst.running_mean is not None:
            dst.running_mean.copy_(src.running_mean)
            dst.running_var.copy_(src.running_var)
        if getattr(src, "num_batches_tracked", None) is not None and dst.num_batches_tracked is not None:
            dst.num_batches_tracked.copy_(src.num_batches_tracked)


def to_sync_bn(bn: nn.Module, process_group: object | None = None) -> nn.SyncBatchNorm:
    """nn.BatchNorm1d/2d/3d (or a subclass, e.g. timm's BatchNormAct2d, whose act is not carried) ->
    nn.SyncBatchNorm with the same hyper-parameters, parameters and buffers."""
    if isinstance(bn, nn.SyncBatchNorm) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise ValueError(f"to_sync_bn needs an nn.BatchNorm1d/2d/3d, got {type(bn).__name__}")
    s = bn_state(bn)
    new = nn.SyncBatchNorm(
        bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats, process_group=process_group,
        device=s.device, dtype=s.dtype,
    )
    _copy_bn_(new, bn)
    return like_bn(new, bn)


def from_sync_bn(sbn: nn.Module, spatial_dims: int) -> nn.Module:
    """nn.SyncBatchNorm -> nn.BatchNorm1d (spatial_dims 0 or 1), BatchNorm2d (2) or BatchNorm3d (3)."""
    if not isinstance(sbn, nn.SyncBatchNorm):
        raise ValueError(f"from_sync_bn needs an nn.SyncBatchNorm, got {type(sbn).__name__}")
    if spatial_dims not in _BN_FOR_RANK:
        raise ValueError(f"spatial_dims must be 0, 1, 2 or 3, got {spatial_dims}")
    s = bn_state(sbn)
    new = _BN_FOR_RANK[spatial_dims](
        sbn.num_features, eps=sbn.eps, momentum=sbn.momentum, affine=sbn.affine,
        track_running_stats=sbn.track_running_stats, device=s.device, dtype=s.dtype,
    )
    _copy_bn_(new, sbn)
    return like_bn(new, sbn)


SYNC = register(NormTarget(
    name="sync",
    summary="BatchNorm -> SyncBatchNorm (batch statistics pooled across processes in training)",
    exact=True,
    batch_independent=False,
    build=lambda site: SwapBuild(norm=to_sync_bn(site.bn)),
    # a frozen BN has no batch statistics to synchronize; a SyncBatchNorm already is one
    site_kinds=frozenset({"bn"}),
))

UNSYNC = register(NormTarget(
    name="unsync",
    summary="SyncBatchNorm -> BatchNorm1d/2d/3d of the site's spatial rank",
    exact=True,
    batch_independent=False,
    build=lambda site: SwapBuild(norm=from_sync_bn(site.bn, site.spatial_dims)),
    site_kinds=frozenset({"sync"}),
))
