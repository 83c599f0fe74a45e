"""A bundled sigmoid-output model: a small BatchNorm CNN that tags scikit-learn's 8x8 digits with
five binary attributes at once (multi-label; the forward ends in ``torch.sigmoid(Linear(...))``).

It is the test bed for keeping the trained function of a model whose output is *probabilities*, not
logits (issue 12). The attributes are derived from the digit label and overlap (a 6 is even,
≥ 5, a multiple of 3 and has a closed loop), so the problem is genuinely multi-label:

===================  ==========================  =============================
attribute            true for digits             fraction of digits
===================  ==========================  =============================
``is_even``          0 2 4 6 8                   0.5
``is_at_least_5``    5 6 7 8 9                   0.5
``is_prime``         2 3 5 7                     0.4
``has_closed_loop``  0 6 8 9                     0.4
``is_multiple_of_3`` 0 3 6 9                     0.4
===================  ==========================  =============================

The network holds the BatchNorm placements that matter for a batch-independent swap:

* ``conv -> BN -> ReLU`` (stem, third conv),
* ``conv -> ReLU -> max-pool -> BN`` — a BN whose input is non-negative, pooled activations (the
  placement where per-group statistics differ most from BN's, and ``gn-ws`` has no conv to
  standardize),
* a global average pool, then ``Linear -> sigmoid``.

The shipped weights (``multilabel_cnn.safetensors``, metadata in ``multilabel_cnn.json``) are
produced by ``examples/train_multilabel.py`` on the same fixed split as the digits ResNet
(:func:`normswap.models.digits.load_digits`: 75 % train, 25 % test, stratified, ``random_state=0``).

:func:`multilabel_gn` is the same network *trained* with ``GroupNorm(8, C)`` wherever the BatchNorms are
(``examples/train_multilabel.py --norm gn``; ``multilabel_gn.safetensors`` / ``.json``): the sigmoid-output
test bed for ``--to fold --calib``, which fits those GroupNorms as affines and folds them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from normswap.errors import InputError

__all__ = [
    "ATTRIBUTES",
    "METADATA_PATH",
    "GN_WEIGHTS_PATH",
    "WEIGHTS_PATH",
    "MultiLabelCNN",
    "attributes_of",
    "calib",
    "heldout",
    "label_accuracy",
    "load_multilabel",
    "multilabel_cnn",
    "multilabel_gn",
]

WEIGHTS_PATH = Path(__file__).resolve().parent / "multilabel_cnn.safetensors"
METADATA_PATH = Path(__file__).resolve().parent / "multilabel_cnn.json"
GN_WEIGHTS_PATH = Path(__file__).resolve().parent / "multilabel_gn.safetensors"

#: attribute name -> the digits for which it is true
ATTRIBUTES: dict[str, tuple[int, ...]] = {
    "is_even": (0, 2, 4, 6, 8),
    "is_at_least_5": (5, 6, 7, 8, 9),
    "is_prime": (2, 3, 5, 7),
    "has_closed_loop": (0, 6, 8, 9),
    "is_multiple_of_3": (0, 3, 6, 9),
}


class MultiLabelCNN(nn.Module):
    """``[N, 1, 8, 8]`` (pixels / 16) -> ``[N, 5]`` probabilities, one per attribute.

    Layout (spatial size in brackets)::

        stem   conv3x3 1->32, BN, ReLU                      [8x8]
        down   conv3x3 32->64, ReLU, max-pool 2, BN         [4x4]   BN after ReLU + pool
        mid    conv3x3 64->64, BN, ReLU                     [4x4]
        pool   global average pool, flatten                 [64]
        head   Linear 64->5, sigmoid
    """

    #: The input shape normswap uses to trace / export / check parity on this model.
    normswap_input_shape = (1, 1, 8, 8)
    #: What the output is (:mod:`normswap.keep.kinds`): independent sigmoid probabilities.
    normswap_output_kind = "multilabel"

    def __init__(self, num_labels: int = len(ATTRIBUTES)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.down = nn.Sequential(
            nn.Conv2d(32, 64, 3, padding=1, bias=True),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(64),
        )
        self.mid = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.head = nn.Linear(64, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.down(self.stem(x)))
        return torch.sigmoid(self.head(self.flatten(self.pool(x))))


def multilabel_cnn(pretrained: bool = True) -> MultiLabelCNN:
    """Build the multi-label CNN; with ``pretrained`` load the bundled weights. Returned in eval mode."""
    model = MultiLabelCNN()
    if pretrained:
        if not WEIGHTS_PATH.is_file():
            raise InputError(
                f"bundled weights missing at {WEIGHTS_PATH}; reinstall normswap or run examples/train_multilabel.py"
            )
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(WEIGHTS_PATH)), strict=True)
    return model.eval()


def multilabel_gn(pretrained: bool = True) -> MultiLabelCNN:
    """The multi-label CNN trained with ``GroupNorm(8, C)`` in place of every BatchNorm (also the one after
    ReLU + max-pool); with ``pretrained`` the bundled weights trained that way. Returned in eval mode."""
    from .digits_norms import load_bundled, replace_batchnorms

    model = replace_batchnorms(MultiLabelCNN(), lambda c: nn.GroupNorm(8, c), lambda c: nn.GroupNorm(8, c))
    if pretrained:
        load_bundled(model, GN_WEIGHTS_PATH, "examples/train_multilabel.py --norm gn")
    return model.eval()


def attributes_of(digits: torch.Tensor) -> torch.Tensor:
    """``[N]`` digit labels -> ``[N, 5]`` float 0/1 attribute targets (columns in :data:`ATTRIBUTES` order)."""
    cols = [torch.isin(digits, torch.tensor(ds)) for ds in ATTRIBUTES.values()]
    return torch.stack(cols, 1).float()


def load_multilabel(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """``(X [N,1,8,8] in [0,1], Y [N,5] 0/1 float)`` on the digits split ``train`` / ``test`` / ``all``."""
    from .digits import load_digits

    x, y = load_digits(split)
    return x, attributes_of(y)


def calib() -> list[torch.Tensor]:
    """Unlabeled calibration inputs: the training split's images in batches of 64 (for ``--calib``)."""
    x, _ = load_multilabel("train")
    return list(x.split(64))


def heldout() -> list[torch.Tensor]:
    """The test split's images in batches of 64 (for ``--heldout``), never used in training or calibration."""
    x, _ = load_multilabel("test")
    return list(x.split(64))


@torch.no_grad()
def label_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Ground-truth quality: per-label accuracy at 0.5 (mean over labels), exact-match accuracy
    (all five right) and the mean binary cross-entropy."""
    model.eval()
    p = model(x)
    hit = (p >= 0.5).float() == y
    bce = torch.nn.functional.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y)
    return {
        "label_accuracy": float(hit.float().mean()),
        "exact_match": float(hit.all(1).float().mean()),
        "bce": float(bce),
    }
