"""Where the model runs: ``--device`` resolved against this machine (and torchrun's ``LOCAL_RANK``),
``--amp`` as an autocast context and grad scaler, and the process-group backend that fits.

:func:`normswap.validate.device_name` / :func:`~normswap.validate.amp_name` check the forms without
torch; here each is checked against what exists: :func:`can_run_on` holds every reason a device is
refused, :func:`resolve_device` turns a name into a ``torch.device``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .errors import InputError
from .validate import amp_name, device_name

__all__ = ["Precision", "can_run_on", "resolve_device", "precision", "backend_for", "local_rank", "peak_memory"]


def local_rank() -> int | None:
    """torchrun's ``LOCAL_RANK`` (this process's index on its node) when launched by it, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return None


def can_run_on(name: str) -> str | None:
    """None when ``name`` (a validated ``--device`` value other than ``auto``) can run calibration
    and recovery here, else the one-line reason it cannot."""
    if name == "cpu":
        return None
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            return "--device mps: no Apple GPU (MPS) is available here; pass --device cpu or auto"
        return ("--device mps: calibration sums and agreement measures run in float64, which MPS does not have; "
                "pass --device cpu (or a CUDA GPU)")
    if not torch.cuda.is_available():
        return f"--device {name}: no CUDA GPU is available here (torch.cuda.is_available() is False); pass --device cpu or auto"
    count = torch.cuda.device_count()
    rank = local_rank()
    if name.startswith("cuda:"):
        index = int(name[5:])
        if rank is not None:
            return (f"--device {name} under torchrun would put every rank on one GPU; pass --device cuda "
                    "(each rank takes cuda:LOCAL_RANK)")
        if index >= count:
            return f"--device {name}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})"
    elif rank is not None and rank >= count:
        return (f"torchrun started local rank {rank} but this node has {count} CUDA device(s); "
                f"pass --nproc_per_node {count} or fewer")
    return None


def resolve_device(value: str | torch.device | None) -> torch.device:
    """``auto`` → ``cuda`` when a CUDA GPU is there, else ``cpu``; ``cuda`` → ``cuda:LOCAL_RANK`` under
    torchrun (``cuda:0`` alone); refused devices raise :class:`InputError` (:func:`can_run_on`)."""
    if isinstance(value, torch.device):
        value = str(value)
    name = device_name(value)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    why = can_run_on(name)
    if why is not None:
        raise InputError(why)
    if name == "cuda":
        return torch.device("cuda", local_rank() or 0)
    return torch.device(name)


def backend_for(device: torch.device) -> str:
    """The process-group backend: NCCL for CUDA tensors (gloo beside it for stray CPU ones), gloo on CPU."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


@dataclass(frozen=True)
class Precision:
    """Recovery's arithmetic: float32, or autocast to ``dtype`` (bf16; fp16 with a grad scaler).

    Under autocast the convolutions and matmuls run in the low precision, reductions and the loss in
    float32, and the weights and Adam's state stay float32."""

    name: str | None  # None, "bf16" or "fp16"
    device_type: str = "cpu"

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name or "")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> Any:
        """fp16's loss scaler (its gradients underflow otherwise); None for float32 and bf16."""
        if self.name != "fp16":
            return None
        return torch.amp.GradScaler(self.device_type)

    def describe(self) -> str:
        if self.name is None:
            return "float32"
        extra = " with a grad scaler" if self.name == "fp16" else ""
        return f"{self.name} autocast on {self.device_type}{extra} (weights and optimizer state float32)"


def precision(amp: str | None, device: torch.device) -> Precision:
    """The :class:`Precision` for ``--amp`` on ``device``."""
    return Precision(amp_name(amp), device.type)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated on a CUDA device since the last reset, else None (CPU: see the benchmark)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """``module`` moved to ``device`` for the block and back to where it was after (the caller's
    module is the caller's: use a copy when it must not move)."""
    params = next(iter(module.parameters()), None)
    home = params.device if params is not None else torch.device("cpu")
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)
