"""Where a job's calibration and recovery run (``--device``, ``--amp``) and how its data is read
(``--workers``, ``--size/--crop/--mean/--std``): one object the jobs share, and the report's record of it.

Calibration, recovery and the agreement measures run on the device; the rewrite, the ONNX export
and the parity verdict stay on the CPU in float32, judged against a float64 reference (the rules of
:mod:`normswap.parity`), whatever ``--device`` says.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Iterator

__all__ = ["Runtime", "runtime_for", "PARITY_RULE"]

PARITY_RULE = "on the CPU in float32 against a float64 reference (noise-floor rule), whatever --device says"


@dataclass
class Runtime:
    """The validated ``--device`` / ``--amp`` / ``--workers`` / image options of one job."""

    device: Any  # torch.device
    precision: Any  # normswap.devices.Precision
    workers: int = 0
    image: dict[str, Any] = field(default_factory=dict)  # size, crop, mean, std (None = the model's own)
    world: int = 1
    backend: str | None = None

    def loader(self, spec: str | None) -> dict[str, Any]:
        """The image-folder options of :func:`normswap.load.data.calibration_batches` (``--calib`` and ``--heldout`` alike)."""
        return {"workers": self.workers, "pin_memory": self.device.type == "cuda", "device": self.device,
                "model_spec": spec, **self.image}

    def batches(self, calib: Any, *, samples: int | None, batch: int, model: Any, spec: str | None) -> Any:
        """``calib`` as :func:`normswap.load.data.calibration_batches` reads it, with this runtime's loader options."""
        from normswap.load.data import calibration_batches

        return calibration_batches(calib, samples=samples, batch=batch, model=model, **self.loader(spec))

    @contextlib.contextmanager
    def place(self, original: Any, student: Any) -> Iterator[Any]:
        """The teacher on the device (a copy when it must move: the caller's model never does) and the
        student moved there for the block, then back to the CPU for export and parity."""
        from normswap.devices import on_device

        if self.device.type == "cpu":
            yield original
            return
        teacher = copy.deepcopy(original).to(self.device)
        with on_device(student, self.device):
            yield teacher
        del teacher
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def to_dict(self, data: Any = None) -> dict[str, Any]:
        out: dict[str, Any] = {"device": str(self.device), "precision": self.precision.describe(),
                               "processes": self.world, "parity": PARITY_RULE}
        if self.backend is not None:
            out["backend"] = self.backend
        loader = getattr(data, "loader", None)
        if loader is not None:
            info = loader.to_dict()
            out.update(workers=info["workers"], pin_memory=info["pin_memory"], preprocessing=info["preprocessing"]["description"],
                       unreadable_skipped=info["unreadable_skipped"], first_unreadable=info["first_unreadable"],
                       ignored_files=info["ignored_files"])
        elif data is not None:
            out["workers"] = "none (in-memory data)"
        return out

    @staticmethod
    def line(info: dict[str, Any]) -> str:
        """The report's one line: ``ran on cpu · precision … · workers … · preprocessing …``."""
        parts = [f"ran on {info['device']}" + (f" × {info['processes']} processes ({info.get('backend')})" if info["processes"] > 1 else ""),
                 f"recovery precision {info['precision']}"]
        if "workers" in info:
            parts.append(f"data workers {info['workers']}")
        if "preprocessing" in info:
            parts.append(f"preprocessing: {info['preprocessing']}")
        if info.get("unreadable_skipped"):
            parts.append(f"skipped {info['unreadable_skipped']} unreadable image(s), first {info['first_unreadable']}")
        if info.get("ignored_files"):
            parts.append(f"ignored {info['ignored_files']} non-image file(s)")
        parts.append(f"parity {info['parity']}")
        return " · ".join(parts)


def runtime_for(device: Any = None, amp: str | None = None, workers: int | None = 0, *, size: Any = None,
                crop: Any = None, mean: Any = None, std: Any = None) -> Runtime:
    """The :class:`Runtime` for the options (torch-free forms checked by
    :func:`normswap.validate.runtime_options` first); the device resolved against this machine."""
    from normswap import validate
    from normswap.devices import precision, resolve_device

    dev = resolve_device(device)
    image = {"size": validate.image_size(size), "crop": validate.crop_fraction(crop),
             "mean": validate.float_list(mean, "--mean"), "std": validate.float_list(std, "--std", positive=True)}
    world, backend = 1, None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world, backend = dist.get_world_size(), str(dist.get_backend())
    return Runtime(device=dev, precision=precision(amp, dev), workers=int(workers or 0), image=image, world=world,
                   backend=backend)
