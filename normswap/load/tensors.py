"""Sample tensor files (``--samples``, calibration data): ``.pt``, ``.npy``, ``.npz``, ``.safetensors``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .common import _describe_exc, _error, _existing_file, _has_suffix, _natural_key, _show
from .pickles import _torch_load_weights_only

def _read_safetensors(p: Path, what: str, fix: str) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` on the CPU; a bad file is one clear error saying ``fix``."""
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorError and I/O errors
        raise _error(
            f"{what} '{p}' is not a valid safetensors file ({_describe_exc(exc)}); "
            f"it may be truncated or corrupt: {fix}"
        ) from exc


def _one_or_tuple(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """One model input as a tensor, several as the tuple."""
    return tensors[0] if len(tensors) == 1 else tensors


def _check_samples(p: Path, tensors: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    """Every item a tensor with a non-empty, shared leading (batch) dimension."""
    if not tensors:
        raise _error(f"sample file '{p}' holds no tensors; save at least one batch of inputs")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise _error(
                f"sample file '{p}': item {i} is a {type(t).__name__}, not a tensor; save tensors only"
            )
        if t.dim() == 0:
            raise _error(f"sample file '{p}' holds a scalar; samples need a leading batch dimension")
        if t.shape[0] == 0:
            raise _error(f"sample file '{p}' holds 0 samples (shape {tuple(t.shape)}); save at least one")
    batches = {int(t.shape[0]) for t in tensors}
    if len(batches) > 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
        raise _error(
            f"sample file '{p}': the inputs have different batch sizes ({shapes}); give every "
            "input the same number of samples"
        )
    return tuple(tensors)


def _from_numpy(p: Path, arr: Any) -> torch.Tensor:
    import numpy as np

    try:
        arr = np.asarray(arr, dtype=arr.dtype.newbyteorder("="))
        return torch.from_numpy(np.ascontiguousarray(arr))
    except Exception as exc:  # noqa: BLE001 - e.g. string arrays
        raise _error(
            f"sample file '{p}' holds an array of dtype {arr.dtype} that torch cannot use "
            f"({_describe_exc(exc)}); save numeric arrays"
        ) from exc


def load_tensor_file(path: str | Path) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Read example inputs (``--samples``, calibration data) without running code.

    * ``.pt``/``.pth``: ``torch.load(weights_only=True)`` of a tensor, a tuple/list of tensors
      (one per model input), or a dict holding exactly one tensor;
    * ``.npy``: ``numpy.load(allow_pickle=False)``;
    * ``.npz``/``.safetensors``: one array/tensor, or several -> a tuple ordered by key name with
      digit runs compared as numbers (``x0, x1, ..., x10``).

    The leading dimension is the batch: it must be non-zero and shared by all inputs.
    Returns a tensor for one input, a tuple for several.
    """
    p = _existing_file(path, "sample file")
    if _has_suffix(p, (".pt", ".pth")):
        obj: Any = _torch_load_weights_only(p, "sample file")
        if isinstance(obj, Mapping):
            tensors = [(str(k), v) for k, v in obj.items() if isinstance(v, torch.Tensor)]
            if len(tensors) != 1:
                raise _error(
                    f"sample file '{p}' holds a dict with {len(tensors)} tensors "
                    f"({_show([k for k, _ in tensors])}); save a single tensor, or a tuple with "
                    "one tensor per model input"
                )
            obj = tensors[0][1]
        if isinstance(obj, (torch.Tensor, tuple, list)):
            return _one_or_tuple(_check_samples(p, [obj] if isinstance(obj, torch.Tensor) else list(obj)))
        raise _error(
            f"sample file '{p}' holds a {type(obj).__name__}; save a tensor or a tuple of tensors"
        )
    if _has_suffix(p, (".npy", ".npz")):
        import numpy as np

        try:
            with open(p, "rb") as fh:
                loaded = np.load(fh, allow_pickle=False)
                if isinstance(loaded, np.ndarray):
                    arrays = [loaded]
                else:
                    with loaded:
                        arrays = [loaded[k] for k in sorted(loaded.files, key=_natural_key)]
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, ValueError) and "allow_pickle" in str(exc):
                raise _error(
                    f"sample file '{p}' holds Python objects (pickled), which are refused; save "
                    "a numeric array"
                ) from exc
            raise _error(
                f"sample file '{p}' is not a valid numpy file ({_describe_exc(exc)}); it may be "
                "truncated or corrupt: re-save it"
            ) from exc
        return _one_or_tuple(_check_samples(p, [_from_numpy(p, a) for a in arrays]))
    if _has_suffix(p, (".safetensors",)):
        loaded_st = _read_safetensors(p, "sample file", "re-save it")
        return _one_or_tuple(_check_samples(p, [loaded_st[k] for k in sorted(loaded_st, key=_natural_key)]))
    raise _error(f"sample file '{p}' has an unknown extension; use .pt, .npy, .npz or .safetensors")
