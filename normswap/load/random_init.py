"""Detecting a model whose weights are a random initialisation.

A model built without weights and without a pretrained argument is checked for random weights
(built twice under different seeds, see :func:`normswap.load.load_model`): ``LoadedModel.random_init``
and a note say so, since such a model can match no earlier export.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch

from .specs import _build

PRETRAINED_ARGS = (
    "pretrained",
    "weights",
    "pretrained_weights",
    "pretrained_path",
    "checkpoint_path",
    "checkpoint",
    "ckpt",
    "ckpt_path",
    "weights_path",
    "state_dict",
)
"""Builder arguments that, when set (not None/False/empty), make the builder load trained
weights: torchvision's ``weights=``, timm's ``pretrained`` / ``checkpoint_path`` and the like."""

RANDOM_INIT_NOTE = (
    "weights: random initialisation — pass --weights FILE (or the spec's pretrained argument) "
    "to load trained weights"
)
"""The note :func:`load_model` adds when the model's weights are a random initialisation."""


def _pretrained_arg(args: Mapping[str, Any]) -> str | None:
    """The first of :data:`PRETRAINED_ARGS` given a value that asks for trained weights."""
    for key in PRETRAINED_ARGS:
        value = args.get(key)
        if value is None or value is False or (isinstance(value, (str, int, float)) and not value):
            continue
        return key
    return None


def _rebuilds_differently(spec: str, args: dict[str, Any], model: torch.nn.Module) -> bool | None:
    """Build ``spec`` again under another torch (and Python, numpy) seed and compare its state
    with ``model``'s: True if any value differs (the builder draws its weights at random), False
    if all are equal (it loads or computes them), None if it cannot be told (the second build
    failed, returned the same object, or holds uninitialised lazy/meta tensors).

    The global RNG states are restored afterwards, so the caller's random stream is the same as
    after a single build."""
    import random

    from torch.nn.parameter import UninitializedTensorMixin

    tensors = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    if any(isinstance(v, UninitializedTensorMixin) or v.is_meta for v in tensors.values()):
        return None  # lazy modules / meta tensors: no values to compare yet
    if not any(v.numel() for v in tensors.values()):
        return False  # nothing to initialise
    np_mod = sys.modules.get("numpy")
    py_state = random.getstate()
    np_state = np_mod.random.get_state() if np_mod is not None else None
    try:
        with torch.random.fork_rng(devices=[]):
            seed = (torch.initial_seed() + 0x5EED) % (2**63)
            torch.manual_seed(seed)
            random.seed(seed)
            if np_mod is not None:
                np_mod.random.seed(seed % (2**32))
            other = _build(spec, args)
    except Exception:  # noqa: BLE001 - it built once; a failing second build proves nothing
        return None
    finally:
        random.setstate(py_state)
        if np_mod is not None and np_state is not None:
            np_mod.random.set_state(np_state)
    if other is model:
        return None
    second = {k: v for k, v in other.state_dict().items() if isinstance(v, torch.Tensor)}
    if second.keys() != tensors.keys():
        return True
    try:
        for key, a in tensors.items():
            b = second[key]
            if isinstance(b, UninitializedTensorMixin) or b.is_meta:
                return None
            if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
                return True
    except Exception:  # noqa: BLE001 - e.g. uninitialised lazy parameters
        return None
    return False
