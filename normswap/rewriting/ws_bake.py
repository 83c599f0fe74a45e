"""Weight standardization, baked: a WS convolution becomes a plain one holding the standardized
weights ``Ŵ = (W − μ)/√(σ² + ε)`` (per output channel), so a BatchNorm after it can fold.

Part of the fold pass (:func:`normswap.rewriting.fold.fold` calls :func:`bake_ws` first): folding a BN scale
into a WS conv's raw weight would be a no-op, since standardization removes the scale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn

from .passes import SiteAction

__all__ = ["ws_kind", "bake_ws_weight", "bake_ws", "WSPadSame"]

# timm.layers.std_conv: matched by class name and module so timm need not be imported
_TIMM_WS = {"StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"}


def ws_kind(m: nn.Module) -> str | None:
    """``"normswap"`` for normswap's WSConv1d/2d/3d, ``"timm"`` for timm's (Scaled)StdConv2d(Same),
    None for anything else (subclasses of the timm classes are not matched: their forward may differ)."""
    from ..norms.ws import WS_CONVS

    if isinstance(m, WS_CONVS):
        return "normswap"
    if type(m).__name__ in _TIMM_WS and type(m).__module__.startswith("timm."):
        return "timm"
    return None


def bake_ws_weight(weight: Tensor, eps: float, gain: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Ŵ = (W − μ)/√(σ² + ε) per output channel (biased variance, ε inside the root — what both
    normswap's WSConv and timm's ``F.batch_norm(W.reshape(1, C_out, -1), training=True)`` compute),
    times ``gain·scale`` per output channel for timm's ScaledStdConv2d. Computed in float64, returned
    in ``weight``'s dtype."""
    from ..norms.ws import standardize

    w = standardize(weight.detach().to(torch.float64), float(eps))
    if gain is not None or scale is not None:
        g = torch.ones(w.shape[0], dtype=torch.float64) if gain is None else gain.detach().to(torch.float64).reshape(-1)
        w = w * (g * (1.0 if scale is None else float(scale))).reshape(-1, *([1] * (w.dim() - 1)))
    return w.to(weight.dtype)


def _ws_pad_same(x: Tensor, kernel_size: Any, stride: Any, dilation: Any) -> Tensor:
    """timm's own dynamic SAME padding (``timm.layers.padding.pad_same``), called exactly as the
    ``*Same`` convolutions call it; an opaque call for torch.fx (its size arithmetic is not traceable)."""
    from timm.layers.padding import pad_same

    return pad_same(x, kernel_size, stride, dilation)


fx.wrap("_ws_pad_same")


class WSPadSame(nn.Module):
    """The dynamic SAME padding of a baked timm ``StdConv2dSame`` / ``ScaledStdConv2dSame``."""

    def __init__(self, kernel_size: Any, stride: Any, dilation: Any) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)

    def forward(self, x: Tensor) -> Tensor:
        return _ws_pad_same(x, self.kernel_size, self.stride, self.dilation)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


def _baked_ws(m: nn.Module) -> tuple[nn.Module, list[str]]:
    """The plain convolution (or ``Sequential(WSPadSame, Conv2d)``) computing what WS conv ``m``
    computes, with notes for the report."""
    w = m.weight
    notes: list[str] = []
    if ws_kind(m) == "normswap":  # its own export form is exactly this bake
        conv = m.export_form()
        conv.weight.requires_grad_(w.requires_grad)
        if m.bias is not None:
            conv.bias.requires_grad_(m.bias.requires_grad)
        return conv, notes
    # timm: F.conv2d with self.padding, padding_mode ignored (always zeros)
    gain = getattr(m, "gain", None)
    scale = getattr(m, "scale", None) if gain is not None else None
    baked = bake_ws_weight(w, m.eps, gain, scale)
    if gain is not None:
        notes.append("gain·scale (ScaledStdConv2d) baked in")
    conv = nn.Conv2d(
        m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
        groups=m.groups, bias=m.bias is not None, device=w.device, dtype=w.dtype,
    )
    with torch.no_grad():
        conv.weight = nn.Parameter(baked, requires_grad=w.requires_grad)
        if m.bias is not None:
            conv.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
    new: nn.Module = conv
    if getattr(m, "same_pad", False):
        new = nn.Sequential(WSPadSame(m.kernel_size, m.stride, m.dilation), conv)
        notes.append("timm's dynamic SAME padding kept (WSPadSame before the convolution)")
    return new.train(m.training), notes


def bake_ws(model: nn.Module, owned: set[int] = frozenset()) -> tuple[nn.Module, list[SiteAction]]:
    """Replace every weight-standardized convolution under ``model`` by its baked form (in place on
    ``model``'s containers; the WS convs themselves are not touched, so they may be shared with the
    caller's model). Modules whose id is in ``owned`` (the caller's) are never modified. A WS conv
    used at several places becomes one baked module used at the same places.
    Returns the model (a new root if the root itself is a WS conv) and one ``ws-baked`` action each."""
    actions: list[SiteAction] = []
    memo: dict[int, nn.Module] = {}

    def baked(name: str, m: nn.Module) -> nn.Module:
        if id(m) not in memo:
            new, notes = _baked_ws(m)
            memo[id(m)] = new
            target = f"{name}.1" if isinstance(new, nn.Sequential) else name
            actions.append(SiteAction(name or "<model>", type(m).__name__, "ws-baked", target=target,
                                      exact=True, notes=notes))
        return memo[id(m)]

    if ws_kind(model) is not None:
        return baked("", model), actions
    stack: list[tuple[str, nn.Module]] = [("", model)]
    visited: set[int] = set()
    while stack:
        prefix, mod = stack.pop(0)
        if id(mod) in visited:
            continue
        visited.add(id(mod))
        for name, child in list(mod._modules.items()):
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            if ws_kind(child) is not None and id(mod) not in owned:
                mod._modules[name] = baked(path, child)
            else:
                stack.append((path, child))
    return model, actions
