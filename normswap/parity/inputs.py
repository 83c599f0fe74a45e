"""Parity inputs: seeded random tensors (:func:`make_inputs`) and input-shape parsing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from normswap.errors import InputError


def make_inputs(
    shape: Sequence[int] | Sequence[Sequence[int]],
    batch_sizes: Sequence[int] = (1, 3),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[tuple[int, tuple[Tensor, ...]]]:
    """Seeded random inputs, one entry per batch size: ``[(batch, (x, ...)), ...]``.

    ``shape`` is one input's shape including a batch dimension (whose value is replaced), or a
    sequence of such shapes for a multi-input model. Float dtypes draw ``randn``; integer dtypes
    draw from ``[0, 100)``. The same seed gives the same tensors.
    """
    shapes = _as_shapes(shape)
    out: list[tuple[int, tuple[Tensor, ...]]] = []
    for b in batch_sizes:
        if int(b) < 1:
            raise InputError(f"batch size {b} is not positive; use batch sizes ≥ 1")
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(b))
        xs = []
        for s in shapes:
            full = (int(b), *s[1:])
            if dtype.is_floating_point or dtype.is_complex:
                xs.append(torch.randn(full, generator=g, dtype=dtype))
            elif dtype == torch.bool:
                xs.append(torch.randint(0, 2, full, generator=g).bool())
            else:
                xs.append(torch.randint(0, 100, full, generator=g, dtype=dtype))
        out.append((int(b), tuple(xs)))
    return out


def _as_shapes(shape: Any) -> list[tuple[int, ...]]:
    if isinstance(shape, torch.Size) or (len(shape) > 0 and all(isinstance(d, (int, np.integer)) for d in shape)):
        shapes = [tuple(int(d) for d in shape)]
    elif len(shape) > 0 and all(isinstance(s, (Sequence, torch.Size)) and not isinstance(s, str) for s in shape):
        shapes = [tuple(int(d) for d in s) for s in shape]
    else:
        raise InputError(f"input shape {shape!r} is not a list of integers; pass e.g. 1,3,224,224")
    for s in shapes:
        if len(s) < 1 or any(d < 1 for d in s[1:]):
            raise InputError(f"input shape {s} needs a batch dimension and positive sizes; pass e.g. 1,3,224,224")
    return shapes


def _as_tuple(x: Any) -> tuple[Any, ...]:
    if isinstance(x, (Tensor, np.ndarray)):
        return (x,)
    return tuple(x)
