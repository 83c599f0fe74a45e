"""Model outputs as named arrays: :func:`flatten_outputs` (pytree order, the order the ONNX
exporters use), :func:`output_name` and the numpy conversion every comparison goes through."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils import _pytree as pytree


def _is_array(x: Any) -> bool:
    return isinstance(x, (Tensor, np.ndarray, np.generic))


def _key_part(k: Any) -> tuple[str, str]:
    if isinstance(k, pytree.SequenceKey):
        return "seq", str(k.idx)
    if isinstance(k, pytree.MappingKey):
        return "map", str(k.key)
    if isinstance(k, pytree.GetAttrKey):
        return "map", str(k.name)
    return "map", str(k).strip(".[]'\"")


def output_name(path: Sequence[Any], root: str = "output") -> str:
    """Name for a pytree key path: ``output``, ``output_0``, ``output_1_0``, ``logits``, ``aux_0``, ``a.b``."""
    if not path:
        return root
    parts = [_key_part(k) for k in path]
    kind, first = parts[0]
    name = f"{root}_{first}" if kind == "seq" else first
    for kind, p in parts[1:]:
        name += f"_{p}" if kind == "seq" else f".{p}"
    return name


def flatten_outputs(obj: Any, root: str = "output") -> list[tuple[str, Any]]:
    """Flatten a tensor / array / nested tuple, list, dict into ``[(name, array_leaf), ...]``.

    Order is pytree order (dict insertion order), the order both ONNX exporters use.
    Non-array leaves (None, Python numbers, strings) are dropped, as the exporters drop them.
    """
    if _is_array(obj):
        return [(root, obj)]
    leaves, _ = pytree.tree_flatten_with_path(obj)
    out: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for path, leaf in leaves:
        if not _is_array(leaf):
            continue
        name = base = output_name(path, root)
        i = 1
        while name in seen:
            name = f"{base}__{i}"
            i += 1
        seen.add(name)
        out.append((name, leaf))
    return out


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2) or x.dtype.is_floating_point and x.element_size() < 2:
            x = x.float()
        return x.resolve_conj().resolve_neg().numpy()
    return np.asarray(x)
