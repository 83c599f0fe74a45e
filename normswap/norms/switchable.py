"""Switchable Normalization (Luo, Ren, Peng, Zhang & Li 2018, arXiv 1806.10779).

    y = γ · (x − μ) / √(σ² + ε) + β,   μ = Σ_k w_k μ_k,   σ² = Σ_k w'_k σ²_k,   k ∈ {IN, LN, BN}
    w = softmax(λ_mean),  w' = softmax(λ_var)   (two separate sets of logits)

All variances are biased (1/n). As in the paper, the LN and BN statistics are computed from the IN ones
instead of in extra passes over x:

    μ_IN, σ²_IN    over S, per sample and channel
    μ_LN = mean_c μ_IN,   σ²_LN = mean_c (σ²_IN + μ²_IN) − μ²_LN      (E[x²] − μ²)
    μ_BN = mean_n μ_IN,   σ²_BN = mean_n (σ²_IN + μ²_IN) − μ²_BN      (training)

The BN branch behaves like nn.BatchNorm: batch statistics in training, updating ``running_mean`` and
``running_var`` with nn.BatchNorm's momentum rule and its unbiased (n/(n−1)) correction of the running
variance, so that running statistics carried over from a trained BN keep their meaning; running
statistics in eval. (The paper's code keeps biased running variances and its own momentum convention.)
E[x²] − μ² can round below 0; it is clamped at 0.

[N, C] features have no spatial dims: IN is undefined there (each statistic would cover one value), so
SN mixes LN (statistics over C) and BN only: ``branches == ("ln", "bn")``.

``from_bn(bn, spatial_dims, mix_init=0.9)`` copies γ, β and the running statistics, and sets both logit
vectors so that the BN branch has weight ``mix_init`` and the others share the rest equally
(λ_BN = log(mix_init·(K−1)/(1−mix_init)), λ_others = 0). Close to the trained BN, yet off the softmax's
saturation: ∂w_BN/∂λ_BN = w_BN(1 − w_BN) = 0.09 at 0.9, against 1e-4 at 0.9999, so fine-tuning can still
learn the mixture. Not exact: eval outputs move by 10% of the IN/LN statistics' distance from the BN's.
"""

from __future__ import annotations

import math

import torch
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

DEFAULT_MIX_INIT = 0.9


