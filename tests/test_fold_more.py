"""The fold pass on the patterns of issue 11 items 3 and 4: BatchNorm1d behind a Linear's reshapes
(LeViT), BatchNorm after a concatenation of convolutions (MixNet, Inception), timm's dynamic-"same"
convolutions (tf_efficientnet), and RepVGG/MobileOne identity branches merged into one convolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normswap.rewriting.layers import ChannelAffine
from normswap.rewriting.reparam import merge_parallel_convs
from tests.helpers import check_fold, count_bn, randomize_bn

timm = pytest.importorskip("timm")


def _check(model: nn.Module, x: torch.Tensor, tol: float = 1e-5):
    return check_fold(randomize_bn(model), x, tol)


def _actions(res) -> dict[str, str]:
    return {a.site: a.action for a in res.actions}


def _no_affine(res) -> bool:
    return not any(isinstance(m, ChannelAffine) for m in res.model.modules()) and count_bn(res.model) == 0


# ---- LeViT: Linear → flatten(0, 1) → BatchNorm1d → reshape_as ---------------------------------

class LinearNorm(nn.Module):  # timm.models.levit.LinearNorm
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LinearNormShared(LinearNorm):
    def forward(self, x):
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y) + y.sigmoid()


class LinearNormTransposed(LinearNorm):  # BN1d sees the token axis, not the Linear's features
    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.transpose(1, 2).flatten(0, 1).reshape(-1, x.shape[1])).reshape_as(x)


def test_bn1d_behind_a_linears_reshape_folds_into_the_linear():
    res = _check(nn.Sequential(LinearNorm(8, 6), nn.GELU(), LinearNorm(6, 5)), torch.randn(3, 7, 8))
    assert set(_actions(res).values()) == {"into-producer"} and _no_affine(res)


def test_linear_output_also_used_elsewhere_folds_into_a_copy_with_its_reshape():
    res = _check(LinearNormShared(8, 6), torch.randn(3, 7, 8))
    (a,) = res.actions
    assert a.action == "into-producer-copy" and _no_affine(res)


def test_reshape_that_moves_the_feature_axis_is_not_folded():
    res = _check(LinearNormTransposed(8, 7), torch.randn(3, 7, 8))
    (a,) = res.actions
    assert a.action == "affine" and "transpose" in a.reason


def test_bn1d_before_dropout_and_linear_folds_forward():  # timm.models.levit.NormLinear
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.BatchNorm1d(6), nn.Dropout(0.3), nn.Linear(6, 4))
    res = _check(model, torch.randn(4, 5))
    assert _actions(res) == {"2": "into-consumer"} and _no_affine(res)


# ---- BatchNorm after cat() of convolutions -----------------------------------------------------

class Mixed(nn.Module):
    """timm's MixedConv2d: split the channels, one conv per split, cat, BatchNormAct."""

    def __init__(self, shared: bool = False, extra: bool = False, dim: int = 1) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 5, 5, padding=2, bias=False)])
        self.bn = timm.layers.BatchNormAct2d(8 + 4 * extra if dim == 1 else 3, act_layer=nn.ReLU)
        self.shared, self.extra, self.dim = shared, extra, dim

    def forward(self, x):
        xs = x.split(2, dim=1)
        ys = [self.convs[0](xs[0]), self.convs[1](xs[1])]
        if self.dim != 1:
            return self.bn(torch.cat([ys[0], ys[0] * 2], dim=self.dim))
        z = torch.cat(ys + ([xs[0].repeat(1, 2, 1, 1)] if self.extra else []), 1)
        out = self.bn(z)
        return out + ys[0].sum() if self.shared else out


def test_bn_after_cat_of_convs_folds_slice_by_slice():
    res = _check(Mixed(), torch.randn(2, 4, 9, 9))
    assert _actions(res) == {"bn": "into-producers"} and _no_affine(res)
    assert res.actions[0].target == "convs.0, convs.1"


def test_cat_input_used_elsewhere_is_copied():
    res = _check(Mixed(shared=True), torch.randn(2, 4, 9, 9))
    assert _actions(res) == {"bn": "into-producers"} and _no_affine(res)
    assert "convs.0" in res.actions[0].notes[0]


@pytest.mark.parametrize(("kw", "why"), [({"extra": True}, "cat() also joins"), ({"dim": 2}, "axis 2")])
def test_cat_that_cannot_fold_is_a_scale_and_shift_with_the_reason(kw, why):
    res = _check(Mixed(**kw), torch.randn(2, 4, 9, 9))
    (a,) = res.actions
    assert a.action == "affine" and why in a.reason


def test_mixnet_folds_every_bn():
    res = _check(timm.create_model("mixnet_s", num_classes=10), torch.randn(1, 3, 64, 64), tol=1e-4)
    assert _no_affine(res) and "into-producers" in _actions(res).values()


# ---- timm's dynamic "same" padding ---------------------------------------------------------------

