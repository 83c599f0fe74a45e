"""Small modules the rewrite passes leave behind in a rewritten model."""

from __future__ import annotations

from torch import Tensor, nn


def channel_affine(x: Tensor, scale: Tensor, shift: Tensor, axis: int = 1,
                   drop: nn.Module | None = None, act: nn.Module | None = None) -> Tensor:
    """``act(drop(s_c · x_c + t_c))`` with the channels on ``axis`` (1 for ``[N, C, *S]``; -1, or any
    2-D ``x``, for the last axis), each post-op skipped when None."""
    shape = (-1,) if axis == -1 or x.dim() == 2 else (1, -1) + (1,) * (x.dim() - 2)
    x = x * scale.reshape(shape) + shift.reshape(shape)
    if drop is not None:
        x = drop(x)
    if act is not None:
        x = act(x)
    return x


class ChannelAffine(nn.Module):
    """``y = post(s_c · x_c + t_c)`` along dim 1: an eval BatchNorm that had nothing to fold into.

    ``post`` is the dropout and activation a BatchNorm subclass such as timm's ``BatchNormAct2d``
    applied after normalizing (kept as children ``drop``/``act`` so their names survive).
    Exports to ONNX as one Mul and one Add.
    """

    def __init__(
        self,
        scale: Tensor,
        shift: Tensor,
        drop: nn.Module | None = None,
        act: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return channel_affine(x, self.scale, self.shift, 1, self.drop, self.act)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"


class PostNorm(nn.Module):
    """What a BatchNorm subclass did after normalizing (dropout, then activation), kept when the
    normalization itself was folded away or replaced — so an activation is never lost."""

    def __init__(self, drop: nn.Module | None, act: nn.Module | None) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        if self.drop is not None:
            x = self.drop(x)
        if self.act is not None:
            x = self.act(x)
        return x


def is_identity(m: nn.Module | None) -> bool:
    """True for a missing or ``nn.Identity`` post-op (nothing to keep)."""
    return m is None or type(m) is nn.Identity


__all__ = ["ChannelAffine", "PostNorm", "NormAct", "FittedAffine", "is_identity"]


class NormAct(nn.Module):
    """A swapped-in norm followed by the dropout and activation of the BatchNorm subclass it
    replaced (timm's ``BatchNormAct2d``): an isinstance-based swap would silently drop those."""

    def __init__(self, norm: nn.Module, drop: nn.Module | None, act: nn.Module | None) -> None:
        super().__init__()
        self.norm = norm
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        if self.drop is not None:
            x = self.drop(x)
        if self.act is not None:
            x = self.act(x)
        return x


class FittedAffine(nn.Module):
    """``y = post(s_c · x_c + t_c)`` along ``axis`` (1 for ``[N, C, *S]``, -1 for ``[N, *, C]``): a
    per-sample norm (GroupNorm, LayerNorm, …; named in ``source``) replaced by the per-channel affine
    fitted to its output (:mod:`normswap.keep.norm_fit`). ``s``, ``t`` are parameters, so recovery can train
    them; the fold pass folds them like an eval BatchNorm's (:func:`normswap.rewriting.sites.site_affine`)."""

    def __init__(self, scale: Tensor, shift: Tensor, axis: int = 1, source: str = "",
                 drop: nn.Module | None = None, act: nn.Module | None = None) -> None:
        super().__init__()
        if axis not in (1, -1):
            raise ValueError(f"axis must be 1 or -1, got {axis}")
        self.scale = nn.Parameter(scale.detach().clone())
        self.shift = nn.Parameter(shift.detach().clone())
        self.axis = axis
        self.source = source
        self.drop = drop
        self.act = act

    @property
    def num_features(self) -> int:
        return self.scale.numel()

    def forward(self, x: Tensor) -> Tensor:
        return channel_affine(x, self.scale, self.shift, self.axis, self.drop, self.act)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}, axis={self.axis}, fitted to {self.source or 'a norm'}"
