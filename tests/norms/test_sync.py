"""BatchNorm <-> SyncBatchNorm converters: parameters and buffers copied exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normswap.norms import SwapSite, get_target
from normswap.norms.sync import from_sync_bn, to_sync_bn

from ._helpers import make_input, trained_bn


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for attr in ("eps", "momentum", "affine", "track_running_stats", "num_features"):
        assert getattr(a, attr) == getattr(b, attr), attr


KWARGS = [{}, {"affine": False}, {"momentum": None}, {"track_running_stats": False}, {"eps": 1e-3}]


@pytest.mark.parametrize("spatial_dims", [0, 1, 2, 3])
@pytest.mark.parametrize("kw", KWARGS)
def test_round_trip_is_exact(spatial_dims: int, kw: dict) -> None:
    bn = trained_bn(spatial_dims, 5, **kw)
    sync = to_sync_bn(bn)
    assert type(sync) is nn.SyncBatchNorm
    _same_state(sync, bn)
    back = from_sync_bn(sync, spatial_dims)
    assert type(back) is type(bn)
    _same_state(back, bn)
    x = make_input(4, 5, spatial_dims)
    with torch.no_grad():
        assert torch.equal(sync.eval()(x), bn.eval()(x))
        assert torch.equal(back.eval()(x), bn(x))


def test_training_mode_without_process_group_is_batchnorm() -> None:
    bn = trained_bn(2, 4).train()
    sync = to_sync_bn(bn).train()
    x = make_input(6, 4, 2)
    torch.testing.assert_close(sync(x), bn(x))
    torch.testing.assert_close(sync.running_mean, bn.running_mean)
    torch.testing.assert_close(sync.running_var, bn.running_var)


def test_requires_grad_and_mode_carried() -> None:
    bn = trained_bn(2, 3).train()
    bn.weight.requires_grad_(False)
    sync = to_sync_bn(bn)
    assert sync.training and not sync.weight.requires_grad and sync.bias.requires_grad


def test_wrong_inputs_refused() -> None:
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        from_sync_bn(nn.BatchNorm2d(3), 2)
    with pytest.raises(ValueError, match="spatial_dims"):
        from_sync_bn(nn.SyncBatchNorm(3), 4)
    with pytest.raises(ValueError, match="BatchNorm"):
        to_sync_bn(nn.SyncBatchNorm(3))
    sync_t, unsync_t = get_target("sync"), get_target("unsync")
    bn_site = SwapSite(bn=nn.BatchNorm2d(3), num_features=3, spatial_dims=2)
    sync_site = SwapSite(bn=nn.SyncBatchNorm(3), num_features=3, spatial_dims=2)
    assert sync_t.can_swap(bn_site) is None and unsync_t.can_swap(sync_site) is None
    assert "sync site" in unsync_t.can_swap(bn_site)
    assert sync_t.can_swap(sync_site) is not None
    assert type(unsync_t.build(sync_site).norm) is nn.BatchNorm2d


def test_timm_batchnormact_site_converts_the_bn_part() -> None:
    norm_act = pytest.importorskip("timm.layers.norm_act")
    bna = norm_act.BatchNormAct2d(4, act_layer=nn.ReLU).eval()
    with torch.no_grad():
        bna.running_mean.uniform_(-1, 1)
    sync = get_target("sync").build(SwapSite(bn=bna, num_features=4, spatial_dims=2)).norm
    assert type(sync) is nn.SyncBatchNorm and not hasattr(sync, "act")
    x = make_input(2, 4, 2)
    with torch.no_grad():
        assert torch.equal(torch.relu(sync.eval()(x)), bna(x))
