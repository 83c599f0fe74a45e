"""Shared test utilities."""

from __future__ import annotations

import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (in place), so a fold
    that ignores any of them fails parity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor):
                rm.copy_(torch.randn(rm.shape, generator=g) * 0.5)
                rv.copy_(torch.rand(rv.shape, generator=g) * 2 + 0.2)
                w, b = getattr(m, "weight", None), getattr(m, "bias", None)
                if isinstance(w, torch.Tensor) and w.shape == rm.shape:
                    w.copy_(torch.rand(w.shape, generator=g) + 0.5)
                if isinstance(b, torch.Tensor) and b.shape == rm.shape:
                    b.copy_(torch.randn(b.shape, generator=g) * 0.2)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| relative to the scale of ``a``."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    sd = model.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in sd)


def swap_digits(original: nn.Module, to: str, **kw):
    """``normswap.rewrite`` of the digits model with its [2, 1, 8, 8] example input."""
    import normswap

    return normswap.rewrite(original, to, (torch.zeros(2, 1, 8, 8),), **kw)


def check_fold(model: nn.Module, x: torch.Tensor, tol: float = 1e-5):
    """Fold ``model`` (put in eval mode) on ``(x,)``: the folded model reproduces it within ``tol``
    (relative to the output scale) and the caller's model is left untouched. Returns the pass result."""
    from normswap.rewriting.fold import fold

    model = model.eval()
    snap = snapshot(model)
    res = fold(model, (x,))
    with torch.no_grad():
        ref, out = model(x), res.model(x)
    assert rel_err(ref, out) <= tol, rel_err(ref, out)
    assert same_state(model, snap), "the caller's model was mutated"
    return res
