"""Layer Norm (Ba, Kiros & Hinton 2016, arXiv 1607.06450) in its two conv-net readings.

Paper LN, ``ln``: statistics over every hidden unit of a sample, i.e. (C, *S) for conv
features and C for [N, C] features, with a per-channel gain and bias:

    y[n,c] = γ_c · (x[n,c] − μ[n]) / √(σ²[n] + ε) + β_c,   μ, σ² (biased) over (C, *S)

which is exactly ``nn.GroupNorm(1, C)`` (any input rank, [N, C] included). Its default ONNX lowering
(Reshape → InstanceNormalization → Reshape → Mul/Add) was the fastest form measured in onnxruntime, ahead
of LayerNormalization(axis=1) + Mul/Add, so nothing special is needed for export.

Channels LN, ``ln-channels`` (ConvNeXt style) — a different layer: statistics over C only, at each
position, per-channel γ, β:

    y[n,:,p] = γ · (x[n,:,p] − μ[n,p]) / √(σ²[n,p] + ε) + β,   μ, σ² over C

:class:`ChannelsLayerNorm` computes it by moving C last and calling ``F.layer_norm`` (one fused kernel in
torch), which exports as Transpose → LayerNormalization → Transpose. That is also the fastest ONNX form
measured (onnxruntime 1.31 CPU, batch 1): explicit ReduceMean/Sub/Sqrt/Div arithmetic over C ran 1.05–2.2×
slower per layer (C=64…768), so no ``export_form`` is needed. On [N, C] features both readings coincide
and export as a bare LayerNormalization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .group import group_norm_from_bn
from .registry import NormTarget, SwapBuild, SwapSite, bn_state, copy_affine_, like_bn, register


def layer_norm_from_bn(bn: nn.Module) -> nn.GroupNorm:
    """Paper LN as ``nn.GroupNorm(1, C, eps=bn.eps)`` with γ, β copied from ``bn``."""
    return group_norm_from_bn(bn, 1)


class ChannelsLayerNorm(nn.Module):
    """LayerNorm over the channel dim (1) at every position of [N, C, *S] (or over C of [N, C]).

    ``spatial_dims`` (0 for [N, C], else 1/2/3) makes the permutation static so torch.fx can trace the
    module; None reads it from the input at run time (eager only)."""

    def __init__(self, num_features: int, eps: float = 1e-6, spatial_dims: int | None = None) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = float(eps)
        self.spatial_dims = spatial_dims
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.spatial_dims if self.spatial_dims is not None else x.dim() - 2
        c = (self.num_features,)
        if k == 0:
            return F.layer_norm(x, c, self.weight, self.bias, self.eps)
        # explicit non-negative permutations: movedim(-1, 1) exports an invalid Transpose perm (0, -1, 1, 2)
        to_last = (0, *range(2, k + 2), 1)
        to_first = (0, k + 1, *range(1, k + 1))
        return F.layer_norm(x.permute(to_last), c, self.weight, self.bias, self.eps).permute(to_first)

    @classmethod
    def from_bn(cls, bn: nn.Module, spatial_dims: int | None = None) -> ChannelsLayerNorm:
        """γ, β and ε from ``bn``."""
        s = bn_state(bn)
        new = cls(s.num_features, s.eps, spatial_dims)
        copy_affine_(new, s)
        return like_bn(new, bn)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, spatial_dims={self.spatial_dims}"


def _check(site: SwapSite) -> str | None:
    if site.num_features < 2 and site.spatial_dims == 0:
        return "layer norm on [N, 1] features: a single value per sample, every output would be β"
    return None


def _check_channels(site: SwapSite) -> str | None:
    if site.num_features < 2:
        return "channels layer norm over C=1: a single value per position, every output would be β"
    return None


def _build_ln(site: SwapSite) -> SwapBuild:
    return SwapBuild(norm=layer_norm_from_bn(site.bn), notes=["layer norm as in the paper: GroupNorm(1, C)"])


def _build_ln_channels(site: SwapSite) -> SwapBuild:
    return SwapBuild(norm=ChannelsLayerNorm.from_bn(site.bn, spatial_dims=site.spatial_dims))


LN = register(NormTarget(
    name="ln",
    summary="Layer Norm as in the paper: statistics over (C, *S) per sample = GroupNorm(1, C)",
    exact=False,
    batch_independent=True,
    build=_build_ln,
    check=_check,
))

LN_CHANNELS = register(NormTarget(
    name="ln-channels",
    summary="channels-only Layer Norm (ConvNeXt style): statistics over C at each position",
    exact=False,
    batch_independent=True,
    build=_build_ln_channels,
    check=_check_channels,
))