class SwitchableNorm(nn.Module):
    """Switchable Norm over [N, C, *S] (spatial_dims = len(S) ∈ {1, 2, 3}) or [N, C] (spatial_dims 0)."""

    def __init__(
        self,
        num_features: int,
        spatial_dims: int = 2,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (0, 1, 2, 3):
            raise ValueError(f"spatial_dims must be 0 ([N, C]) or 1/2/3, got {spatial_dims}")
        self.num_features = num_features
        self.spatial_dims = spatial_dims
        self.eps = float(eps)
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        self.branches: tuple[str, ...] = ("in", "ln", "bn") if spatial_dims > 0 else ("ln", "bn")
        k = len(self.branches)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        # uniform mixture for a fresh layer, as the paper's code initializes it
        self.mean_logits = nn.Parameter(torch.zeros(k))
        self.var_logits = nn.Parameter(torch.zeros(k))
        register_running_stats_(self, num_features, track_running_stats)

    def mixture_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, w'): softmax of the mean and variance logits, ordered as ``self.branches``."""
        return torch.softmax(self.mean_logits, 0), torch.softmax(self.var_logits, 0)

    def set_mixture_(self, bn_weight: float) -> None:
        """Give the BN branch weight ``bn_weight`` in both mixtures, the other branches equal shares."""
        if not 0.0 < bn_weight < 1.0:
            raise ValueError(f"mix_init must be in (0, 1), got {bn_weight}")
        k = len(self.branches)
        logits = torch.zeros(k)
        logits[self.branches.index("bn")] = math.log(bn_weight * (k - 1) / (1.0 - bn_weight))
        with torch.no_grad():
            self.mean_logits.copy_(logits)
            self.var_logits.copy_(logits)

    def _update_running(self, mean_bn: torch.Tensor, var_bn: torch.Tensor, count: int) -> None:
        if isinstance(count, int) and count < 2:  # (a torch.fx Proxy skips the check)
            raise ValueError("SwitchableNorm: expected more than 1 value per channel when training")
        f = running_factor_(self.num_batches_tracked, self.momentum)
        unbiased = var_bn * (count / (count - 1))  # BN's running variance is the unbiased estimate
        with torch.no_grad():
            self.running_mean.mul_(1.0 - f).add_(mean_bn.detach(), alpha=f)
            self.running_var.mul_(1.0 - f).add_(unbiased.detach(), alpha=f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        xf = x.reshape(n, c, -1)  # [N, C, L]; L = 1 for [N, C] features
        mean_in = xf.mean(-1, keepdim=True)  # [N, C, 1]
        var_in = xf.var(-1, correction=0, keepdim=True)
        sq_in = var_in + mean_in * mean_in  # E[x²] per sample and channel
        mean_ln = mean_in.mean(1, keepdim=True)  # [N, 1, 1]
        var_ln = (sq_in.mean(1, keepdim=True) - mean_ln * mean_ln).clamp_min(0.0)
        if self.training or not self.track_running_stats:
            mean_bn = mean_in.mean(0, keepdim=True)  # [1, C, 1]
            var_bn = (sq_in.mean(0, keepdim=True) - mean_bn * mean_bn).clamp_min(0.0)
            if self.training and self.track_running_stats:
                self._update_running(mean_bn.reshape(-1), var_bn.reshape(-1), xf.numel() // c)
        else:
            mean_bn = self.running_mean.reshape(1, -1, 1)
            var_bn = self.running_var.reshape(1, -1, 1)
        w, wv = self.mixture_weights()
        if len(self.branches) == 3:
            mean = w[0] * mean_in + w[1] * mean_ln + w[2] * mean_bn
            var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
        else:
            mean = w[0] * mean_ln + w[1] * mean_bn
            var = wv[0] * var_ln + wv[1] * var_bn
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        y = y * self.weight.reshape(1, -1, 1) + self.bias.reshape(1, -1, 1)
        return y.reshape(x.shape)

    @classmethod
    def from_bn(
        cls, bn: nn.Module, spatial_dims: int, mix_init: float = DEFAULT_MIX_INIT
    ) -> SwitchableNorm:
        """γ, β, running statistics and hyper-parameters from ``bn``; BN branch weight ``mix_init``."""
        s = bn_state(bn)
        new = cls(s.num_features, spatial_dims, s.eps, s.momentum, s.track_running_stats)
        new.set_mixture_(mix_init)
        copy_affine_(new, s)
        copy_running_stats_(new, s)
        return like_bn(new, bn)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, spatial_dims={self.spatial_dims}, branches={self.branches}, "
            f"eps={self.eps}, momentum={self.momentum}"
        )


def _check(site: SwapSite) -> str | None:
    if site.num_features < 2 and site.spatial_dims == 0:
        return "switchable norm on [N, 1] features: the LN branch normalizes a single value"
    return None


def _build(site: SwapSite) -> SwapBuild:
    norm = SwitchableNorm.from_bn(site.bn, site.spatial_dims)
    notes = [f"mixture initialized BN-dominant (w_BN = {DEFAULT_MIX_INIT}); not exact before fine-tuning"]
    if site.spatial_dims == 0:
        notes.append("[N, C] features: IN is undefined without spatial dims, SN mixes LN and BN only")
    if not norm.track_running_stats:
        notes.append("the BN tracks no running statistics: the BN branch uses batch statistics in eval too")
    return SwapBuild(norm=norm, notes=notes)


SN = register(NormTarget(
    name="sn",
    summary="Switchable Norm: learned softmax mixture of IN, LN and BN statistics (BN-dominant start)",
    exact=False,
    batch_independent=False,
    build=_build,
    check=_check,
))

