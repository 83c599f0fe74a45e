"""Paired comparison of two per-sample losses on the same samples (pure tensor math).

With ``a_i`` (the candidate, e.g. fitted parameters) and ``b_i`` (the alternative, e.g. the previous
ones) measured on the same ``n`` samples, the paired differences ``d_i = a_i − b_i`` have mean ``d̄``
and standard error ``se = sd(d) / √n`` (``sd`` with Bessel's correction). The candidate is *worse*
beyond noise when ``d̄ > noise = max(Z · se, MARGIN · |b̄|)`` — :data:`Z` standard errors, and above a
small relative float margin — and *better* beyond noise when ``d̄ < −noise``; anything between is
within noise. Pairing removes the between-sample spread both losses share, so it sees far smaller
differences than comparing two means.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

#: standard errors of the paired difference a change must exceed to count
Z = 2.0
#: ... and the relative margin below which a difference is float noise whatever its standard error
MARGIN = 1e-6


@dataclass(frozen=True)
class Paired:
    """``a − b`` on ``n`` paired samples: mean difference, its standard error, and ``b``'s mean."""

    n: int
    diff: float
    se: float
    base: float

    @property
    def noise(self) -> float:
        """max(Z·se, MARGIN·|b̄|): the smallest mean difference called a difference."""
        return max(Z * self.se, MARGIN * abs(self.base))

    @property
    def worse(self) -> bool:
        """``a`` is worse than ``b`` beyond noise: d̄ > noise."""
        return self.diff > self.noise

    @property
    def better(self) -> bool:
        """``a`` is better than ``b`` beyond noise: d̄ < −noise."""
        return self.diff < -self.noise

    def to_dict(self) -> dict[str, float | int | bool]:
        return {"n": self.n, "diff": self.diff, "se": self.se, "noise": self.noise, "beyond_noise": self.worse or self.better}

    def __str__(self) -> str:
        return f"{self.diff:+.3g} ± {Z:g}·{self.se:.2g} (paired, n={self.n})"


def paired_sums(a: Tensor, b: Tensor) -> Tensor:
    """float64 [n, Σd, Σd², Σb] of ``d = a − b`` (flattened; the same samples in the same order)."""
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    if a.shape != b.shape:
        raise ValueError(f"paired losses need the same samples: {a.numel()} vs {b.numel()}")
    d = a - b
    return torch.stack([torch.tensor(float(d.numel()), dtype=torch.float64, device=d.device), d.sum(), (d * d).sum(), b.sum()])


def from_sums(s: Tensor) -> Paired:
    """:class:`Paired` from :func:`paired_sums` (summed over shards or batches first, if any)."""
    n, sd, sd2, sb = (float(v) for v in s.tolist())
    if n <= 0:
        return Paired(0, 0.0, 0.0, 0.0)
    mean = sd / n
    var = max(sd2 - n * mean * mean, 0.0) / (n - 1) if n > 1 else 0.0
    return Paired(int(n), mean, math.sqrt(var / n), sb / n)


def paired(a: Tensor, b: Tensor, reduce: Callable[[Tensor], Tensor] | None = None) -> Paired:
    """Compare per-sample losses ``a`` and ``b`` of the same samples (module docstring); ``reduce``
    sums the float64 sufficient statistics across processes (e.g. an all-reduce) before the figure."""
    s = paired_sums(a, b)
    return from_sums(reduce(s) if reduce is not None else s)
