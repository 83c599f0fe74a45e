"""Group Norm targets (gn, gn-ws): group-count choice, paper formula, transfer, refusals, export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normswap.norms import SwapSite, get_target
from normswap.norms.group import (
    GROUP_NORM_EXPORT,
    GroupNormExport,
    choose_groups,
    group_notes,
)
from normswap.norms.ws import WSConv2d

from ._helpers import (
    CONV_FOR_RANK,
    assert_batch_independent,
    make_input,
    onnx_parity,
    op_types,
    per_channel,
    rel_err,
    trained_bn,
)


def ref_group_norm(x: torch.Tensor, groups: int, gamma, beta, eps: float) -> torch.Tensor:
    """Paper eq.: statistics over (C/G, *S) of each group, per sample; float64."""
    n, c = x.shape[:2]
    xg = x.double().reshape(n, groups, c // groups, -1)
    mu = xg.mean(dim=(2, 3), keepdim=True)
    var = ((xg - mu) ** 2).mean(dim=(2, 3), keepdim=True)
    y = ((xg - mu) / torch.sqrt(var + eps)).reshape(x.shape)
    return y * per_channel(gamma, x.dim()) + per_channel(beta, x.dim())


@pytest.mark.parametrize(
    ("c", "spatial_dims", "expected"),
    [
        (64, 2, 32), (256, 2, 32), (2048, 2, 32),  # the paper's default
        (48, 2, 24), (96, 2, 32), (60, 2, 30),  # closest divisor to 32
        (252, 2, 28),  # tie 28 vs 36 -> fewer groups (more channels per group)
        (32, 2, 16), (16, 2, 8), (3, 2, 1), (1, 2, 1),  # never 1 channel per group by default (except C=1)
        (512, 0, 32), (64, 0, 8), (10, 0, 1), (16, 0, 2),  # [N, C]: ≥ 8 channels per group
    ],
)
def test_choose_groups_default(c: int, spatial_dims: int, expected: int) -> None:
    assert choose_groups(c, spatial_dims=spatial_dims) == expected


def test_choose_groups_requested() -> None:
    assert choose_groups(64, 4) == 4
    assert choose_groups(64, 64, spatial_dims=2) == 64  # explicit instance-norm-like choice is allowed
    with pytest.raises(ValueError, match="--groups 5 does not divide C=64"):
        choose_groups(64, 5)
    with pytest.raises(ValueError, match="does not divide"):
        choose_groups(64, 0)
    with pytest.raises(ValueError, match="one channel per group"):
        choose_groups(16, 16, spatial_dims=0)
    with pytest.raises(ValueError, match="nothing to normalize"):
        choose_groups(1, spatial_dims=0)


def test_group_notes_flag_degenerate_choices() -> None:
    assert any("instance norm" in n for n in group_notes(16, 16, 2))
    assert any("layer norm" in n for n in group_notes(3, 1, 2))
    assert any("sign" in n for n in group_notes(16, 8, 0))
    assert len(group_notes(64, 32, 2)) == 1


@pytest.mark.parametrize("spatial_dims", [0, 1, 2, 3])
def test_gn_matches_paper_formula_and_transfers_affine(spatial_dims: int) -> None:
    c = 64 if spatial_dims else 32
    bn = trained_bn(spatial_dims, c)
    build = get_target("gn").build(SwapSite(bn=bn, num_features=c, spatial_dims=spatial_dims, groups=None))
    gn = build.norm
    g = choose_groups(c, spatial_dims=spatial_dims)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == g and gn.eps == bn.eps
    assert torch.equal(gn.weight, bn.weight) and torch.equal(gn.bias, bn.bias)
    assert gn.weight is not bn.weight
    x = make_input(4, c, spatial_dims)
    ref = ref_group_norm(x, g, bn.weight, bn.bias, bn.eps)
    for mode in (True, False):
        gn.train(mode)
        assert rel_err(gn(x), ref) <= 1e-5


def test_gn_affine_free_bn_gets_identity_affine() -> None:
    bn = trained_bn(2, 8, affine=False)
    gn = get_target("gn").build(SwapSite(bn=bn, num_features=8, spatial_dims=2)).norm
    assert torch.equal(gn.weight, torch.ones(8)) and torch.equal(gn.bias, torch.zeros(8))


def test_gn_refusals() -> None:
    gn = get_target("gn")
    bn = trained_bn(2, 64)
    assert "--groups 5 does not divide C=64" in gn.can_swap(SwapSite(bn=bn, num_features=64, spatial_dims=2, groups=5))
    assert "C=" in gn.can_swap(SwapSite(bn=bn, num_features=32, spatial_dims=2))  # inconsistent site
    assert gn.can_swap(SwapSite(bn=nn.GroupNorm(2, 4), num_features=4, spatial_dims=2)) is not None
    with pytest.raises(ValueError, match="does not divide"):
        gn.swap(SwapSite(bn=bn, num_features=64, spatial_dims=2, groups=7))


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_gn_ws_standardizes_the_producer(rank: int) -> None:
    bn = trained_bn(rank, 32)
    conv = CONV_FOR_RANK[rank](8, 32, 3, padding=1)
    build = get_target("gn-ws").build(SwapSite(bn=bn, num_features=32, spatial_dims=rank, producer=conv))
    assert isinstance(build.norm, nn.GroupNorm) and build.norm.num_groups == 16
    assert type(build.producer).__name__ == f"WSConv{rank}d"
    assert torch.equal(build.producer.weight, conv.weight) and build.producer.weight is not conv.weight


def test_gn_ws_without_usable_conv_is_gn_with_a_note_and_refuses_one_element_filters() -> None:
    t = get_target("gn-ws")
    bn = trained_bn(2, 32)
    b = t.build(SwapSite(bn=bn, num_features=32, spatial_dims=2, producer=None))
    assert b.producer is None and any("no conv" in n for n in b.notes)
    b = t.build(SwapSite(bn=bn, num_features=32, spatial_dims=2, producer=nn.ConvTranspose2d(4, 32, 3)))
    assert b.producer is None and any("ConvTranspose2d" in n for n in b.notes)
    dw1x1 = nn.Conv2d(32, 32, 1, groups=32)
    reason = t.can_swap(SwapSite(bn=bn, num_features=32, spatial_dims=2, producer=dw1x1))
    assert reason is not None and "1-element filter" in reason
    assert get_target("gn").can_swap(SwapSite(bn=bn, num_features=32, spatial_dims=2, producer=dw1x1)) is None


@pytest.mark.parametrize("spatial_dims", [0, 2])
def test_gn_batch_independent(spatial_dims: int) -> None:
    c = 32
    site = SwapSite(bn=trained_bn(spatial_dims, c), num_features=c, spatial_dims=spatial_dims)
    gn = get_target("gn").build(site).norm
    assert_batch_independent(gn, make_input(8, c, spatial_dims), independent=True)


def test_gn_ws_pair_batch_independent() -> None:
    conv = nn.Conv2d(4, 32, 3, padding=1)
    b = get_target("gn-ws").build(SwapSite(bn=trained_bn(2, 32), num_features=32, spatial_dims=2, producer=conv))
    assert_batch_independent(nn.Sequential(b.producer, b.norm), make_input(8, 4, 2), independent=True)


def test_onnx_parity_gn_and_gn_ws_export_form() -> None:
    conv = nn.Conv2d(4, 64, 3, padding=1)
    b = get_target("gn-ws").build(SwapSite(bn=trained_bn(2, 64), num_features=64, spatial_dims=2, producer=conv))
    assert isinstance(b.producer, WSConv2d)
    pair = nn.Sequential(b.producer.export_form(), b.norm).eval()
    x = make_input(2, 4, 2)
    model = onnx_parity(pair, x)
    ops = op_types(model)
    assert ops.count("Conv") == 1 and "InstanceNormalization" in ops and "ReduceMean" not in ops
    with torch.no_grad():
        assert rel_err(pair(x), nn.Sequential(b.producer, b.norm).eval()(x)) <= 1e-5


# -- the export form: nn.GroupNorm as Reshape → InstanceNormalization → Reshape → BatchNormalization(γ, β)


def _random_gn(groups: int, c: int, eps: float = 1e-5) -> nn.GroupNorm:
    gn = nn.GroupNorm(groups, c, eps=eps)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        gn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        gn.bias.copy_(torch.randn(c, generator=g))
    return gn.eval()


@pytest.mark.parametrize("spatial_dims", [0, 1, 2, 3])
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_group_norm_export_form_computes_group_norm(spatial_dims: int, eps: float) -> None:
    gn = _random_gn(4, 16, eps)
    x = make_input(3, 16, spatial_dims)
    with torch.no_grad():
        assert rel_err(GroupNormExport(gn)(x), gn(x)) <= 1e-6


def test_group_norm_exports_as_instance_norm_then_batchnorm_affine(tmp_path) -> None:
    import onnx
    import onnxruntime as ort

    import normswap

    model = nn.Sequential(nn.Conv2d(3, 16, 3), _random_gn(4, 16), nn.ReLU()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = make_input(1, 3, 2)
    res = normswap.export_onnx(model, (x,), tmp_path / "gn.onnx")
    assert res.op_counts["InstanceNormalization"] == 1 and res.op_counts["BatchNormalization"] == 1
    assert res.export_forms == {GROUP_NORM_EXPORT.label: 1}
    assert "1 InstanceNormalization" in res.line() and GROUP_NORM_EXPORT.label in res.line()
    assert res.max_rel_err is not None and res.max_rel_err <= 1e-5
    # the caller's model is untouched
    assert isinstance(model[1], nn.GroupNorm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # onnxruntime drops the exporter's Mul-by-ones / Add-of-zeros: the session runs IN → BN, no broadcast affine
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(str(res.path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "Mul" not in ops and "Add" not in ops and ops.count("BatchNormalization") == 1, ops


def test_affine_free_and_subclassed_group_norms_export_as_they_are(tmp_path) -> None:
    import normswap

    class MyGN(nn.GroupNorm):  # a subclass may compute something else: not matched
        pass

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8, affine=False), MyGN(2, 8)).eval()
    res = normswap.export_onnx(model, (make_input(1, 3, 2),), tmp_path / "plain.onnx")
    assert "BatchNormalization" not in res.op_counts and res.export_forms == {}
