"""The fold pass: arithmetic against the unfused modules, and every graph pattern it handles."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normswap
from normswap.rewriting.fold import (
    bn_scale_shift,
    fold,
    fold_bn_into_conv_input,
    fold_conv_bn_weights,
)
from normswap.rewriting.layers import ChannelAffine
from tests.helpers import check_fold, count_bn, randomize_bn, rel_err

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _check(model: nn.Module, x: torch.Tensor, tol: float = 1e-5) -> "object":
    return check_fold(model, x, tol)


# ---- arithmetic -----------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(
    dims=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([1, 2, 4]),
    cin_g=st.integers(1, 3),
    cout_g=st.integers(1, 3),
    bias=st.booleans(),
    affine=st.booleans(),
    transpose=st.booleans(),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_conv_fold_matches_unfused(dims, groups, cin_g, cout_g, bias, affine, transpose, k, stride, dilation, eps, seed):
    torch.manual_seed(seed)
    cin, cout = cin_g * groups, cout_g * groups
    cls = (CONVT if transpose else CONV)[dims]
    conv = cls(cin, cout, k, stride=stride, dilation=dilation, groups=groups, bias=bias, padding=k // 2)
    bn = randomize_bn(BN[dims](cout, eps=eps, affine=affine), seed)
    model = nn.Sequential(conv, bn)
    x = torch.randn(2, cin, *([5] * dims))
    res = _check(model, x)
    assert [a.action for a in res.actions] == ["into-producer"]
    assert count_bn(res.model) == 0


@settings(max_examples=30, deadline=None)
@given(
    dims=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([1, 3]),
    cin_g=st.integers(1, 3),
    cout_g=st.integers(1, 3),
    bias=st.booleans(),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    seed=st.integers(0, 2**16),
)
def test_forward_fold_into_conv(dims, groups, cin_g, cout_g, bias, mode, seed):
    """BN at the input of a conv folds forward when the conv's padding copies real values."""
    torch.manual_seed(seed)
    cin, cout = cin_g * groups, cout_g * groups
    pad = 0 if mode == "zeros" else 1
    model = nn.Sequential(randomize_bn(BN[dims](cin), seed), CONV[dims](cin, cout, 3, groups=groups, bias=bias, padding=pad, padding_mode=mode))
    res = _check(model, torch.randn(2, cin, *([6] * dims)))
    assert [a.action for a in res.actions] == ["into-consumer"]


def test_scale_shift_formula():
    rm, rv = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.25])
    w, b = torch.tensor([2.0, 3.0]), torch.tensor([0.5, -1.0])
    s, t = bn_scale_shift(rm, rv, w, b, 0.0)
    assert s.dtype == torch.float64
    assert torch.allclose(s, torch.tensor([1.0, 6.0], dtype=torch.float64))
    assert torch.allclose(t, torch.tensor([0.5 - 1.0, -1.0 + 12.0], dtype=torch.float64))


def test_fold_math_keeps_dtype_and_uses_float64():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float16)
    s, t = torch.full((4,), 1.0 / 3.0, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    w2, b2 = fold_conv_bn_weights(w, None, s, t)
    assert w2.dtype == torch.float16 and b2.dtype == torch.float16
    assert torch.equal(w2, (w.double() / 3.0).half())
    wi, bi = fold_bn_into_conv_input(w, None, s[:3], t[:3])
    assert wi.dtype == torch.float16


# ---- patterns -------------------------------------------------------------------------------

def test_linear_bn1d():
    model = nn.Sequential(nn.Linear(6, 5), randomize_bn(nn.BatchNorm1d(5)), nn.ReLU(), nn.Linear(5, 3))
    res = _check(model, torch.randn(4, 6))
    assert [a.action for a in res.actions] == ["into-producer"]


def test_linear_on_3d_input_is_not_folded_wrongly():
    """BatchNorm1d on [N, L, C] normalizes dim 1 (L), not the Linear's features: only an affine is exact."""
    model = nn.Sequential(nn.Linear(4, 7), randomize_bn(nn.BatchNorm1d(7)))
    res = _check(model, torch.randn(2, 7, 4))
    assert res.actions[0].action == "affine"
    assert "not [N, C]" in res.actions[0].reason


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y.sigmoid()


def test_shared_conv_output_is_not_corrupted():
    """torch.fx's fuse() folds here and changes what y.sigmoid() sees; normswap folds into a copy."""
    model = randomize_bn(SharedConv())
    res = _check(model, torch.randn(2, 3, 8, 8))
    assert res.actions[0].action == "into-producer-copy"
    assert res.actions[0].target == "conv_bnfold"
    names = dict(res.model.named_modules())
    assert "conv" in names and "conv_bnfold" in names


class ReusedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))


