"""Weight Norm (w = g·v/‖v‖) + mean-only BN, and the exact conv→BN conversion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from normswap.norms import SwapSite, get_target
from normswap.norms.weight_norm import MeanOnlyBatchNorm, WNConv, from_conv_bn

from ._helpers import (
    CONV_FOR_RANK,
    assert_batch_independent,
    assert_fx_traceable,
    make_input,
    onnx_parity,
    op_types,
    rel_err,
    run_onnx,
    trained_bn,
)

CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def ref_wn_weight(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """w_i = g_i · v_i / ‖v_i‖ per output unit i (float64, written row by row)."""
    v = v.detach().double()
    out = torch.empty_like(v)
    for i in range(v.shape[0]):
        out[i] = g[i].detach().double() * v[i] / torch.sqrt((v[i] ** 2).sum())
    return out


def _conv(rank: int, c_in: int = 4, c_out: int = 6, groups: int = 1, bias: bool = True) -> nn.Module:
    torch.manual_seed(rank * 10 + groups)
    return CONV_FOR_RANK[rank](c_in, c_out, 3, padding=1, groups=groups, bias=bias).eval()


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_wnconv_is_the_paper_formula(rank: int) -> None:
    conv = _conv(rank, groups=2)
    wn = WNConv.from_module(conv)
    with torch.no_grad():
        wn.g.copy_(torch.linspace(0.5, 2.0, 6))
        wn.v.mul_(3.0)  # ‖v‖ ≠ g: the normalization has to happen
    w_ref = ref_wn_weight(wn.v, wn.g)
    assert rel_err(wn.normalized_weight(), w_ref) <= 1e-6
    x = make_input(2, 4, rank)
    y_ref = CONV_FN[rank](x.double(), w_ref, conv.bias.double(), 1, 1, 1, 2)
    for mode in (True, False):
        wn.train(mode)
        assert rel_err(wn(x), y_ref) <= 1e-5


def test_wn_linear_from_module_is_the_same_function() -> None:
    lin = nn.Linear(5, 7)
    wn = WNConv.from_module(lin)
    x = torch.randn(3, 5)
    assert rel_err(wn(x), lin(x)) <= 1e-5
    assert torch.allclose(wn.g, lin.weight.norm(dim=1))
    with torch.no_grad():
        lin.weight[2] = 0.0
    wn = WNConv.from_module(lin)
    assert torch.isfinite(wn(x)).all() and rel_err(wn(x), lin(x)) <= 1e-5


@pytest.mark.parametrize("spatial_dims", [0, 1, 2, 3])
def test_mean_only_bn_train_and_eval(spatial_dims: int) -> None:
    m = MeanOnlyBatchNorm(5, momentum=0.1, spatial_dims=spatial_dims)
    with torch.no_grad():
        m.bias.copy_(torch.linspace(-1, 1, 5))
        m.running_mean.copy_(torch.linspace(2, 3, 5))
    x = make_input(4, 5, spatial_dims, shift=2.0)
    shape = (1, 5) + (1,) * spatial_dims
    dims = (0, *range(2, 2 + spatial_dims))
    # eval: running mean
    ref_eval = x.double() - m.running_mean.double().reshape(shape) + m.bias.double().reshape(shape)
    assert rel_err(m.eval()(x), ref_eval) <= 1e-6
    # train: batch mean, no division, running_mean ← 0.9·rm + 0.1·μ_B
    mu = x.double().mean(dim=dims)
    expected_rm = 0.9 * m.running_mean.double() + 0.1 * mu
    ref_train = x.double() - mu.reshape(shape) + m.bias.double().reshape(shape)
    assert rel_err(m.train()(x), ref_train) <= 1e-6
    assert rel_err(m.running_mean, expected_rm) <= 1e-6
    assert int(m.num_batches_tracked) == 1


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize(("groups", "bias", "affine"), [(1, True, True), (2, False, True), (6, True, False)])
def test_from_conv_bn_reproduces_eval_function_exactly(rank: int, groups: int, bias: bool, affine: bool) -> None:
    conv = _conv(rank, c_in=6, groups=groups, bias=bias)
    bn = trained_bn(rank, 6, affine=affine)
    wn, mob = from_conv_bn(conv, bn)
    assert wn.bias is None and mob.spatial_dims == rank
    x = make_input(3, 6, rank)
    with torch.no_grad():
        ref = bn(conv(x))
        assert rel_err(mob.eval()(wn.eval()(x)), ref) <= 1e-5
        # ... and through the export forms
        assert rel_err(mob.export_form()(wn.export_form()(x)), ref) <= 1e-5
    # the caller's modules are untouched
    assert conv.weight.requires_grad and (conv.bias is not None) == bias


def test_from_conv_bn_linear_bn1d_and_degenerate_units() -> None:
    lin = nn.Linear(5, 4)
    bn = trained_bn(0, 4)
    with torch.no_grad():
        bn.weight[1] = 0.0  # γ = 0 kills unit 1
        bn.weight[2] = -2.0  # negative γ flips unit 2
        lin.weight[3] = 0.0  # an all-zero filter
    wn, mob = from_conv_bn(lin, bn)
    assert torch.isfinite(wn.normalized_weight()).all()
    assert wn.g[1] == 0 and torch.allclose(wn.v[1], lin.weight[1])  # the dead unit keeps W's direction
    assert wn.g[3] == 0 and wn.v[3].abs().sum() > 0
    x = torch.randn(6, 5)
    with torch.no_grad():
        assert rel_err(mob.eval()(wn(x)), bn(lin(x))) <= 1e-5


def test_target_build_and_refusals() -> None:
    t = get_target("wn")
    conv, bn = _conv(2), trained_bn(2, 6)
    b = t.build(SwapSite(bn=bn, num_features=6, spatial_dims=2, producer=conv))
    assert isinstance(b.producer, WNConv) and isinstance(b.norm, MeanOnlyBatchNorm)
    assert t.exact and not t.batch_independent
    assert "none" in t.can_swap(SwapSite(bn=bn, num_features=6, spatial_dims=2, producer=None))
    transposed = nn.ConvTranspose2d(6, 6, 3)
    assert "ConvTranspose2d" in t.can_swap(SwapSite(bn=bn, num_features=6, spatial_dims=2, producer=transposed))
    no_stats = nn.BatchNorm2d(6, track_running_stats=False)
    assert "running statistics" in t.can_swap(SwapSite(bn=no_stats, num_features=6, spatial_dims=2, producer=conv))
    with pytest.raises(ValueError, match="none"):
        t.swap(SwapSite(bn=bn, num_features=6, spatial_dims=2))


def test_pair_is_batch_dependent_in_training_but_wnconv_alone_is_not() -> None:
    wn, mob = from_conv_bn(_conv(2), trained_bn(2, 6))
    x = make_input(8, 4, 2)
    assert_batch_independent(wn, x, independent=True)
    assert_batch_independent(nn.Sequential(wn, mob), x, independent=False)


def test_export_forms_and_onnx() -> None:
    conv, bn = _conv(2, bias=True), trained_bn(2, 6)
    wn, mob = from_conv_bn(conv, bn)
    plain = wn.export_form()
    assert type(plain) is nn.Conv2d and plain.bias is None
    x = make_input(2, 4, 2)
    pair = nn.Sequential(wn, mob).eval()
    onnx_parity(pair, x)  # the raw modules export too
    model = onnx_parity(nn.Sequential(plain, mob.export_form()), x)
    assert op_types(model) == ["Conv", "Add"], op_types(model)
    with torch.no_grad():
        assert rel_err(torch.from_numpy(run_onnx(model, x)), bn(conv(x))) <= 1e-5


@pytest.mark.parametrize("rank", [1, 3])
def test_padding_modes_and_strides_survive(rank: int) -> None:
    conv = CONV_FOR_RANK[rank](4, 6, 3, stride=2, padding=1, dilation=1, padding_mode="reflect").eval()
    wn = WNConv.from_module(conv)
    x = make_input(2, 4, rank)
    x = torch.nn.functional.interpolate(x, scale_factor=2) if rank == 1 else x
    assert rel_err(wn(x), conv(x)) <= 1e-5
    assert rel_err(wn.export_form()(x), conv(x)) <= 1e-5


def test_fx_traceable() -> None:
    wn, mob = from_conv_bn(_conv(2), trained_bn(2, 6))
    pair = nn.Sequential(wn, mob).eval()
    assert_fx_traceable(pair, make_input(2, 4, 2))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rank=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 3]),
    per_group_in=st.integers(1, 3),
    per_group_out=st.integers(1, 3),
    kernel=st.integers(1, 3),
    bias=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_from_conv_bn_exact_property(rank, groups, per_group_in, per_group_out, kernel, bias, affine, seed) -> None:
    c_in, c_out = groups * per_group_in, groups * per_group_out
    torch.manual_seed(seed)
    conv = CONV_FOR_RANK[rank](c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=bias).eval()
    bn = trained_bn(rank, c_out, affine=affine, seed=seed)
    wn, mob = from_conv_bn(conv, bn)
    x = make_input(2, c_in, rank, seed=seed)
    with torch.no_grad():
        assert rel_err(mob.eval()(wn.eval()(x)), bn(conv(x))) <= 1e-5
