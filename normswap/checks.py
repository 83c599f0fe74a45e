"""Behavioural checks of a model that the report shows next to parity."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["BatchIndependence", "batch_independence"]


@dataclass
class BatchIndependence:
    """Is a sample's *training-mode* output the same alone as inside a batch?"""

    batch: int
    max_rel_diff: float
    tol: float

    @property
    def independent(self) -> bool:
        return self.max_rel_diff <= self.tol

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "independent": self.independent}


def batch_independence(
    model: nn.Module, input_shape: Sequence[int], *, batch: int = 8, seed: int = 0, tol: float = 1e-4
) -> BatchIndependence:
    """Run a copy of ``model`` in training mode (dropout off) on sample 0 alone and inside a batch
    of ``batch`` samples; compare sample 0's outputs relative to their scale.

    A copy, because training-mode BatchNorm updates its running statistics.
    """
    m = copy.deepcopy(model).train()
    for sub in m.modules():  # dropout would make the two runs differ for reasons other than the norm
        if isinstance(sub, nn.modules.dropout._DropoutNd) or type(sub).__name__ in ("DropPath", "StochasticDepth"):
            sub.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *input_shape[1:], generator=g)
    with torch.no_grad():
        together = pytree.tree_leaves(m(x))
        try:
            alone = pytree.tree_leaves(m(x[:1]))
        except (ValueError, RuntimeError):  # e.g. BatchNorm1d refuses a batch of 1 in training
            # then compare sample 0 inside a second batch with different companions
            y = torch.cat([x[:1], torch.randn(batch - 1, *input_shape[1:], generator=g)])
            alone = [t[:1] for t in pytree.tree_leaves(m(y))]
    worst = 0.0
    for a, b in zip(alone, together):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a, b = a[:1].double(), b[:1].double()
            worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)))
    return BatchIndependence(batch=batch, max_rel_diff=worst, tol=tol)