def test_conv_module_called_twice():
    model = randomize_bn(ReusedConv())
    res = _check(model, torch.randn(2, 4, 5, 5))
    assert res.actions[0].action == "into-producer-copy"


class PreAct(nn.Module):
    """Pre-activation block: BN after an add, then ReLU, then a zero-padded conv."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv0(x)
        return self.conv(torch.relu(self.bn(y + 1.0)))


def test_bn_after_add_becomes_affine():
    res = _check(randomize_bn(PreAct()), torch.randn(2, 3, 6, 6))
    a = res.actions[0]
    assert a.action == "affine" and "add" in a.reason
    assert count_bn(res.model) == 0
    assert any(isinstance(m, ChannelAffine) for m in res.model.modules())


def test_bn_at_input_with_zero_padding_is_affine_not_forward_folded():
    model = nn.Sequential(randomize_bn(nn.BatchNorm2d(3)), nn.Conv2d(3, 4, 3, padding=1))
    res = _check(model, torch.randn(2, 3, 6, 6))
    assert res.actions[0].action == "affine"
    assert "zero-pads" in res.actions[0].reason


def test_bn_chain_composes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomize_bn(nn.BatchNorm2d(4), 1), randomize_bn(nn.BatchNorm2d(4), 2))
    res = _check(model, torch.randn(2, 3, 6, 6))
    assert [a.action for a in res.actions] == ["into-producer", "into-producer"]
    assert count_bn(res.model) == 0


def test_affine_false_and_momentum_none():
    bn = randomize_bn(nn.BatchNorm2d(4, affine=False, momentum=None, eps=0.3))
    _check(nn.Sequential(nn.Conv2d(2, 4, 3), bn), torch.randn(2, 2, 5, 5))


@pytest.mark.parametrize("bad", ["nan", "negative", "no-stats"])
def test_unfoldable_statistics_are_refused_with_reason(bad):
    bn = nn.BatchNorm2d(4, track_running_stats=(bad != "no-stats"))
    if bad == "nan":
        bn.running_var[1] = float("nan")
    elif bad == "negative":
        bn.running_var[1] = -1.0
    model = nn.Sequential(nn.Conv2d(2, 4, 3), bn).eval()
    res = fold(model, (torch.randn(2, 2, 5, 5),))
    assert res.actions[0].action == "refuse"
    assert {"nan": "NaN", "negative": "negative", "no-stats": "running statistics"}[bad] in res.actions[0].reason
    assert count_bn(res.model) == 1


def test_half_precision_model_keeps_dtype():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).eval()
    model_h = model.to(torch.bfloat16)
    res = fold(model_h, (torch.randn(1, 3, 6, 6, dtype=torch.bfloat16),))
    assert all(p.dtype == torch.bfloat16 for p in res.model.parameters())
    x = torch.randn(2, 3, 6, 6)
    # folded in float64 then rounded once: at least as close to the fp32 function as bf16 BN is
    ref = model.float()(x)
    assert rel_err(ref, res.model.float()(x)) < 2e-2


def test_training_mode_model_is_folded_with_eval_statistics_and_left_in_training_mode():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.train()
    res = fold(model, (torch.randn(2, 3, 5, 5),))
    assert model.training and model[1].training  # the caller's model keeps its mode
    assert not res.model.training
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert rel_err(model.eval()(x), res.model(x)) < 1e-5


# ---- BatchNorm look-alikes ------------------------------------------------------------------

def test_timm_batchnormact_keeps_activation():
    timm_layers = pytest.importorskip("timm.layers")
    bnact = timm_layers.BatchNormAct2d(8, act_layer=nn.ReLU)
    assert isinstance(bnact, nn.BatchNorm2d)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), bnact))
    res = _check(model, torch.randn(2, 3, 6, 6))
    assert res.actions[0].action == "into-producer"
    acts = [m for m in res.model.modules() if isinstance(m, nn.ReLU)]
    assert len(acts) == 1, "the BatchNormAct2d activation was lost"
    # and it really applies: outputs are non-negative and some are clipped
    out = res.model(torch.randn(4, 3, 6, 6))
    assert (out >= 0).all() and (out == 0).any()


def test_timm_batchnormact_without_producer_becomes_affine_with_activation():
    timm_layers = pytest.importorskip("timm.layers")
    model = randomize_bn(nn.Sequential(timm_layers.BatchNormAct2d(3, act_layer=nn.ReLU), nn.Conv2d(3, 4, 1)))
    res = _check(model, torch.randn(2, 3, 6, 6))
    assert res.actions[0].action == "affine"
    assert "activation" in res.actions[0].reason


def test_torchvision_frozen_bn():
    ops = pytest.importorskip("torchvision.ops")
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), ops.FrozenBatchNorm2d(4)))
    res = _check(model, torch.randn(2, 3, 6, 6))
    assert res.actions[0].action == "into-producer"
    assert not any(type(m).__name__ == "FrozenBatchNorm2d" for m in res.model.modules())


def test_sync_batchnorm_folds_in_eval():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)))
    res = _check(model, torch.randn(2, 3, 6, 6))
    assert res.actions[0].action == "into-producer"


class WeirdBN(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_unknown_bn_subclass_overriding_forward_is_refused():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), WeirdBN(4))).eval()
    res = fold(model, (torch.randn(1, 3, 5, 5),))
    assert res.actions[0].action == "refuse" and "overrides forward" in res.actions[0].reason


# ---- untraceable models ---------------------------------------------------------------------

class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.block(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this module
            y = y * 2
        return self.bn(y)


def test_untraceable_model_descends_into_subtrees():
    model = randomize_bn(Untraceable())
    res = _check(model, torch.randn(2, 3, 6, 6))
    by = {a.site: a for a in res.actions}
    assert by["block.1"].action == "into-producer"
    assert by["bn"].action == "affine" and "not traceable" in by["bn"].reason
    assert count_bn(res.model) == 0
    assert isinstance(res.model, Untraceable)


def test_torchvision_resnet_folds_every_bn():
    tv = pytest.importorskip("torchvision")
    model = randomize_bn(tv.models.resnet18(num_classes=10))
    res = _check(model, torch.randn(2, 3, 32, 32))
    assert count_bn(res.model) == 0
    assert {a.action for a in res.actions} == {"into-producer"}
    assert len(res.actions) == 20
    assert math.isfinite(float(res.model(torch.randn(1, 3, 32, 32)).sum()))


def test_float64_model_is_not_mutated_and_folds_exactly():
    model = randomize_bn(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6))).double()
    _check(model, torch.randn(2, 4, 5, 5, dtype=torch.float64), tol=1e-12)


class BNHolder(nn.TransformerEncoderLayer):
    """A torch.nn subclass: torch.fx keeps it as a leaf, so its BN gets no graph node."""

    def __init__(self):
        super().__init__(d_model=4, nhead=1, dim_feedforward=8, dropout=0.0, batch_first=True)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, src, *a, **k):
        return self.bn(super().forward(src))


BNHolder.__module__ = "torch.nn.modules.holder"  # what makes fx's default tracer keep it whole


def test_bn_inside_a_leaf_module_is_found_and_folded_exactly():
    model = randomize_bn(nn.Sequential(BNHolder(), nn.Flatten()))
    res = _check(model, torch.randn(2, 3, 4))
    (a,) = [a for a in res.actions if a.site == "0.bn"]
    assert a.action == "affine" and "leaf" in a.reason
    # the layer's own LayerNorms are norm sites too: folded only through fitted affines (--calib)
    assert {(b.site, b.action) for b in res.actions if b is not a} == {("0.norm1", "refuse"), ("0.norm2", "refuse")}
    assert count_bn(res.model) == 0


def test_bundled_digits_model_every_bn_is_a_site():
    from normswap.models.digits import digits_resnet

    model = digits_resnet()
    res = _check(model, torch.randn(3, 1, 8, 8))
    assert len(res.actions) == count_bn(model) == 9
    assert all(a.action == "into-producer" for a in res.actions)


def test_result_shares_no_tensor_with_the_callers_model():
    """Unfolded layers (here the head Linear and a conv whose BN was refused) are copies too."""
    bn = nn.BatchNorm2d(4)
    bn.running_var[0] = float("nan")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomize_bn(nn.BatchNorm2d(4)), nn.Conv2d(4, 4, 1), bn,
                          nn.Flatten(), nn.Linear(4 * 9, 2)).eval()
    res = fold(model, (torch.randn(1, 3, 5, 5),))
    mine = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    theirs = [t.data_ptr() for t in list(res.model.parameters()) + list(res.model.buffers())]
    assert not mine & set(theirs)
    with torch.no_grad():
        for p in res.model.parameters():
            p.add_(1.0)
    assert not torch.isnan(model[0].weight).any()
    assert [a.action for a in res.actions] == ["into-producer", "refuse"]


def test_result_shares_no_module_with_the_callers_model():
    """Kept activations (a PReLU with a parameter) and refused BNs are copies, not the caller's objects."""
    timm_layers = pytest.importorskip("timm.layers")
    bad = nn.BatchNorm2d(8, track_running_stats=False)  # refused: stays, and must be a copy
    shared_lin = nn.Linear(8, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), randomize_bn(timm_layers.BatchNormAct2d(8, act_layer=nn.PReLU)),
                          nn.Conv2d(8, 8, 1), bad, nn.AdaptiveAvgPool2d(1), nn.Flatten(), shared_lin, shared_lin).eval()
    res = _check(model, torch.randn(2, 3, 6, 6))
    mine = {id(m) for m in model.modules()} | {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    theirs = {id(m) for m in res.model.modules()} | {id(p) for p in res.model.parameters()} | {id(b) for b in res.model.buffers()}
    assert not mine & theirs
    ptrs = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    assert not ptrs & {t.data_ptr() for t in list(res.model.parameters()) + list(res.model.buffers())}
    lins = [m for m in res.model.modules() if isinstance(m, nn.Linear)]
    assert len({id(m) for m in lins}) == 1, "a layer used twice must stay one layer"


def test_folds_normswaps_own_frozen_batchnorm():
    """The output of `--to frozen` (normswap's FrozenBatchNorm) folds like torchvision's: one
    definition of a frozen BN for capture, sites and the registry."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(288, 16),
                      nn.BatchNorm1d(16)).eval()
    with torch.no_grad():
        for bn in (m[1], m[5]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    frozen = normswap.rewrite(m, "frozen", (x,)).model
    res = normswap.rewrite(frozen, "fold", (x,))
    assert res.summary() == {"into-producer": 2}
    assert not any("Frozen" in type(k).__name__ for k in res.model.modules())
    with torch.no_grad():
        assert torch.allclose(res.model(x), m(x), atol=1e-5)
