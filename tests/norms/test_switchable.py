"""Switchable Norm: softmax mixtures of IN, LN and BN statistics (separate for mean and variance)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normswap.norms import SwapSite, get_target
from normswap.norms.switchable import DEFAULT_MIX_INIT, SwitchableNorm

from ._helpers import (
    assert_batch_independent,
    assert_fx_traceable,
    make_input,
    onnx_parity,
    per_channel,
    rel_err,
    trained_bn,
)


def _stats(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    mu = x.mean(dim=dims, keepdim=True)
    return mu, ((x - mu) ** 2).mean(dim=dims, keepdim=True)


def ref_sn(x, w_mean, w_var, gamma, beta, eps, running=None):
    """Paper formula, every statistic computed directly over its own axes (float64)."""
    nd = x.dim()
    spatial = tuple(range(2, nd))
    stats = {"ln": _stats(x, tuple(range(1, nd)))}
    if nd > 2:
        stats["in"] = _stats(x, spatial)
    if running is None:
        stats["bn"] = _stats(x, (0, *spatial))
    else:
        stats["bn"] = (per_channel(running[0], nd), per_channel(running[1], nd))
    order = ("in", "ln", "bn") if nd > 2 else ("ln", "bn")
    mu = sum(w_mean[i].double() * stats[k][0] for i, k in enumerate(order))
    var = sum(w_var[i].double() * stats[k][1] for i, k in enumerate(order))
    return (x.double() - mu) / torch.sqrt(var + eps) * per_channel(gamma, nd) + per_channel(beta, nd)


def _random_sn(spatial_dims: int, c: int = 6, seed: int = 0) -> tuple[SwitchableNorm, nn.Module]:
    bn = trained_bn(spatial_dims, c, seed=seed)
    sn = SwitchableNorm.from_bn(bn, spatial_dims)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sn.mean_logits.copy_(torch.randn(len(sn.branches), generator=g))
        sn.var_logits.copy_(torch.randn(len(sn.branches), generator=g))
    return sn, bn


@pytest.mark.parametrize("spatial_dims", [0, 1, 2, 3])
def test_matches_paper_formula_train_and_eval(spatial_dims: int) -> None:
    sn, bn = _random_sn(spatial_dims)
    assert sn.branches == (("in", "ln", "bn") if spatial_dims else ("ln", "bn"))
    x = make_input(5, 6, spatial_dims, shift=2.0)
    w, wv = sn.mixture_weights()
    assert torch.allclose(w.sum(), torch.tensor(1.0)) and not torch.allclose(w, wv)
    sn.eval()
    ref = ref_sn(x, w, wv, bn.weight, bn.bias, bn.eps, (bn.running_mean, bn.running_var))
    assert rel_err(sn(x), ref) <= 1e-5
    sn.train()
    assert rel_err(sn(x), ref_sn(x, w, wv, bn.weight, bn.bias, bn.eps)) <= 1e-5


@pytest.mark.parametrize("spatial_dims", [0, 1, 2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_update_like_batchnorm(spatial_dims: int, momentum: float | None) -> None:
    bn = trained_bn(spatial_dims, 6, momentum=momentum)
    sn = SwitchableNorm.from_bn(bn, spatial_dims)
    sn.train()
    bn.train()
    for seed in range(3):
        x = make_input(4, 6, spatial_dims, seed=seed, shift=3.0)
        sn(x)
        bn(x)
    torch.testing.assert_close(sn.running_mean, bn.running_mean)
    torch.testing.assert_close(sn.running_var, bn.running_var)


@pytest.mark.parametrize("spatial_dims", [0, 2])
def test_from_bn_transfers_and_starts_bn_dominant(spatial_dims: int) -> None:
    bn = trained_bn(spatial_dims, 6)
    sn = get_target("sn").build(SwapSite(bn=bn, num_features=6, spatial_dims=spatial_dims)).norm
    for v in sn.mixture_weights():
        assert v[sn.branches.index("bn")].item() == pytest.approx(DEFAULT_MIX_INIT, abs=1e-6)
        others = [v[i].item() for i, b in enumerate(sn.branches) if b != "bn"]
        assert others == pytest.approx([(1 - DEFAULT_MIX_INIT) / len(others)] * len(others), abs=1e-6)
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(sn, name), getattr(bn, name)), name
    # close to the BN's eval function, but not equal (the target is declared inexact)
    x = make_input(8, 6, spatial_dims)
    with torch.no_grad():
        err = rel_err(sn.eval()(x), bn.eval()(x))
    assert 1e-4 < err < 0.5
    assert not get_target("sn").exact


def _lambda_grad_ratio(mix_init: float) -> float:
    """‖∂L/∂λ‖ / ‖∂L/∂γ‖ for a fixed regression loss at a given BN weight."""
    torch.manual_seed(0)
    bn = trained_bn(2, 8)
    sn = SwitchableNorm.from_bn(bn, 2, mix_init=mix_init).train()
    x = make_input(8, 8, 2, shift=2.0)
    target = torch.randn_like(x)
    ((sn(x) - target) ** 2).mean().backward()
    lam = torch.cat([sn.mean_logits.grad, sn.var_logits.grad]).norm()
    return float(lam / sn.weight.grad.norm())


def test_lambda_gradients_are_not_negligible_at_the_chosen_init() -> None:
    ours, saturated = _lambda_grad_ratio(DEFAULT_MIX_INIT), _lambda_grad_ratio(0.9999)
    assert ours > 1e-2, ours
    assert ours > 100 * saturated, (ours, saturated)


def test_mixture_is_learned_by_fine_tuning() -> None:
    """A few steps on a task that rewards per-sample statistics move the mixture off its start."""
    sn = SwitchableNorm.from_bn(trained_bn(2, 4), 2)
    opt = torch.optim.Adam(sn.parameters(), lr=0.05)
    start = sn.mixture_weights()[0].detach().clone()
    for seed in range(10):
        x = make_input(8, 4, 2, seed=seed, shift=3.0) * (1 + torch.arange(8.0).reshape(8, 1, 1, 1))
        target = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)  # instance-normalized
        opt.zero_grad()
        ((sn.train()(x) - target) ** 2).mean().backward()
        opt.step()
    assert (sn.mixture_weights()[0] - start).abs().max() > 0.02


def test_validation() -> None:
    with pytest.raises(ValueError, match="spatial_dims"):
        SwitchableNorm(4, spatial_dims=5)
    with pytest.raises(ValueError, match="mix_init"):
        SwitchableNorm.from_bn(trained_bn(2, 4), 2, mix_init=1.0)
    sn = SwitchableNorm(4, spatial_dims=0).train()
    with pytest.raises(ValueError, match="more than 1 value"):
        sn(torch.randn(1, 4))
    assert get_target("sn").can_swap(SwapSite(bn=trained_bn(0, 1), num_features=1, spatial_dims=0)) is not None


def test_batch_dependent_in_training() -> None:
    sn, _ = _random_sn(2)
    assert_batch_independent(sn, make_input(8, 6, 2), independent=False)
    assert not get_target("sn").batch_independent


@pytest.mark.parametrize("spatial_dims", [0, 2])
def test_onnx_parity_and_fx(spatial_dims: int) -> None:
    sn, _ = _random_sn(spatial_dims)
    x = make_input(3, 6, spatial_dims)
    onnx_parity(sn, x)
    assert_fx_traceable(sn.eval(), x)


def test_bn_without_running_stats_uses_batch_stats_in_eval() -> None:
    bn = nn.BatchNorm2d(6, track_running_stats=False)
    sn = get_target("sn").build(SwapSite(bn=bn, num_features=6, spatial_dims=2)).norm
    assert sn.running_mean is None and not sn.track_running_stats
    x = make_input(4, 6, 2)
    w, wv = sn.mixture_weights()
    assert rel_err(sn.eval()(x), ref_sn(x, w, wv, torch.ones(6), torch.zeros(6), bn.eps)) <= 1e-5

