"""Running torch models without side effects: eval mode under no_grad with training flags
restored, and inputs / outputs cloned so nothing the caller owns is modified."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree


@contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Put models in eval mode (under no_grad) and restore every submodule's training flag after."""
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        for model in models:
            if model is not None:
                model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in saved:
            m.training = flag


def _clone_inputs(xs: tuple[Any, ...]) -> tuple[Any, ...]:
    """A fresh copy of every tensor, also inside a list of images, so a model that writes into its
    input cannot change what the next run sees."""
    return tuple(pytree.tree_map(lambda x: x.clone() if isinstance(x, Tensor) else x, x) for x in xs)


def _run_torch(model: nn.Module, xs: tuple[Any, ...]) -> Any:
    out = model(*_clone_inputs(xs))
    return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, out)
