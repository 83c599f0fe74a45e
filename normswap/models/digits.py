"""The bundled default model: a small BatchNorm ResNet for scikit-learn's 8x8 digits.

It is the test bed every normswap pass is exercised on, so it holds the BatchNorm placements a
rewriting tool meets in real networks:

* ``conv -> BN -> ReLU`` (stem, first half of every block),
* ``conv -> BN -> add`` (second half of every block, the BN output feeds a residual add),
* a projection shortcut ``1x1 conv (stride 2) -> BN`` next to an identity shortcut,
* ``Linear (with bias) -> BatchNorm1d -> ReLU`` in the head.

Every channel count is divisible by 32 (GroupNorm's default group count), every BN keeps the
default ``eps``/``momentum``, and the forward pass has no data-dependent control flow, so
``torch.fx.symbolic_trace`` works on it.

The shipped weights (``digits_resnet.safetensors``, metadata in ``digits_resnet.json``) are
produced by ``examples/train_digits.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from normswap.errors import InputError

__all__ = ["BasicBlock", "DigitsResNet", "digits_resnet", "load_digits", "WEIGHTS_PATH", "METADATA_PATH"]

WEIGHTS_PATH = Path(__file__).resolve().parent / "digits_resnet.safetensors"
METADATA_PATH = Path(__file__).resolve().parent / "digits_resnet.json"


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN, plus an identity or 1x1-conv-BN shortcut, add, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A small BatchNorm ResNet for 8x8 digits: ``[N, 1, 8, 8]`` (pixels / 16) -> 10 logits.

    Layout (spatial size in brackets)::

        stem    conv3x3 1->32, BN, ReLU                          [8x8]
        layer1  BasicBlock 32->32, identity shortcut             [8x8]
        layer2  BasicBlock 32->64, stride 2, 1x1-conv-BN shortcut [4x4]
        layer3  BasicBlock 64->64, identity shortcut             [4x4]
        pool    global average pool, flatten                     [64]
        head    Linear 64->128, BatchNorm1d, ReLU, Linear 128->10
    """

    #: The input shape normswap uses to trace / export / check parity on this model.
    normswap_input_shape = (1, 1, 8, 8)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.layer1 = BasicBlock(32, 32)
        self.layer2 = BasicBlock(32, 64, stride=2)
        self.layer3 = BasicBlock(64, 64)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.head = nn.Sequential(
            nn.Linear(64, 128),
            nn.BatchNorm1d(128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.flatten(self.pool(x))
        return self.head(x)


def digits_resnet(pretrained: bool = True) -> DigitsResNet:
    """Build the digits ResNet; with ``pretrained`` load the bundled weights. Returned in eval mode."""
    model = DigitsResNet()
    if pretrained:
        if not WEIGHTS_PATH.is_file():
            raise InputError(
                f"bundled weights missing at {WEIGHTS_PATH}; reinstall normswap or run examples/train_digits.py"
            )
        from safetensors.torch import load_file

        state = load_file(str(WEIGHTS_PATH))
        model.load_state_dict(state, strict=True)
    return model.eval()


def load_digits(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``(X [N,1,8,8] float32 in [0,1], y [N] int64)``.

    ``split`` is ``"train"`` (75 %), ``"test"`` (25 %) or ``"all"``; the split is stratified and
    fixed (``random_state=0``), the same one the bundled weights were trained on.
    """
    if split not in ("train", "test", "all"):
        raise InputError(f"unknown digits split {split!r}; use 'train', 'test' or 'all'")
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise InputError(
            "the digits dataset needs scikit-learn; install it with: pip install 'normswap[train]'"
        ) from None

    data = _sk_load_digits()
    X = torch.from_numpy(data.data.reshape(-1, 1, 8, 8).astype("float32") / 16.0)
    y = torch.from_numpy(data.target.astype("int64"))
    if split == "all":
        return X, y
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.25, random_state=0, stratify=data.target
    )
    idx = torch.from_numpy(idx_train if split == "train" else idx_test)
    return X[idx].contiguous(), y[idx].contiguous()