def test_conv2d_same_is_a_leaf_and_the_bn_folds_into_it():
    conv = timm.layers.create_conv2d(3, 8, 3, stride=2, padding="same")
    assert type(conv).__name__ == "Conv2dSame"
    model = nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8),
                          timm.layers.create_conv2d(8, 4, 3, padding="same", dilation=2))
    res = _check(model, torch.randn(2, 3, 11, 10))
    by = {a.site: a for a in res.actions}
    assert by["1"].action == "into-producer" and type(res.model.get_submodule("0")).__name__ == "Conv2dSame"
    assert by["3"].action == "affine" and "zero-pads" in by["3"].reason  # never forward into a padded conv


def test_tf_efficientnet_traces_whole_and_folds_every_bn():
    res = _check(timm.create_model("tf_efficientnet_b0", num_classes=10), torch.randn(1, 3, 33, 32), tol=1e-4)
    assert _no_affine(res) and set(_actions(res).values()) == {"into-producer"}


# ---- RepVGG / MobileOne: identity BN + 1×1 + k×k branches --------------------------------------

class RepBlock(nn.Module):
    def __init__(self, c: int = 4, groups: int = 1, dims: int = 2, k: int = 3, dilation: int = 1, extra: bool = False) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.identity = bn(c)
        self.kxk = nn.Sequential(conv(c, c, k, padding=dilation * (k // 2), dilation=dilation, groups=groups, bias=False), bn(c))
        self.k3 = nn.Sequential(conv(c, c, 3, padding=1, groups=groups), bn(c))
        self.one = nn.Sequential(conv(c, c, 1, groups=groups, bias=False), bn(c))
        self.extra = extra
        self.drop_path = nn.Identity()

    def forward(self, x):
        y = self.one(x) + self.kxk(x)
        ident = self.identity(x) + x.flip(1) if self.extra else self.identity(x)
        return torch.relu(self.drop_path(y + self.k3(x)) + ident)


class OneBlock(nn.Module):
    """timm's MobileOneBlock without its scale branch: ``0 + identity(x)``, then the k×k branches."""

    def __init__(self, c: int = 4, n: int = 3) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(c)
        self.convs = nn.ModuleList([nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)) for _ in range(n)])
        self.scale = None

    def forward(self, x):
        out = (self.scale(x) if self.scale is not None else 0) + self.identity(x)
        for c in self.convs:
            out = out + c(x)
        return torch.relu(out)


@pytest.mark.parametrize(("dims", "groups", "k"), [(2, 1, 3), (2, 4, 5), (1, 2, 3), (3, 1, 3)])
def test_identity_bn_and_conv_branches_merge_into_one_conv(dims, groups, k):
    x = torch.randn(2, 4, *([7] * dims))
    res = _check(nn.Sequential(RepBlock(groups=groups, dims=dims, k=k), RepBlock(groups=groups, dims=dims, k=k)), x)
    acts = _actions(res)
    assert acts["0.identity"] == acts["1.identity"] == "merged" and _no_affine(res)
    assert {a.site: a.target for a in res.actions}["0.identity"] == "0.kxk.0"  # the largest (first) kernel takes the others
    convs = [m for m in res.model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert len(convs) == 2


@pytest.mark.parametrize(("kw", "why"), [({"extra": True}, "not a plain convolution"), ({"dilation": 2}, "dilation")])
def test_identity_bn_that_cannot_merge_is_a_scale_and_shift_with_the_reason(kw, why):
    res = _check(RepBlock(**kw), torch.randn(2, 4, 9, 9))
    a = {a.site: a for a in res.actions}["identity"]
    assert a.action == "affine" and "merge:" in a.reason and why in a.reason


def test_mobileone_style_zero_plus_identity_merges():
    res = _check(nn.Sequential(OneBlock(), OneBlock()), torch.randn(2, 4, 6, 6))
    assert _actions(res)["0.identity"] == _actions(res)["1.identity"] == "merged" and _no_affine(res)


def test_timm_repvgg_merges_every_identity_branch():
    res = _check(timm.create_model("repvgg_a0", num_classes=10), torch.randn(1, 3, 32, 32), tol=1e-4)
    acts = _actions(res)
    assert _no_affine(res) and {v for k, v in acts.items() if k.endswith(".identity")} == {"merged"}


def test_merge_arithmetic_matches_the_branches():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    main = nn.Conv2d(6, 6, 5, padding=2, groups=3).double()
    one = nn.Conv2d(6, 6, 1, groups=3).double()
    three = nn.Conv2d(6, 6, 3, padding=1, groups=3, bias=False).double()
    s, t = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    w, b = merge_parallel_convs((main.weight, main.bias), [(one.weight, one.bias), (three.weight, None)], (s, t))
    with torch.no_grad():
        ref = main(x) + one(x) + three(x) + s[:, None, None] * x + t[:, None, None]
        out = nn.functional.conv2d(x, w, b, padding=2, groups=3)
    assert torch.allclose(ref, out, atol=1e-12)


def test_levit_folds_every_bn():
    model = timm.create_model("levit_128s", num_classes=10, img_size=64)
    res = _check(model, torch.randn(2, 3, 64, 64), tol=1e-4)
    assert _no_affine(res) and set(_actions(res).values()) <= {"into-producer", "into-consumer"}
