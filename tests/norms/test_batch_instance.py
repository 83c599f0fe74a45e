"""Batch-Instance Norm: y = (ρ·x̂_BN + (1−ρ)·x̂_IN)·γ + β, ρ ∈ [0, 1]; ρ = 1 is exactly the BN."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normswap.norms import SwapSite, get_target
from normswap.norms.batch_instance import BatchInstanceNorm

from ._helpers import (
    assert_batch_independent,
    make_input,
    onnx_parity,
    op_types,
    per_channel,
    ref_normalize,
    rel_err,
    trained_bn,
)


def ref_bin(x, rho, gamma, beta, eps, running=None):
    """float64 paper formula; ``running`` = (mean, var) for eval, None for batch statistics."""
    nd = x.dim()
    spatial = tuple(range(2, nd))
    if running is None:
        x_bn = ref_normalize(x, (0, *spatial), eps)
    else:
        x_bn = (x.double() - per_channel(running[0], nd)) / torch.sqrt(per_channel(running[1], nd) + eps)
    x_in = ref_normalize(x, spatial, eps)
    r = per_channel(rho, nd)
    return (r * x_bn + (1 - r) * x_in) * per_channel(gamma, nd) + per_channel(beta, nd)


def _random_bin(spatial_dims: int, c: int = 5) -> tuple[BatchInstanceNorm, nn.Module]:
    bn = trained_bn(spatial_dims, c)
    m = BatchInstanceNorm.from_bn(bn)
    with torch.no_grad():
        m.rho.copy_(torch.linspace(0.0, 1.0, c))
    return m, bn


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_matches_paper_formula_train_and_eval(spatial_dims: int) -> None:
    m, bn = _random_bin(spatial_dims)
    x = make_input(4, 5, spatial_dims)
    m.eval()
    ref_eval = ref_bin(x, m.rho, bn.weight, bn.bias, bn.eps, (bn.running_mean, bn.running_var))
    assert rel_err(m(x), ref_eval) <= 1e-5
    m.train()
    ref_train = ref_bin(x, m.rho, bn.weight, bn.bias, bn.eps)
    assert rel_err(m(x), ref_train) <= 1e-5


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_running_stats_update_like_batchnorm(spatial_dims: int) -> None:
    m, bn = _random_bin(spatial_dims)
    m.train()
    bn.train()
    for seed in range(3):
        x = make_input(4, 5, spatial_dims, seed=seed)
        m(x)
        bn(x)
    torch.testing.assert_close(m.running_mean, bn.running_mean)
    torch.testing.assert_close(m.running_var, bn.running_var)
    assert int(m.num_batches_tracked) == int(bn.num_batches_tracked)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("kw", [{}, {"affine": False}, {"momentum": None}])
def test_from_bn_rho_one_is_exactly_the_bn(spatial_dims: int, kw: dict) -> None:
    bn = trained_bn(spatial_dims, 6, **kw)
    site = SwapSite(bn=bn, num_features=6, spatial_dims=spatial_dims)
    m = get_target("bin").build(site).norm
    assert torch.equal(m.rho, torch.ones(6))
    x = make_input(4, 6, spatial_dims)
    with torch.no_grad():
        assert rel_err(m.eval()(x), bn.eval()(x)) <= 1e-5
        # and in training (same batch statistics, same running-stat updates)
        y_bin, y_bn = m.train()(x), bn.train()(x)
    assert rel_err(y_bin, y_bn) <= 1e-5
    torch.testing.assert_close(m.running_var, bn.running_var)


def _push_rho(m: BatchInstanceNorm, x: torch.Tensor, direction: float, lr: float = 5.0) -> None:
    """One SGD step on a loss whose gradient moves ρ by about `direction`·lr (∂y/∂ρ = (x̂_BN − x̂_IN)γ)."""
    opt = torch.optim.SGD([m.rho], lr=lr)
    opt.zero_grad()
    m.train()
    y = m(x)
    with torch.no_grad():
        m_ref = copy.deepcopy(m)  # same γ, stats
        m_ref.rho.fill_(1.0)
        d_bn = m_ref.train()(x)
        m_ref.rho.fill_(0.0)
        d = d_bn - m_ref(x)  # (x̂_BN − x̂_IN)·γ
    loss = -direction * (y * d).mean()
    loss.backward()
    opt.step()


@pytest.mark.parametrize(("start", "direction"), [(1.0, 1.0), (0.0, -1.0)])
def test_rho_stays_in_range_after_steps_that_push_it_out(start: float, direction: float) -> None:
    m, _ = _random_bin(2, 4)
    with torch.no_grad():
        m.rho.fill_(start)
    x = make_input(6, 4, 2)
    for _ in range(3):
        _push_rho(m, x, direction)
        raw = m.rho.detach().clone()
        assert ((raw > 1) | (raw < 0)).any(), "the step did not push ρ out of range: the test has no teeth"
        m.train()(x)  # the next training forward clips (the paper clips after each update)
        assert bool(((m.rho >= 0) & (m.rho <= 1)).all())
    # an out-of-range ρ never reaches the output, even in eval without clipping the stored value
    with torch.no_grad():
        m.rho.fill_(1.7)
        y_high = m.eval()(x)
        m.rho.fill_(1.0)
        assert torch.equal(y_high, m(x))
    m.rho.data.fill_(-3.0)
    m.clip_rho_()
    assert torch.equal(m.rho, torch.zeros(4))


def test_rho_gets_gradient_at_one() -> None:
    m, _ = _random_bin(2, 4)
    with torch.no_grad():
        m.rho.fill_(1.0)
    x = make_input(6, 4, 2)
    y = m.train()(x)
    (y * torch.randn_like(y)).sum().backward()
    assert m.rho.grad.abs().min() > 0  # the clamp passes gradient at the boundary


def test_no_spatial_dims_refused_and_batch_dependent() -> None:
    reason = get_target("bin").can_swap(SwapSite(bn=trained_bn(0, 4), num_features=4, spatial_dims=0))
    assert reason is not None and "spatial" in reason
    assert not get_target("bin").batch_independent
    m, _ = _random_bin(2, 6)
    assert_batch_independent(m, make_input(8, 6, 2), independent=False)


def test_onnx_parity_eval() -> None:
    m, _ = _random_bin(2, 6)
    model = onnx_parity(m, make_input(2, 6, 2))
    ops = op_types(model)
    assert "BatchNormalization" in ops and "InstanceNormalization" in ops


def test_bn_without_running_stats_stays_exact() -> None:
    bn = nn.BatchNorm2d(6, track_running_stats=False).eval()
    m = get_target("bin").build(SwapSite(bn=bn, num_features=6, spatial_dims=2)).norm
    assert m.running_mean is None
    x = make_input(4, 6, 2)
    with torch.no_grad():
        assert rel_err(m.eval()(x), bn(x)) <= 1e-5
