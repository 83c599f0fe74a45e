"""Layer Norm: the paper's (statistics over C,*S = GroupNorm(1, C)) and channels-only (ConvNeXt)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normswap.norms import SwapSite, get_target
from normswap.norms.layer import ChannelsLayerNorm

from ._helpers import (
    assert_batch_independent,
    assert_fx_traceable,
    make_input,
    onnx_parity,
    op_types,
    per_channel,
    ref_normalize,
    rel_err,
    trained_bn,
)


@pytest.mark.parametrize("spatial_dims", [0, 1, 2, 3])
def test_paper_ln_statistics_over_c_and_space(spatial_dims: int) -> None:
    bn = trained_bn(spatial_dims, 6)
    ln = get_target("ln").build(SwapSite(bn=bn, num_features=6, spatial_dims=spatial_dims)).norm
    assert isinstance(ln, nn.GroupNorm) and ln.num_groups == 1
    x = make_input(4, 6, spatial_dims)
    dims = tuple(range(1, x.dim()))
    ref = ref_normalize(x, dims, bn.eps) * per_channel(bn.weight, x.dim()) + per_channel(bn.bias, x.dim())
    for mode in (True, False):
        ln.train(mode)
        assert rel_err(ln(x), ref) <= 1e-5


@pytest.mark.parametrize("spatial_dims", [0, 1, 2, 3])
@pytest.mark.parametrize("static_rank", [True, False])
def test_channels_ln_statistics_over_c_at_each_position(spatial_dims: int, static_rank: bool) -> None:
    bn = trained_bn(spatial_dims, 6)
    cln = ChannelsLayerNorm.from_bn(bn, spatial_dims=spatial_dims if static_rank else None)
    x = make_input(4, 6, spatial_dims)
    ref = ref_normalize(x, (1,), bn.eps) * per_channel(bn.weight, x.dim()) + per_channel(bn.bias, x.dim())
    for mode in (True, False):
        cln.train(mode)
        assert rel_err(cln(x), ref) <= 1e-5
    if spatial_dims:  # the two readings differ when there is space
        ln = get_target("ln").build(SwapSite(bn=bn, num_features=6, spatial_dims=spatial_dims)).norm
        assert rel_err(ln(x), ref) > 1e-2


def test_targets_build_the_right_modules() -> None:
    bn = trained_bn(2, 8)
    site = SwapSite(bn=bn, num_features=8, spatial_dims=2)
    cln = get_target("ln-channels").build(site).norm
    assert isinstance(cln, ChannelsLayerNorm) and cln.spatial_dims == 2 and cln.eps == bn.eps
    assert torch.equal(cln.weight, bn.weight) and torch.equal(cln.bias, bn.bias)


def test_refusals() -> None:
    one = SwapSite(bn=trained_bn(0, 1), num_features=1, spatial_dims=0)
    assert "single value" in get_target("ln").can_swap(one)
    assert "C=1" in get_target("ln-channels").can_swap(SwapSite(bn=trained_bn(2, 1), num_features=1, spatial_dims=2))
    assert get_target("ln").can_swap(SwapSite(bn=trained_bn(2, 1), num_features=1, spatial_dims=2)) is None


@pytest.mark.parametrize("name", ["ln", "ln-channels"])
@pytest.mark.parametrize("spatial_dims", [0, 2])
def test_batch_independent(name: str, spatial_dims: int) -> None:
    site = SwapSite(bn=trained_bn(spatial_dims, 8), num_features=8, spatial_dims=spatial_dims)
    norm = get_target(name).build(site).norm
    assert_batch_independent(norm, make_input(8, 8, spatial_dims), independent=True)


def test_channels_ln_fx_traceable() -> None:
    cln = ChannelsLayerNorm.from_bn(trained_bn(3, 4), spatial_dims=3)
    assert_fx_traceable(cln, make_input(2, 4, 3))


@pytest.mark.parametrize("spatial_dims", [0, 2])
def test_onnx_parity(spatial_dims: int) -> None:
    bn = trained_bn(spatial_dims, 8)
    site = SwapSite(bn=bn, num_features=8, spatial_dims=spatial_dims)
    x = make_input(2, 8, spatial_dims)
    cln_ops = op_types(onnx_parity(get_target("ln-channels").build(site).norm, x))
    # the measured-fastest form: one native LayerNormalization (between Transposes when there is space)
    assert "LayerNormalization" in cln_ops and "ReduceMean" not in cln_ops
    assert cln_ops.count("Transpose") == (2 if spatial_dims else 0)
    onnx_parity(get_target("ln").build(site).norm, x)
