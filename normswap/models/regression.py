"""A bundled regression model: a small BatchNorm CNN that reads how a digit was rotated and scaled.

It is the test bed for keeping the trained function of a model whose output is *regression
values* (identity output, no link; issue 12). The data are scikit-learn's 8x8 digits, each
enlarged to 12x12 (bilinear), padded to 16x16 and then rotated by an angle θ ∈ [−45°, 45°] and
scaled by s ∈ [0.8, 1.25] (log-uniform) about the centre; the model regresses both:

    target = (θ / 45°, log(s) / log(1.25))      each in [−1, 1]

The transforms are drawn from a seeded generator per split, so the train / test sets are fixed
(:func:`load_rotated`); the split of the digits themselves is the digits ResNet's
(:func:`normswap.models.digits.load_digits`: 75 % / 25 %, stratified, ``random_state=0``).
Training (``examples/train_regression.py``) draws fresh transforms of the training digits every
epoch; the shipped weights are ``regression_cnn.safetensors`` with metadata ``regression_cnn.json``.

Layout: ``conv -> BN -> ReLU`` three times (the last two with stride 2), flatten (the spatial layout
carries the orientation), ``Linear -> BatchNorm1d -> ReLU -> Linear`` (2 outputs, identity).

:func:`regression_gn` is the same network *trained* with ``GroupNorm(8, C)`` at the conv sites and
``GroupNorm(8, 64)`` on the head's features in place of the BatchNorm1d
(``examples/train_regression.py --norm gn``; ``regression_gn.safetensors`` / ``.json``): the regression
test bed for ``--to fold --calib``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from normswap.errors import InputError

__all__ = [
    "MAX_ANGLE_DEG",
    "MAX_SCALE",
    "METADATA_PATH",
    "GN_WEIGHTS_PATH",
    "WEIGHTS_PATH",
    "RegressionCNN",
    "calib",
    "heldout",
    "load_rotated",
    "regression_cnn",
    "regression_gn",
    "regression_quality",
    "transform_digits",
]

WEIGHTS_PATH = Path(__file__).resolve().parent / "regression_cnn.safetensors"
METADATA_PATH = Path(__file__).resolve().parent / "regression_cnn.json"
GN_WEIGHTS_PATH = Path(__file__).resolve().parent / "regression_gn.safetensors"

MAX_ANGLE_DEG = 45.0
MAX_SCALE = 1.25
#: seeds of the fixed transforms of each split (training also draws fresh ones every epoch)
SPLIT_SEEDS = {"train": 101, "test": 202, "all": 303}


class RegressionCNN(nn.Module):
    """``[N, 1, 16, 16]`` -> ``[N, 2]`` = (θ / 45°, log s / log 1.25).

    Layout (spatial size in brackets)::

        stem   conv3x3 1->32, BN, ReLU                   [16x16]
        c2     conv3x3 32->64 stride 2, BN, ReLU         [8x8]
        c3     conv3x3 64->32 stride 2, BN, ReLU         [4x4]
        flatten                                          [512]
        head   Linear 512->64, BatchNorm1d, ReLU, Linear 64->2 (identity output)
    """

    normswap_input_shape = (1, 1, 16, 16)
    #: What the output is (:mod:`normswap.keep.kinds`): real values — [N, 2] unbounded would otherwise be
    #: detected as class logits.
    normswap_output_kind = "regression"

    def __init__(self, num_outputs: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.c3 = nn.Sequential(nn.Conv2d(64, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.flatten = nn.Flatten(1)
        self.head = nn.Sequential(nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.c3(self.c2(self.stem(x)))))


def regression_cnn(pretrained: bool = True) -> RegressionCNN:
    """Build the regression CNN; with ``pretrained`` load the bundled weights. Returned in eval mode."""
    model = RegressionCNN()
    if pretrained:
        if not WEIGHTS_PATH.is_file():
            raise InputError(
                f"bundled weights missing at {WEIGHTS_PATH}; reinstall normswap or run examples/train_regression.py"
            )
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(WEIGHTS_PATH)), strict=True)
    return model.eval()


def regression_gn(pretrained: bool = True) -> RegressionCNN:
    """The regression CNN trained with ``GroupNorm(8, C)`` in place of every BatchNorm (the head's
    BatchNorm1d(64) too: ``GroupNorm(8, 64)`` on its features); with ``pretrained`` the bundled weights
    trained that way. Returned in eval mode."""
    from .digits_norms import load_bundled, replace_batchnorms

    model = replace_batchnorms(RegressionCNN(), lambda c: nn.GroupNorm(8, c), lambda c: nn.GroupNorm(8, c))
    if pretrained:
        load_bundled(model, GN_WEIGHTS_PATH, "examples/train_regression.py --norm gn")
    return model.eval()


def transform_digits(x8: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N,1,8,8]`` digits -> (``[N,1,16,16]`` rotated and scaled images, ``[N,2]`` targets), the
    transforms drawn from ``gen``."""
    n = x8.shape[0]
    x = F.interpolate(x8, size=(12, 12), mode="bilinear", align_corners=False)
    x = F.pad(x, (2, 2, 2, 2))
    u = torch.rand(n, 2, generator=gen) * 2 - 1  # both in [-1, 1]
    theta = u[:, 0] * math.radians(MAX_ANGLE_DEG)
    scale = torch.exp(u[:, 1] * math.log(MAX_SCALE))
    # affine_grid maps output coordinates to input ones: the inverse of "rotate by θ, scale by s"
    cos, sin = torch.cos(theta) / scale, torch.sin(theta) / scale
    mat = torch.stack([torch.stack([cos, sin, torch.zeros(n)], 1), torch.stack([-sin, cos, torch.zeros(n)], 1)], 1)
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.contiguous(), u.contiguous()


def load_rotated(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """``(X [N,1,16,16], Y [N,2])`` for the digits split ``train`` / ``test`` / ``all``, with the
    split's fixed seeded transforms."""
    from .digits import load_digits

    if split not in SPLIT_SEEDS:
        raise InputError(f"unknown split {split!r}; use 'train', 'test' or 'all'")
    x8, _ = load_digits(split)
    return transform_digits(x8, torch.Generator().manual_seed(SPLIT_SEEDS[split]))


def calib() -> list[torch.Tensor]:
    """Unlabeled calibration inputs: the training split's transformed images in batches of 64."""
    x, _ = load_rotated("train")
    return list(x.split(64))


def heldout() -> list[torch.Tensor]:
    """The test split's transformed images in batches of 64 (for ``--heldout``)."""
    x, _ = load_rotated("test")
    return list(x.split(64))


@torch.no_grad()
def regression_quality(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Ground-truth quality: R² (mean over the two outputs), RMSE, and the mean absolute angle error
    in degrees."""
    model.eval()
    p = model(x)
    ss_res = ((p - y) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    return {
        "r2": float((1 - ss_res / ss_tot).mean()),
        "rmse": float(((p - y) ** 2).mean().sqrt()),
        "angle_mae_deg": float((p[:, 0] - y[:, 0]).abs().mean() * MAX_ANGLE_DEG),
    }
