"""A bundled InstanceNorm network whose per-sample statistics carry the signal: a digits classifier made
contrast- and brightness-invariant by instance normalization (IBN-Net's recipe: InstanceNorm early for
appearance invariance, GroupNorm later).

Every image reaches the model with its own random **gain and offset** (:func:`jitter`): ``g · x + b``,
``g`` log-uniform in [1/4, 4] (a 16× range of contrast), ``b`` uniform in [−1, 1] (brightness; the digits'
pixels are in [0, 1]). The stem's ``InstanceNorm2d`` divides each sample's channels by their own spatial
statistics, so it removes the gain and offset exactly (the stem conv pads by replication, so
``conv(g·x + b) = g·conv(x) + b·Σw`` everywhere, the border included). No fixed per-channel affine can do
that: this norm *cannot become an affine*, and ``--to fold --calib`` must say so and keep it.

Layout (spatial size in brackets)::

    stem   conv3x3 1->32 (replicate padding), InstanceNorm2d(32, affine), ReLU   [8x8]
    c2     conv3x3 32->64 stride 2, InstanceNorm2d(64, affine), ReLU              [4x4]
    c3     conv3x3 64->64, GroupNorm(8, 64), ReLU                                 [4x4]
    pool   global average pool, flatten                                           [64]
    head   Linear 64->10 (logits)

Data: the digits split of :func:`normswap.models.digits.load_digits` (75 % / 25 %, stratified,
``random_state=0``), each split jittered with its own fixed seed (:func:`load_jittered`); ``calib`` and
``heldout`` name them for ``--calib`` / ``--heldout``. Training (``examples/train_contrast.py``) draws
fresh gains and offsets every epoch; the shipped weights are ``contrast_in.safetensors`` with metadata
``contrast_in.json``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from normswap.errors import InputError

__all__ = ["MAX_GAIN", "MAX_OFFSET", "METADATA_PATH", "SPLIT_SEEDS", "WEIGHTS_PATH", "ContrastINCNN", "calib", "contrast_in", "heldout",
           "jitter", "load_jittered"]

WEIGHTS_PATH = Path(__file__).resolve().parent / "contrast_in.safetensors"
METADATA_PATH = Path(__file__).resolve().parent / "contrast_in.json"

#: the gain is log-uniform in [1/MAX_GAIN, MAX_GAIN]; the offset uniform in [-MAX_OFFSET, MAX_OFFSET]
MAX_GAIN = 4.0
MAX_OFFSET = 1.0
#: seeds of the fixed jitter of each split (training also draws fresh ones every epoch)
SPLIT_SEEDS = {"train": 111, "test": 222, "all": 333}


class ContrastINCNN(nn.Module):
    """``[N, 1, 8, 8]`` digits under any gain and offset -> ``[N, 10]`` logits (layout in the module docstring)."""

    normswap_input_shape = (1, 1, 8, 8)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, padding_mode="replicate", bias=False),
                                  nn.InstanceNorm2d(32, affine=True), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False),
                                nn.InstanceNorm2d(64, affine=True), nn.ReLU())
        self.c3 = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.GroupNorm(8, 64), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.c3(self.c2(self.stem(x))))))


def contrast_in(pretrained: bool = True) -> ContrastINCNN:
    """Build the contrast-invariant InstanceNorm CNN; with ``pretrained`` the bundled weights. Eval mode."""
    from .digits_norms import load_bundled

    model = ContrastINCNN()
    if pretrained:
        load_bundled(model, WEIGHTS_PATH, "examples/train_contrast.py")
    return model.eval()


def jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``g · x + b`` per sample, ``g`` log-uniform in [1/:data:`MAX_GAIN`, :data:`MAX_GAIN`] and ``b``
    uniform in [−:data:`MAX_OFFSET`, :data:`MAX_OFFSET`], both drawn from ``gen``."""
    n = x.shape[0]
    gain = torch.exp((torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * math.log(MAX_GAIN))
    offset = (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * MAX_OFFSET
    return (x * gain + offset).contiguous()


def load_jittered(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """``(X [N,1,8,8], y [N])``: the digits split ``train`` / ``test`` / ``all`` with its fixed seeded jitter."""
    from .digits import load_digits

    if split not in SPLIT_SEEDS:
        raise InputError(f"unknown split {split!r}; use 'train', 'test' or 'all'")
    x, y = load_digits(split)
    return jitter(x, torch.Generator().manual_seed(SPLIT_SEEDS[split])), y


def calib() -> list[torch.Tensor]:
    """Unlabeled calibration inputs: the jittered training split in batches of 64 (for ``--calib``)."""
    return list(load_jittered("train")[0].split(64))


def heldout() -> list[torch.Tensor]:
    """The jittered test split in batches of 64 (for ``--heldout``), never used in training or calibration."""
    return list(load_jittered("test")[0].split(64))
