"""The digits ResNet trained with per-sample norms from the start: GroupNorm or LayerNorm (not swapped).

Same layout as :class:`~normswap.models.digits.DigitsResNet`, every BatchNorm replaced *before training*:

* ``digits_gn``: ``nn.GroupNorm(8, C)`` at every conv site and in the head (``Linear → GroupNorm(8, 128)``);
* ``digits_ln``: channels LayerNorm (ConvNeXt's LayerNorm2d: statistics over C at each position) at every
  conv site and ``nn.LayerNorm(128)`` in the head (``Linear → LayerNorm → ReLU``).

They are the test bed for ``--to fold --calib``, which turns such norms into fitted affines and folds
them. Weights (``digits_gn.safetensors``, ``digits_ln.safetensors``, metadata next to them) are written
by ``examples/train_digits_norms.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from normswap.errors import InputError
from normswap.models.digits import DigitsResNet
from normswap.norms.layer import ChannelsLayerNorm

__all__ = ["NORMS", "digits_norm_resnet", "digits_gn", "digits_ln", "load_bundled", "replace_batchnorms", "weights_path"]

_DIR = Path(__file__).resolve().parent

#: norm name → (conv-site norm of C channels, head norm of 128 features)
NORMS = {
    "gn": (lambda c: nn.GroupNorm(8, c), lambda c: nn.GroupNorm(8, c)),
    "ln": (lambda c: ChannelsLayerNorm(c, eps=1e-5, spatial_dims=2), lambda c: nn.LayerNorm(c)),
}


def weights_path(norm: str) -> Path:
    return _DIR / f"digits_{norm}.safetensors"


def digits_norm_resnet(norm: str = "gn", pretrained: bool = True) -> DigitsResNet:
    """The digits ResNet with ``norm`` (``"gn"`` or ``"ln"``) in place of every BatchNorm; with
    ``pretrained`` the bundled weights trained that way. Returned in eval mode."""
    if norm not in NORMS:
        raise InputError(f"unknown norm {norm!r}; choose from: {', '.join(NORMS)}")
    model = replace_batchnorms(DigitsResNet(), *NORMS[norm])
    if pretrained:
        load_bundled(model, weights_path(norm), f"examples/train_digits_norms.py --norm {norm}")
    return model.eval()


def replace_batchnorms(model: nn.Module, conv_norm: Callable[[int], nn.Module],
                       head_norm: Callable[[int], nn.Module]) -> nn.Module:
    """``model`` with every BatchNorm2d replaced by ``conv_norm(C)`` and every BatchNorm1d by
    ``head_norm(C)``, in place — the architecture a model is then *trained* with (nothing is copied from
    the BatchNorms). The one rule every bundled per-sample-norm variant is built by."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            parent, _, attr = name.rpartition(".")
            new = head_norm(m.num_features) if isinstance(m, nn.BatchNorm1d) else conv_norm(m.num_features)
            setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


def load_bundled(model: nn.Module, path: Path, trained_by: str) -> nn.Module:
    """Load the bundled safetensors at ``path`` into ``model`` (strict); a one-line InputError naming the
    script that writes them (``trained_by``) when they are missing."""
    if not path.is_file():
        raise InputError(f"bundled weights missing at {path}; reinstall normswap or run {trained_by}")
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def digits_gn(pretrained: bool = True) -> DigitsResNet:
    """The digits ResNet trained with GroupNorm(8, C) everywhere."""
    return digits_norm_resnet("gn", pretrained)


def digits_ln(pretrained: bool = True) -> DigitsResNet:
    """The digits ResNet trained with channels LayerNorm (convs) and LayerNorm (head)."""
    return digits_norm_resnet("ln", pretrained)
