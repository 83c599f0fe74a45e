"""Structural re-parameterization (RepVGG, MobileOne): parallel branches that read the same input
and are summed — convolutions, and an identity branch carrying an eval BatchNorm — merged into one
convolution, exactly.  Pure arithmetic (tensors in, tensors out, float64 inside); the fold pass
(:func:`normswap.rewriting.fold.fold`) finds the branches (:func:`normswap.rewriting.sites.can_fold`, action
``merged``) and does the graph surgery.

For branches ``y = conv(x; W₀, b₀) + Σᵢ conv(x; Wᵢ, bᵢ) + (s ⊙ x + t)`` whose kernels are all centred
(odd size ``k``, padding ``d·(k−1)/2``) with the same stride, groups and channels:

    W'[o, j, κ] = W₀[o, j, κ] + Σᵢ Wᵢ[o, j, κ − (K − kᵢ)/2] + s_o · [j = o mod C_in/g] · [κ = (K − 1)/2]
    b' = b₀ + Σᵢ bᵢ + t

where ``K`` is the largest kernel (``W₀``'s): a centred ``kᵢ`` kernel reads exactly the input
positions of the centre ``kᵢ`` taps of a centred ``K`` kernel, and the identity reads the centre
tap of its own channel, which in a grouped convolution with ``C_in = C_out`` is in-group index
``o mod C_in/g``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["centre_kernel", "merge_parallel_convs"]


def centre_kernel(weight: Tensor, size: tuple[int, ...]) -> Tensor:
    """``weight`` ``[C_out, C_in/g, *k]`` zero-padded to ``[C_out, C_in/g, *size]``, centred
    (``size − k`` must be even in every dimension)."""
    pads: list[int] = []
    for k, big in reversed(list(zip(weight.shape[2:], size))):
        extra = big - k
        if extra < 0 or extra % 2:
            raise ValueError(f"a kernel of size {tuple(weight.shape[2:])} cannot be centred in {size}")
        pads += [extra // 2, extra // 2]
    return torch.nn.functional.pad(weight, pads)


def merge_parallel_convs(
    main: tuple[Tensor, Tensor | None],
    branches: list[tuple[Tensor, Tensor | None]],
    identity: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor]:
    """``(W', b')`` of the one convolution computing ``conv(x; W₀, b₀) + Σᵢ conv(x; Wᵢ, bᵢ) + s ⊙ x + t``
    (formula in the module docstring). ``main = (W₀, b₀)`` has the largest kernel; ``identity =
    (s, t)`` the identity branch's per-channel affine (float64, e.g. an eval BatchNorm's), or None.
    Computed in float64; returned in ``W₀``'s dtype. The caller checks strides, groups, dilations
    and centred paddings agree."""
    w0, b0 = main
    size = tuple(w0.shape[2:])
    c_out = w0.shape[0]
    w = w0.detach().to(torch.float64, copy=True)
    b = torch.zeros(c_out, dtype=torch.float64, device=w0.device) if b0 is None else b0.detach().to(torch.float64)
    for wi, bi in branches:
        if wi.shape[:2] != w0.shape[:2]:
            raise ValueError(f"branch kernel {tuple(wi.shape)} does not match {tuple(w0.shape)}")
        w += centre_kernel(wi.detach().to(torch.float64), size)
        if bi is not None:
            b = b + bi.detach().to(torch.float64)
    if identity is not None:
        s, t = identity
        centre = tuple(k // 2 for k in size)
        o = torch.arange(c_out, device=w.device)
        w[(o, o % w0.shape[1], *centre)] += s.to(torch.float64)  # s_o at (o, o mod C_in/g, centre)
        b = b + t.to(torch.float64)
    return w.to(w0.dtype), b.to(w0.dtype)
