"""Weight Normalization with mean-only BatchNorm (Salimans & Kingma 2016, arXiv 1602.07868).

    WNConv:            w = g · v / ‖v‖          per output unit (norm over all other weight dims)
    MeanOnlyBatchNorm: y = x − μ + β            μ: batch mean over (N, *S) in training (updating
                                                 running_mean), running_mean in eval; no division

The paper pairs the two: WN fixes each unit's weight scale, mean-only BN centres the pre-activation.

:func:`from_conv_bn` turns a trained conv→BN (or linear→BN1d) pair into WNConv→MeanOnlyBatchNorm with
the *same* eval function. With s = γ/√(σ²_run + ε):

    BN(conv(x)) = s·(W x + b − μ_run) + β
                = W' x − m + β,   W' = s·W (per output unit),  m = s·(μ_run − b)

so v = W', g = ‖W'‖, no conv bias, running_mean = m, β kept. Exact up to float rounding (W' and m are
computed in float64). A unit with γ = 0 keeps v = W (and g = 0), so v/‖v‖ stays defined.

WNConv is deliberately *not* an nn.Conv subclass: a fold pass that scales ``conv.weight`` would
silently do nothing on a reparameterized weight. ``export_form()`` returns the plain nn.Conv/nn.Linear
with w baked in; MeanOnlyBatchNorm exports as one Add of the constant (β − running_mean) in eval, and
its ``export_form()`` is that constant shift as a frozen per-channel bias module.

The mean-only BN uses batch statistics in training, so the pair is NOT batch-independent in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .registry import NormTarget, SwapBuild, SwapSite, bn_state, like_bn, register, running_factor_

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _unit_norm(v: torch.Tensor, rank: int) -> torch.Tensor:
    """‖v‖ per output unit (dim 0) of a rank-``rank`` weight, shaped to broadcast against it.

    (``rank`` is passed as a Python int, not read from ``v``, so that torch.fx can trace the module.)"""
    return torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1).reshape((-1,) + (1,) * (rank - 1))


class WNConv(nn.Module):
    """Weight-normalized Conv1d/2d/3d or Linear: w = g·v/‖v‖ per output unit, then the usual op.

    Holds ``v`` (shape of the original weight), ``g`` [C_out], ``bias`` (or None) and the original
    layer's hyper-parameters; build it with :meth:`from_module` or :func:`from_conv_bn`."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if type(layer) not in (*_CONVS, nn.Linear):
            raise ValueError(f"weight norm applies to nn.Conv1d/2d/3d and nn.Linear, not {type(layer).__name__}")
        w = layer.weight.detach()
        self.kind = "linear" if isinstance(layer, nn.Linear) else f"conv{w.dim() - 2}d"
        self.weight_rank = w.dim()
        self.in_features = w.shape[1] * (1 if self.kind == "linear" else layer.groups)
        self.out_features = w.shape[0]
        g = _unit_norm(w, w.dim()).reshape(-1)
        v = w.clone()
        v[g == 0] = 1.0  # an all-zero filter: any direction keeps v/‖v‖ defined (w = 0·v/‖v‖ = 0)
        self.v = nn.Parameter(v)
        self.g = nn.Parameter(g.clone())
        self.bias = nn.Parameter(layer.bias.detach().clone()) if layer.bias is not None else None
        if self.kind != "linear":
            self.kernel_size = tuple(layer.kernel_size)
            self.stride = tuple(layer.stride)
            self.padding = layer.padding if isinstance(layer.padding, str) else tuple(layer.padding)
            self.dilation = tuple(layer.dilation)
            self.groups = layer.groups
            self.padding_mode = layer.padding_mode
            self._reversed_padding_repeated_twice = list(layer._reversed_padding_repeated_twice)

    def normalized_weight(self) -> torch.Tensor:
        """w = g · v / ‖v‖ per output unit."""
        r = self.weight_rank
        return self.v * (self.g.reshape((-1,) + (1,) * (r - 1)) / _unit_norm(self.v, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.normalized_weight()
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        conv = _CONV_FN[self.weight_rank - 2]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def export_form(self) -> nn.Module:
        """The plain nn.Conv{1,2,3}d / nn.Linear computing the same function (w baked in float64)."""
        v, r = self.v.detach(), self.weight_rank
        w = (v.double() * (self.g.detach().double().reshape((-1,) + (1,) * (r - 1))
                           / _unit_norm(v.double(), r))).to(v.dtype)
        dd = {"device": v.device, "dtype": v.dtype}
        has_bias = self.bias is not None
        if self.kind == "linear":
            layer = nn.Linear(self.in_features, self.out_features, bias=has_bias, **dd)
        else:
            cls = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[self.kind]
            layer = cls(
                self.in_features, self.out_features, self.kernel_size, stride=self.stride,
                padding=self.padding, dilation=self.dilation, groups=self.groups, bias=has_bias,
                padding_mode=self.padding_mode, **dd,
            )
        with torch.no_grad():
            layer.weight.copy_(w)
            if has_bias:
                layer.bias.copy_(self.bias.detach())
        return layer.train(self.training)

    @classmethod
    def from_module(cls, layer: nn.Module) -> WNConv:
        """Reparameterize ``layer`` (same function): v = W, g = ‖W‖ per output unit."""
        return cls(layer).train(layer.training)

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.in_features} -> {self.out_features}, bias={self.bias is not None}"


class PerChannelShift(nn.Module):
    """y = x + shift (per channel, dim 1): MeanOnlyBatchNorm's eval function, as a buffer."""

    def __init__(self, shift: torch.Tensor, spatial_dims: int | None) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.spatial_dims if self.spatial_dims is not None else x.dim() - 2
        return x + self.shift.reshape((-1,) + (1,) * k)


class MeanOnlyBatchNorm(nn.Module):
    """y = x − μ + β: μ the batch mean over (N, *S) in training (running_mean updated with BN's momentum
    rule), running_mean in eval; no variance normalization.

    ``spatial_dims`` (0 for [N, C], 1/2/3) fixes the broadcast shape so the module traces with torch.fx;
    left None it is read from the input (eager only)."""

    def __init__(
        self, num_features: int, momentum: float | None = 0.1, spatial_dims: int | None = None
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.momentum = momentum
        self.spatial_dims = spatial_dims
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.spatial_dims if self.spatial_dims is not None else x.dim() - 2
        shape = (1, -1) + (1,) * k
        if self.training:
            dims = (0,) + tuple(range(2, 2 + k))
            mean = x.mean(dim=dims)
            with torch.no_grad():
                f = running_factor_(self.num_batches_tracked, self.momentum)
                self.running_mean.mul_(1.0 - f).add_(mean.detach(), alpha=f)
        else:
            mean = self.running_mean
        return x + (self.bias - mean).reshape(shape)

    def export_form(self) -> nn.Module:
        """Eval function as one per-channel shift (β − running_mean)."""
        return PerChannelShift(self.bias.detach() - self.running_mean, self.spatial_dims)

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}, spatial_dims={self.spatial_dims}"


def wn_refusal(producer: nn.Module | None, bn: nn.Module | None = None, why_none: str | None = None) -> str | None:
    """Why a producer (+ BN) pair cannot become WNConv → MeanOnlyBatchNorm, or None."""
    if producer is None:
        return ("weight norm needs the conv/linear that feeds only this BN, and there is none"
                + (f" ({why_none})" if why_none else ""))
    if type(producer) not in (*_CONVS, nn.Linear):
        return (
            f"weight norm applies to nn.Conv1d/2d/3d and nn.Linear producers, not {type(producer).__name__}"
        )
    if bn is not None:
        s = bn_state(bn)
        if s.running_mean is None:
            return "the BN has no running statistics to fold into the weight-normalized layer"
        if producer.weight.shape[0] != s.num_features:
            return f"the producer has {producer.weight.shape[0]} outputs but the BN {s.num_features} features"
    return None


def from_conv_bn(
    conv: nn.Module, bn: nn.Module, spatial_dims: int | None = None
) -> tuple[WNConv, MeanOnlyBatchNorm]:
    """(WNConv, MeanOnlyBatchNorm) whose eval function equals ``bn(conv(x))`` in eval, exactly."""
    reason = wn_refusal(conv, bn)
    if reason is not None:
        raise ValueError(reason)
    s = bn_state(bn)
    w = conv.weight.detach().double()
    scale = s.weight.double() / torch.sqrt(s.running_var.double() + s.eps)  # γ/√(σ²+ε)
    shape = (-1,) + (1,) * (w.dim() - 1)
    w_folded = w * scale.reshape(shape)
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)

    wn = WNConv(conv)
    with torch.no_grad():
        g = _unit_norm(w_folded, w.dim()).reshape(-1)
        # γ = 0 zeroes a unit: keep its direction from W so that v/‖v‖ stays defined (w = 0·v/‖v‖ = 0)
        dead = g == 0
        v = torch.where(dead.reshape(shape), w, w_folded)
        dead_v = _unit_norm(v, w.dim()).reshape(-1) == 0  # an all-zero filter: any direction will do
        if dead_v.any():
            v[dead_v] = 1.0
        wn.v.copy_(v.to(wn.v.dtype))
        wn.g.copy_(g.to(wn.g.dtype))
    wn.bias = None

    if spatial_dims is None:
        spatial_dims = 0 if isinstance(conv, nn.Linear) else conv.weight.dim() - 2
    mob = MeanOnlyBatchNorm(s.num_features, s.momentum, spatial_dims)
    with torch.no_grad():
        mob.bias.copy_(s.bias)
        mob.running_mean.copy_((scale * (s.running_mean.double() - b)).to(s.dtype))
        if s.num_batches_tracked is not None:
            mob.num_batches_tracked.copy_(s.num_batches_tracked)
    return wn.train(conv.training), like_bn(mob, bn)


def _check(site: SwapSite) -> str | None:
    return wn_refusal(site.producer, site.bn, site.producer_reason)


def _build(site: SwapSite) -> SwapBuild:
    wn, mob = from_conv_bn(site.producer, site.bn, site.spatial_dims)
    return SwapBuild(
        norm=mob, producer=wn,
        notes=["BN scale folded into the weight-normalized producer; mean-only BN uses batch means in training"],
    )


WN = register(NormTarget(
    name="wn",
    summary="Weight Norm on the producer + mean-only BN (BN scale folded in: exact in eval)",
    exact=True,
    batch_independent=False,
    build=_build,
    check=_check,
))
