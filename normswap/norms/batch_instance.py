"""Batch-Instance Normalization (Nam & Kim 2018, arXiv 1805.07925).

    y = (ρ · x̂_BN + (1 − ρ) · x̂_IN) · γ + β,   ρ ∈ [0, 1] per channel

x̂_BN is exactly BatchNorm's normalization (batch statistics in training, updating the running
statistics like nn.BatchNorm; running statistics in eval); x̂_IN normalizes each sample and channel over
its spatial dims. Computed as the paper's official code does, which is also how it exports (ONNX
BatchNormalization + InstanceNormalization + Add, all native onnxruntime kernels):

    y = BN(x; weight = γρ, bias = β) + IN(x; weight = γ(1 − ρ), bias = 0)

The paper clips ρ to [0, 1] after every update. Here ρ is clipped in place at the start of every
training-mode forward (after the previous update, before ρ is used; this survives torch.fx tracing and
deepcopy, unlike an optimizer hook), and clamped in eval, so the function always uses a ρ in range;
:meth:`clip_rho_` clips explicitly (e.g. before saving a checkpoint).

``from_bn`` sets ρ = 1, which is exactly the BN (its eval function, and its training function too).
Undefined on [N, C] features (no spatial dims for the IN branch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .registry import (
    NormTarget,
    SwapBuild,
    SwapSite,
    bn_state,
    copy_affine_,
    copy_running_stats_,
    like_bn,
    register,
    register_running_stats_,
    running_factor_,
)


class BatchInstanceNorm(nn.Module):
    """y = (ρ·x̂_BN + (1 − ρ)·x̂_IN)·γ + β on [N, C, *S] (S of rank 1, 2 or 3)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        rho_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.rho = nn.Parameter(torch.full((num_features,), float(rho_init)))
        register_running_stats_(self, num_features, track_running_stats)

    def clip_rho_(self) -> None:
        """Clip ρ to [0, 1] in place (the paper does this after each parameter update)."""
        with torch.no_grad():
            self.rho.clamp_(0.0, 1.0)

    def _average_factor(self) -> float:
        # nn.BatchNorm's rule: momentum, or a cumulative average when momentum is None
        if self.training and self.track_running_stats:
            return running_factor_(self.num_batches_tracked, self.momentum)
        return 0.0 if self.momentum is None else self.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            # .data: an in-place clip that autograd ignores and torch.fx records as an ordinary op.
            # ρ is then used unclamped: torch.clamp's gradient is 0 *at* the bounds, which would freeze
            # ρ at 1 (from_bn's start) forever.
            self.rho.data.clamp_(0.0, 1.0)
            rho = self.rho
        else:
            rho = self.rho.clamp(0.0, 1.0)  # a checkpoint may hold an out-of-range ρ
        use_batch_stats = self.training or not self.track_running_stats
        out_bn = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight * rho, self.bias,
            use_batch_stats, self._average_factor(), self.eps,
        )
        out_in = F.instance_norm(x, None, None, self.weight * (1.0 - rho), None, True, 0.0, self.eps)
        return out_bn + out_in

    @classmethod
    def from_bn(cls, bn: nn.Module, rho: float = 1.0) -> BatchInstanceNorm:
        """γ, β, running statistics and hyper-parameters from ``bn``; ρ = 1 reproduces ``bn`` exactly."""
        s = bn_state(bn)
        new = cls(s.num_features, s.eps, s.momentum, s.track_running_stats, rho_init=rho)
        copy_affine_(new, s)
        copy_running_stats_(new, s)
        return like_bn(new, bn)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}"
        )


def _check(site: SwapSite) -> str | None:
    if site.spatial_dims == 0:
        return (
            "batch-instance norm needs spatial dims: on [N, C] features the instance branch is the "
            "constant 0, leaving a scaled BN"
        )
    if site.spatial_size == 1:
        return "the feature map is 1 position per channel: instance statistics are undefined there"
    return None


def _build(site: SwapSite) -> SwapBuild:
    norm = BatchInstanceNorm.from_bn(site.bn)
    notes = ["ρ = 1: identical to the BN until fine-tuning moves ρ"]
    if not norm.track_running_stats:
        notes.append("the BN tracks no running statistics: the BN branch uses batch statistics in eval too")
    return SwapBuild(norm=norm, notes=notes)


BIN = register(NormTarget(
    name="bin",
    summary="Batch-Instance Norm: per-channel gate ρ between BN and IN statistics (ρ=1 = the BN)",
    exact=True,
    batch_independent=False,
    build=_build,
    check=_check,
))
