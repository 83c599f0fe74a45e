"""Weight Standardization (Qiao et al. 2019, arXiv 1903.10520): convolutions whose weight is
standardized per output channel in every forward pass.

    Ŵ[o] = (W[o] − μ_o) / √(σ²_o + ε),   μ_o, σ²_o = mean, *biased* variance of W[o] over (C_in/groups, *K)

Convention (documented because implementations differ): the biased variance (1/I Σ, the paper's
definition of σ) with ε *inside* the square root, as timm's ``StdConv2d`` and BiT do; the paper's
official code instead uses torch's unbiased ``std`` and adds ε after the root. Default ε = 1e-6 (timm's):
trained filters with a large fan-in have weight variances around 1e-4, where a larger ε would visibly
shrink Ŵ.

A filter with a single element (C_in/groups · ∏K = 1) is refused: its standardized weight is
identically 0 under this convention (and undefined under the unbiased one), i.e. a dead layer.

``WSConv{1,2,3}d`` subclass ``nn.Conv{1,2,3}d``, so ``isinstance(m, nn.Conv2d)`` holds — but folding a BN
scale into ``.weight`` is a silent no-op (standardization removes it). Call :meth:`export_form` first:
it returns a plain ``nn.ConvNd`` with Ŵ baked in, which exports as a single ONNX Conv and folds normally.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

DEFAULT_EPS = 1e-6


def filter_size(conv: nn.Module) -> int:
    """Elements each output channel's filter has: C_in/groups · ∏K."""
    return int(conv.weight[0].numel())


def ws_refusal(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot be weight-standardized, or None."""
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return f"weight standardization applies to Conv1d/2d/3d, not {type(conv).__name__}"
    if filter_size(conv) <= 1:
        return (
            "weight standardization of a 1-element filter (C_in/groups × kernel = 1) gives a zero "
            "weight: W − mean(W) = 0"
        )
    return None


def standardize(weight: torch.Tensor, eps: float, rank: int | None = None) -> torch.Tensor:
    """Ŵ = (W − μ)/√(σ² + ε), statistics per output channel (dim 0), biased variance.

    ``rank`` (the weight's, a Python int) lets torch.fx trace this without reading ``weight.dim()``."""
    dims = tuple(range(1, rank if rank is not None else weight.dim()))
    var, mean = torch.var_mean(weight, dim=dims, correction=0, keepdim=True)
    return (weight - mean) * torch.rsqrt(var + eps)


class _WSConvMixin:
    """Shared body of WSConv1d/2d/3d (the mixin precedes the nn.ConvNd base in the MRO)."""

    _plain: type[nn.Module]
    eps: float

    def __init__(self, *args, eps: float = DEFAULT_EPS, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # nn.ConvNd's, next in the MRO
        self._ws_init(eps)

    def _ws_init(self, eps: float) -> None:
        self.eps = float(eps)
        reason = ws_refusal(self)
        if reason is not None:
            raise ValueError(reason)

    def standardized_weight(self) -> torch.Tensor:
        """Ŵ for the current weight (differentiable w.r.t. ``weight``)."""
        return standardize(self.weight, self.eps, len(self.kernel_size) + 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.__dict__.get("_ws_frozen")  # set only inside standardized_once()
        return self._conv_forward(x, w if w is not None else self.standardized_weight(), self.bias)

    def export_form(self) -> nn.Module:
        """A plain nn.ConvNd computing the same function, Ŵ baked in (standardized in float64)."""
        w = self.weight
        conv = self._plain(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups,
            bias=self.bias is not None, padding_mode=self.padding_mode, device=w.device, dtype=w.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(standardize(w.detach().double(), self.eps).to(w.dtype))
            if self.bias is not None:
                conv.bias.copy_(self.bias.detach())
        return conv.train(self.training)

    @classmethod
    def from_conv(cls, conv: nn.Module, eps: float = DEFAULT_EPS):
        """A WS conv with ``conv``'s hyper-parameters, weight and bias (the weight is kept raw: it is
        standardized in forward, so the function changes unless ``conv``'s filters already are)."""
        if not isinstance(conv, cls._plain):
            raise ValueError(f"{cls.__name__}.from_conv needs an {cls._plain.__name__}, got {type(conv).__name__}")
        w = conv.weight
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype,
            eps=eps,
        )
        with torch.no_grad():
            new.weight.copy_(w.detach())
            if conv.bias is not None:
                new.bias.copy_(conv.bias.detach())
        return new.train(conv.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ws_eps={self.eps}"


class WSConv1d(_WSConvMixin, nn.Conv1d):
    """nn.Conv1d with weight standardization: y = conv(x, (W − μ)/√(σ² + ε)) + b."""

    _plain = nn.Conv1d


class WSConv2d(_WSConvMixin, nn.Conv2d):
    """nn.Conv2d with weight standardization: y = conv(x, (W − μ)/√(σ² + ε)) + b."""

    _plain = nn.Conv2d


class WSConv3d(_WSConvMixin, nn.Conv3d):
    """nn.Conv3d with weight standardization: y = conv(x, (W − μ)/√(σ² + ε)) + b."""

    _plain = nn.Conv3d


@contextlib.contextmanager
def standardized_once(model: nn.Module) -> Iterator[None]:
    """Inside the block every WS conv of ``model`` uses Ŵ computed once on entry, instead of
    re-standardizing its weight in every forward (calibration runs many no-grad forwards while only
    the norms' γ, β change). The weights must not change inside the block; the cache is dropped on exit."""
    convs = [m for m in model.modules() if isinstance(m, _WSConvMixin)]
    try:
        with torch.no_grad():
            for m in convs:
                m.__dict__["_ws_frozen"] = m.standardized_weight().detach()
        yield
    finally:
        for m in convs:
            m.__dict__.pop("_ws_frozen", None)


_WS_FOR = {nn.Conv1d: WSConv1d, nn.Conv2d: WSConv2d, nn.Conv3d: WSConv3d}
WS_CONVS = (WSConv1d, WSConv2d, WSConv3d)


def ws_conv_from(conv: nn.Module, eps: float = DEFAULT_EPS) -> nn.Module:
    """The WSConv of ``conv``'s rank built from it (``conv`` must be exactly nn.Conv1d/2d/3d or a WSConv:
    subclasses with their own forward, e.g. timm's Conv2dSame, would lose behaviour)."""
    if isinstance(conv, WS_CONVS):
        base = conv._plain
    else:
        base = type(conv)
    if base not in _WS_FOR:
        raise ValueError(f"weight standardization applies to nn.Conv1d/2d/3d, not {type(conv).__name__}")
    return _WS_FOR[base].from_conv(conv, eps=eps)
