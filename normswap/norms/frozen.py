"""FrozenBatchNorm: a BatchNorm reduced to its eval-mode function, in training mode too.

    y = x · scale + shift,   scale = γ / √(σ²_run + ε),   shift = β − μ_run · scale

Buffers only (γ, β, μ_run, σ²_run, with torchvision's FrozenBatchNorm2d names), no parameters and no
batch statistics: the output of a sample never depends on the batch, and DP-SGD (Opacus) has nothing
to clip here. Works on [N, C] and [N, C, *S] with S of rank 1/2/3. ``from_bn`` is exact: it is the
BN's eval function (up to float rounding of the rearranged arithmetic).
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import NormTarget, SwapBuild, SwapSite, bn_state, copy_affine_, copy_running_stats_, like_bn, register


class FrozenBatchNorm(nn.Module):
    """y = x · γ/√(σ²_run + ε) + (β − μ_run · γ/√(σ²_run + ε)), per channel (dim 1).

    ``spatial_dims`` (0 for [N, C], else 1/2/3) fixes the broadcast shape so the module traces with
    torch.fx; left None it is read from the input at run time (eager only)."""

    def __init__(self, num_features: int, eps: float = 1e-5, spatial_dims: int | None = None) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = float(eps)
        self.spatial_dims = spatial_dims
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) as 1-d per-channel tensors."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.spatial_dims if self.spatial_dims is not None else x.dim() - 2
        scale, shift = self.scale_shift()
        shape = (-1,) + (1,) * k
        return x * scale.reshape(shape) + shift.reshape(shape)

    @classmethod
    def from_bn(cls, bn: nn.Module, spatial_dims: int | None = None) -> FrozenBatchNorm:
        """Freeze any BN kind with running statistics (BatchNorm1d/2d/3d, SyncBatchNorm, timm/torchvision
        frozen BNs). ``spatial_dims`` defaults to the rank the BN class implies (None for BatchNorm1d and
        SyncBatchNorm, whose rank the caller knows)."""
        s = bn_state(bn)
        if s.running_mean is None:
            raise ValueError(frozen_refusal_no_stats(bn))
        if spatial_dims is None:
            spatial_dims = {nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(_bn_base(bn))
            if spatial_dims is None and type(bn).__name__.startswith("FrozenBatchNorm"):
                spatial_dims = 2  # torchvision/timm frozen BNs are 2d-only
        new = cls(s.num_features, s.eps, spatial_dims)
        copy_affine_(new, s)
        copy_running_stats_(new, s)
        return like_bn(new, bn)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, spatial_dims={self.spatial_dims}"


def _bn_base(bn: nn.Module) -> type | None:
    for base in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        if isinstance(bn, base):
            return base
    return None


def frozen_refusal_no_stats(bn: nn.Module) -> str:
    return f"{type(bn).__name__} has no running statistics (track_running_stats=False): nothing to freeze"


def _check(site: SwapSite) -> str | None:
    # (frozen sites are excluded by site_kinds: they already are what this target builds)
    if bn_state(site.bn).running_mean is None:
        return frozen_refusal_no_stats(site.bn)
    return None


def _build(site: SwapSite) -> SwapBuild:
    return SwapBuild(norm=FrozenBatchNorm.from_bn(site.bn, spatial_dims=site.spatial_dims))


FROZEN = register(NormTarget(
    name="frozen",
    summary="FrozenBatchNorm: the BN's eval function as a fixed per-channel affine (buffers only)",
    exact=True,
    batch_independent=True,
    build=_build,
    site_kinds=frozenset({"bn", "sync"}),
    check=_check,
))
