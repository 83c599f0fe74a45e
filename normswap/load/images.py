"""Image folders at real size: preprocessing, a DataLoader with workers, and sharding under torchrun.

* **Layout**: flat (``folder/*.jpg``) or ImageFolder (``folder/<class>/*.jpg``, any depth); files are
  found recursively and sorted by path. Files without an image suffix are ignored (counted);
  class folders are only a layout here (calibration is label-free).
* **Preprocessing** (:class:`Preprocess`): convert to RGB (grayscale is replicated, an alpha channel
  is dropped) or L for a 1-channel model; resize so the short side is ``size / crop`` (bilinear);
  center-crop ``size``; scale to [0, 1]; ``(x − mean) / std``. Defaults come from the model's own
  preprocessing config: timm's ``pretrained_cfg`` (``input_size``, ``crop_pct``, ``mean``, ``std``),
  else torchvision's weights for the model builder the spec names (their ``transforms()``: resize
  256 → crop 224, ImageNet mean/std), else the model's input shape with crop 1, mean 0, std 1.
  What was used, and where each value came from, is in :meth:`Preprocess.describe`.
* **Loading**: a ``torch.utils.data.DataLoader`` with ``workers`` processes (kept alive between
  passes), pinned memory when the model runs on CUDA. Memory is bounded by the batch (and the
  loader's prefetch of 2 batches per worker), never by the folder.
* **Unreadable files** (a corrupt JPEG, a text file named ``.png``) are skipped and counted, and the
  first one is named in the report; a folder of which no image can be read is refused.
* **Under torchrun** each rank decodes only its contiguous slice of every batch
  (:class:`ShardedBatchSampler`: every sample exactly once over the ranks) and the slices are
  all-gathered, so every rank holds the same batches as one process would: calibration sums, the
  held-out split and recovery's sharding stay exactly those of one process, and decoding is divided
  by the number of ranks at the cost of one all-gather of the input batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data import IMAGE_SUFFIXES
from ..errors import InputError

__all__ = ["Preprocess", "ImageFiles", "ImageFolderData", "ShardedBatchSampler", "image_files", "preprocess_for"]

IMAGENET_CROP = 0.875


@dataclass(frozen=True)
class Preprocess:
    """What turns an image file into a model input (module docstring), and where each value came from."""

    size: tuple[int, int]
    crop: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def resize(self) -> int:
        """The short side before the center crop: ``round(min(size) / crop)``."""
        return max(min(self.size), round(min(self.size) / self.crop))

    def describe(self) -> str:
        by: dict[str, list[str]] = {}
        for k in ("size", "crop", "mean", "std"):
            by.setdefault(self.sources.get(k, "default"), []).append(k)
        whence = "; ".join(f"{', '.join(ks)} from {src}" for src, ks in by.items())
        fmt = lambda v: ",".join(f"{x:g}" for x in v)  # noqa: E731
        return (f"short side resized to {self.resize}, center crop {self.size[0]}x{self.size[1]} (crop {self.crop:g}), "
                f"{'L' if self.channels == 1 else 'RGB'}, mean {fmt(self.mean)}, std {fmt(self.std)} ({whence})")

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size), "resize": self.resize, "crop": self.crop, "mean": list(self.mean),
                "std": list(self.std), "channels": self.channels, "sources": dict(self.sources), "description": self.describe()}

    def load(self, path: Path) -> Tensor:
        """One image as a normalized ``[C, H, W]`` float32 tensor (raises what PIL raises)."""
        from PIL import Image

        h, w = self.size
        with Image.open(path) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            iw, ih = im.size
            scale = self.resize / min(iw, ih)
            nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
            im = im.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - w) // 2, (nh - h) // 2
            im = im.crop((left, top, left + w, top + h))
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        x = data.reshape(h, w, self.channels).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(self.mean, dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).reshape(-1, 1, 1)
        return (x - mean) / std


def _timm_cfg(model: nn.Module | None) -> Mapping[str, Any]:
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Mapping) and cfg.get("input_size"):
            return cfg
    return {}


def _torchvision_cfg(spec: str | None) -> tuple[dict[str, Any], str] | None:
    """torchvision's preprocessing for ``torchvision.models[.sub]:builder``: its default weights'
    ``transforms()`` (metadata only: nothing is downloaded)."""
    if not isinstance(spec, str) or not spec.startswith("torchvision.models") or ":" not in spec:
        return None
    name = spec.rsplit(":", 1)[1]
    try:
        from torchvision.models import get_model_weights

        weights = get_model_weights(name).DEFAULT
        t = weights.transforms()
        crop = int(t.crop_size[0])
        resize = int(t.resize_size[0])
        return ({"size": (crop, crop), "crop": crop / resize, "mean": tuple(t.mean), "std": tuple(t.std)},
                f"torchvision {weights} transforms")
    except Exception:  # noqa: BLE001 - not a torchvision classification builder, or no such metadata
        return None


def preprocess_for(
    model: nn.Module | None, *, size: Sequence[int] | int | None = None, crop: float | None = None,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None, spec: str | None = None,
) -> Preprocess:
    """The :class:`Preprocess` for ``model``: the given values, else its own config (module docstring)."""
    from . import _input_shape

    cfg, cfg_name = dict(_timm_cfg(model)), "the model's timm pretrained_cfg"
    if cfg:
        cfg = {"size": tuple(int(s) for s in cfg["input_size"][-2:]), "crop": float(cfg.get("crop_pct", IMAGENET_CROP)),
               "mean": cfg.get("mean"), "std": cfg.get("std"), "channels": int(cfg["input_size"][0])}
    else:
        tv = _torchvision_cfg(spec)
        if tv is not None:
            cfg, cfg_name = tv
    shape = _input_shape(model) if model is not None else None
    channels = int(cfg.get("channels") or (shape[1] if shape is not None and len(shape) == 4 else 3))
    if channels not in (1, 3):
        raise InputError(f"the model takes {channels}-channel inputs; image folders give 1 (L) or 3 (RGB) channels")
    sources: dict[str, str] = {}

    def pick(key: str, given: Any, fallback: Any, fallback_name: str) -> Any:
        if given is not None:
            sources[key] = f"--{key}"
            return given
        if cfg.get(key) is not None:
            sources[key] = cfg_name
            return cfg[key]
        sources[key] = fallback_name
        return fallback

    own = (int(shape[2]), int(shape[3])) if shape is not None and len(shape) == 4 else None
    hw = pick("size", None if size is None else ((size, size) if isinstance(size, int) else tuple(size)), own,
              "the model's input shape")
    if hw is None:
        raise InputError("cannot tell the image size the model takes; pass --size (e.g. 224)")
    c = float(pick("crop", crop, 1.0, "default (no crop)"))
    m = tuple(float(v) for v in pick("mean", mean, (0.0,) * channels, "default (mean 0)"))
    s = tuple(float(v) for v in pick("std", std, (1.0,) * channels, "default (std 1)"))
    for key, v in (("mean", m), ("std", s)):
        if len(v) not in (1, channels):
            raise InputError(f"--{key} has {len(v)} values but the model takes {channels} channel(s); give 1 or {channels}")
    if min(s) <= 0:
        raise InputError("--std has a zero or negative entry; every channel needs a positive std")
    if channels == 3 and len(m) == 1:
        m = m * 3
    if channels == 3 and len(s) == 1:
        s = s * 3
    return Preprocess(size=(int(hw[0]), int(hw[1])), crop=c, mean=m, std=s, channels=channels, sources=sources)


def image_files(folder: Path) -> tuple[list[Path], int]:
    """The image files under ``folder`` (recursive, sorted by path) and how many other files were ignored."""
    files, other = [], 0
    for p in folder.rglob("*"):
        if p.is_file():
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
                files.append(p)
            else:
                other += 1
    return sorted(files), other


class ImageFiles(torch.utils.data.Dataset):
    """``files[i]`` preprocessed: ``(image [C, H, W], "")``, or ``(zeros, "path: reason")`` when it cannot
    be read (the loader drops those rows; a worker never raises into the main process)."""

    def __init__(self, files: Sequence[Path], pre: Preprocess) -> None:
        self.files, self.pre = list(files), pre

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        p = self.files[i]
        try:
            return self.pre.load(p), ""
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
            why = (str(e).splitlines() or [""])[0][:120]
            return torch.zeros(self.pre.channels, *self.pre.size), f"{p}: {type(e).__name__}{': ' + why if why else ''}"


class ShardedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of ``batch`` consecutive indices of ``range(n)``; each rank gets its contiguous slice of
    every batch (sizes differ by at most one, as :func:`normswap.load.data.shard` slices), so over the
    ranks every index comes exactly once and, concatenated in rank order, in order."""

    def __init__(self, n: int, batch: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch, self.rank, self.world = n, batch, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, self.n, self.batch):
            size = min(self.batch, self.n - start)
            base, extra = divmod(size, self.world)
            lo = start + self.rank * base + min(self.rank, extra)
            yield list(range(lo, lo + base + (1 if self.rank < extra else 0)))

    def __len__(self) -> int:
        return (self.n + self.batch - 1) // self.batch


