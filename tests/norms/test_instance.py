"""Instance Norm: statistics over the spatial dims per sample and channel; undefined on [N, C]."""

from __future__ import annotations

import pytest

from normswap.norms import SwapSite, get_target
from normswap.norms.instance import instance_norm

from ._helpers import (
    assert_batch_independent,
    make_input,
    onnx_parity,
    per_channel,
    ref_normalize,
    rel_err,
    trained_bn,
)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_matches_paper_formula_train_and_eval(spatial_dims: int) -> None:
    bn = trained_bn(spatial_dims, 5)
    norm = get_target("in").build(SwapSite(bn=bn, num_features=5, spatial_dims=spatial_dims)).norm
    x = make_input(4, 5, spatial_dims)
    dims = tuple(range(2, 2 + spatial_dims))
    ref = ref_normalize(x, dims, bn.eps) * per_channel(bn.weight, x.dim()) + per_channel(bn.bias, x.dim())
    for mode in (True, False):
        norm.train(mode)
        assert rel_err(norm(x), ref) <= 1e-5
    assert not norm.track_running_stats and norm.affine


def test_no_spatial_dims_refused() -> None:
    with pytest.raises(ValueError, match="undefined on \\[N, C\\]"):
        instance_norm(4, 0)
    reason = get_target("in").can_swap(SwapSite(bn=trained_bn(0, 4), num_features=4, spatial_dims=0))
    assert reason is not None and "[N, C]" in reason


def test_batch_independent() -> None:
    norm = instance_norm(6, 2)
    assert_batch_independent(norm, make_input(8, 6, 2), independent=True)
    assert get_target("in").batch_independent


def test_onnx_parity() -> None:
    bn = trained_bn(2, 6)
    norm = get_target("in").build(SwapSite(bn=bn, num_features=6, spatial_dims=2)).norm
    onnx_parity(norm, make_input(2, 6, 2))
