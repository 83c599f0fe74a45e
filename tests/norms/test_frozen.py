"""FrozenBatchNorm: y = x·γ/√(σ²+ε) + (β − μ·γ/√(σ²+ε)), exact vs the BN's eval function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normswap.norms import SwapSite, get_target
from normswap.norms.frozen import FrozenBatchNorm

from ._helpers import (
    assert_fx_traceable,
    make_input,
    onnx_parity,
    op_types,
    per_channel,
    rel_err,
    trained_bn,
)


def ref_frozen(x: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    nd = x.dim()
    w = per_channel(bn.weight, nd) if getattr(bn, "weight", None) is not None else 1.0
    b = per_channel(bn.bias, nd) if getattr(bn, "bias", None) is not None else 0.0
    std = torch.sqrt(per_channel(bn.running_var, nd) + bn.eps)
    return (x.double() - per_channel(bn.running_mean, nd)) / std * w + b


@pytest.mark.parametrize("spatial_dims", [0, 1, 2, 3])
@pytest.mark.parametrize(("affine", "eps"), [(True, 1e-5), (False, 1e-5), (True, 0.2)])
def test_from_bn_is_exact_in_train_and_eval(spatial_dims: int, affine: bool, eps: float) -> None:
    bn = trained_bn(spatial_dims, 6, affine=affine, eps=eps)
    x = make_input(4, 6, spatial_dims)
    frozen = FrozenBatchNorm.from_bn(bn, spatial_dims=spatial_dims)
    with torch.no_grad():
        expected = bn(x)
    for mode in (True, False):
        frozen.train(mode)
        y = frozen(x)
        assert rel_err(y, expected) <= 1e-5
        assert rel_err(y, ref_frozen(x, bn)) <= 1e-5
    assert list(frozen.parameters()) == []
    assert sorted(dict(frozen.named_buffers())) == ["bias", "running_mean", "running_var", "weight"]


def test_rank_inferred_from_bn_class_or_input() -> None:
    assert FrozenBatchNorm.from_bn(trained_bn(2, 3)).spatial_dims == 2
    assert FrozenBatchNorm.from_bn(trained_bn(3, 3)).spatial_dims == 3
    f1 = FrozenBatchNorm.from_bn(trained_bn(1, 3))
    assert f1.spatial_dims is None  # BatchNorm1d: [N, C] or [N, C, L], read from the input
    for sd in (0, 1):
        x = make_input(2, 3, sd)
        assert rel_err(f1(x), ref_frozen(x, trained_bn(1, 3))) <= 1e-5


def test_from_sync_and_third_party_frozen_bns() -> None:
    bn = trained_bn(2, 5)
    sync = nn.SyncBatchNorm(5).eval()
    sync.load_state_dict(bn.state_dict())
    x = make_input(3, 5, 2)
    assert rel_err(FrozenBatchNorm.from_bn(sync, spatial_dims=2)(x), ref_frozen(x, bn)) <= 1e-5

    tv = pytest.importorskip("torchvision.ops.misc")
    tvf = tv.FrozenBatchNorm2d(5)
    tvf.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"})
    f = FrozenBatchNorm.from_bn(tvf)
    assert f.spatial_dims == 2
    assert rel_err(f(x), tvf(x)) <= 1e-5

    timm_norm = pytest.importorskip("timm.layers.norm_act")
    tf = timm_norm.FrozenBatchNormAct2d(5, act_layer=nn.ReLU)
    tf.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"})
    # the act is not ours to carry (the swap pass keeps it): compare with the pre-activation function
    assert rel_err(torch.relu(FrozenBatchNorm.from_bn(tf)(x)), tf(x)) <= 1e-5


def test_refuses_bn_without_running_stats_and_frozen_sites() -> None:
    target = get_target("frozen")
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    reason = target.can_swap(SwapSite(bn=bn, num_features=4, spatial_dims=2))
    assert reason is not None and "running statistics" in reason
    with pytest.raises(ValueError, match="running statistics"):
        FrozenBatchNorm.from_bn(bn)
    frozen_site = SwapSite(bn=FrozenBatchNorm(4), num_features=4, spatial_dims=2)
    assert target.can_swap(frozen_site) is not None


def test_fx_traceable_with_static_rank() -> None:
    f = FrozenBatchNorm.from_bn(trained_bn(3, 4), spatial_dims=3)
    assert_fx_traceable(f, make_input(2, 4, 3))


@pytest.mark.parametrize("spatial_dims", [0, 2])
def test_onnx_parity_is_mul_add(spatial_dims: int) -> None:
    f = FrozenBatchNorm.from_bn(trained_bn(spatial_dims, 6), spatial_dims=spatial_dims)
    model = onnx_parity(f, make_input(3, 6, spatial_dims))
    assert sorted(set(op_types(model))) == ["Add", "Mul"], op_types(model)