class _Collate:
    """Stack a batch's images and list their errors (an empty slice, when a batch has fewer images than
    ranks, is an empty ``[0, C, H, W]``)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __call__(self, items: list[tuple[Tensor, str]]) -> tuple[Tensor, list[str]]:
        if not items:
            return torch.zeros(0, *self.shape), []
        return torch.stack([x for x, _ in items]), [e for _, e in items]


def _gather(x: Tensor, bad: int, device: torch.device) -> tuple[Tensor, int]:
    """All ranks' slices of one batch, concatenated in rank order, and the ranks' total of unreadable files."""
    import torch.distributed as dist

    world = dist.get_world_size()
    x = x.to(device, non_blocking=True)
    counts = torch.tensor([x.shape[0], bad], dtype=torch.int64, device=device)
    every = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(every, counts)
    sizes = [int(c[0]) for c in every]
    most = max(sizes)
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)]), sum(int(c[1]) for c in every)


class ImageFolderData:
    """The batch source of a folder (see the module docstring): yields ``(images,)`` with at most
    ``batch`` images; records what it skipped in :attr:`skipped` and :attr:`first_bad`."""

    def __init__(self, folder: Path, files: list[Path], pre: Preprocess, *, batch: int, workers: int = 0,
                 pin_memory: bool = False, device: torch.device | None = None, ignored: int = 0) -> None:
        self.folder, self.files, self.pre, self.batch = folder, files, pre, batch
        self.workers, self.pin_memory, self.device, self.ignored = workers, pin_memory, device, ignored
        self.skipped, self.first_bad = 0, None  # from the latest complete pass
        self._idle: list[Any] = []  # DataLoaders whose (persistent) workers no pass is using
        self._rank, self._world = 0, 1

    def _make_loader(self) -> Any:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            self._rank, self._world = dist.get_rank(), dist.get_world_size()
        sampler = ShardedBatchSampler(len(self.files), self.batch, self._rank, self._world)
        return torch.utils.data.DataLoader(
            ImageFiles(self.files, self.pre), batch_sampler=sampler, num_workers=self.workers, collate_fn=_Collate((self.pre.channels, *self.pre.size)),
            pin_memory=self.pin_memory, persistent_workers=self.workers > 0)

    def __iter__(self) -> Iterator[tuple[Tensor]]:
        # a pass takes an idle loader (its workers stay alive between passes) or makes one: passes may
        # nest (recovery's held-out evaluation inside its cycle over the data), and a DataLoader with
        # persistent workers serves one pass at a time
        loader = self._idle.pop() if self._idle else self._make_loader()
        try:
            yield from self._batches(loader)
        finally:
            self._idle.append(loader)

    def _batches(self, loader: Any) -> Iterator[tuple[Tensor]]:
        skipped, first, good = 0, None, 0
        for x, errors in loader:
            bad = [e for e in errors if e]
            if bad:
                first = first or bad[0]
                keep = torch.tensor([not e for e in errors])
                x = x[keep]
            if self._world > 1:
                x, nbad = _gather(x, len(bad), self.device or torch.device("cpu"))
            else:
                nbad = len(bad)
            skipped += nbad
            if x.shape[0]:
                good += x.shape[0]
                yield (x,)
        self.skipped, self.first_bad = skipped, first
        if good == 0:
            where = f" (first: {first})" if first else ""
            raise InputError(f"no image in {self.folder} could be read{where}; check the files")

    def to_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "pin_memory": self.pin_memory, "images": len(self.files),
                "ignored_files": self.ignored, "unreadable_skipped": self.skipped, "first_unreadable": self.first_bad,
                "sharded_over_ranks": self._world, "preprocessing": self.pre.to_dict()}
