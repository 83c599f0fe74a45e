"""Weight Standardization: WSConv1d/2d/3d against the paper formula, export_form, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from normswap.norms.ws import (
    DEFAULT_EPS,
    WSConv1d,
    WSConv2d,
    WSConv3d,
    ws_conv_from,
    ws_refusal,
)

from ._helpers import (
    CONV_FOR_RANK,
    SPATIAL,
    assert_fx_traceable,
    onnx_parity,
    op_types,
    rel_err,
)

WS_FOR_RANK = {1: WSConv1d, 2: WSConv2d, 3: WSConv3d}
CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def ref_standardize(w: torch.Tensor, eps: float) -> torch.Tensor:
    """Ŵ_i = (W_i − μ_i)/√(1/I Σ_j (W_ij − μ_i)² + ε), float64, written out per output channel."""
    w = w.detach().double()
    out = torch.empty_like(w)
    for i in range(w.shape[0]):
        row = w[i].flatten()
        mu = row.sum() / row.numel()
        var = ((row - mu) ** 2).sum() / row.numel()
        out[i] = (w[i] - mu) / torch.sqrt(var + eps)
    return out


def _conv(rank: int, groups: int = 1, **kw) -> nn.Module:
    torch.manual_seed(rank + groups)
    conv = WS_FOR_RANK[rank](4, 6, 3, padding=1, groups=groups, bias=True, **kw)
    with torch.no_grad():
        conv.weight.mul_(torch.linspace(0.1, 3.0, 6).reshape((-1,) + (1,) * (rank + 1)))
        conv.weight.add_(0.2)  # nonzero means, so the centring matters
    return conv


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_forward_matches_paper_formula_train_and_eval(rank: int, groups: int) -> None:
    conv = _conv(rank, groups)
    x = torch.randn((3, 4, *SPATIAL[rank]))
    w_ref = ref_standardize(conv.weight, conv.eps)
    assert rel_err(conv.standardized_weight(), w_ref) <= 1e-6
    y_ref = CONV_FN[rank](x.double(), w_ref, conv.bias.double(), 1, 1, 1, groups)
    for mode in (True, False):
        conv.train(mode)
        assert rel_err(conv(x), y_ref) <= 1e-5


def test_standardized_weight_has_zero_mean_unit_biased_variance() -> None:
    conv = _conv(2)
    w = conv.standardized_weight().detach().double().flatten(1)
    assert torch.allclose(w.mean(1), torch.zeros(6, dtype=torch.float64), atol=1e-6)
    # biased variance of Ŵ is σ²/(σ² + ε) with σ² the biased variance of W (ε inside the root)
    s2 = conv.weight.detach().double().flatten(1).var(1, correction=0)
    assert torch.allclose(w.var(1, correction=0), s2 / (s2 + conv.eps), rtol=1e-5)
    assert (s2 / (s2 + conv.eps))[0] < 0.999  # the small filter shows ε's share: the check has teeth


def test_convention_is_timm_stdconv_biased_eps_inside() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    std = timm_layers.StdConv2d(5, 7, 3, padding=1, eps=DEFAULT_EPS)
    ws = WSConv2d.from_conv(std, eps=DEFAULT_EPS)
    x = torch.randn(2, 5, 8, 8)
    assert rel_err(ws(x), std(x)) <= 1e-5
    # …and differs from the official code's unbiased std + ε outside (measurable on small filters)
    small = WSConv1d(2, 3, 2, eps=1e-5)
    w = small.weight.detach().double()
    w_off = (w - w.mean((1, 2), keepdim=True)) / (w.flatten(1).std(1).reshape(-1, 1, 1) + 1e-5)
    assert rel_err(small.standardized_weight(), w_off) > 1e-2


def test_per_output_channel_scaling_is_invisible() -> None:
    """The pitfall the exporter must know: scaling W per output channel does not change a WS conv
    (up to ε's share, negligible for unit-variance filters)."""
    conv = _conv(2)
    with torch.no_grad():
        conv.weight.normal_()
    x = torch.randn(2, 4, 5, 5)
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(torch.linspace(0.5, 4.0, 6).reshape(-1, 1, 1, 1))
    assert rel_err(conv(x), before) <= 1e-5


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_one_element_filter_is_refused(rank: int) -> None:
    with pytest.raises(ValueError, match="1-element filter"):
        WS_FOR_RANK[rank](4, 4, 1, groups=4)
    plain = CONV_FOR_RANK[rank](1, 3, 1)
    assert "1-element filter" in ws_refusal(plain)
    with pytest.raises(ValueError, match="1-element filter"):
        ws_conv_from(plain)
    assert ws_refusal(CONV_FOR_RANK[rank](2, 3, 1)) is None  # 2 elements: fine


def test_refuses_non_conv_and_conv_subclasses() -> None:
    assert "Conv1d/2d/3d" in ws_refusal(nn.Linear(3, 4))
    assert ws_refusal(nn.ConvTranspose2d(3, 4, 3)) is not None

    class MyConv(nn.Conv2d):
        pass

    with pytest.raises(ValueError, match="MyConv"):
        ws_conv_from(MyConv(3, 4, 3))


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_from_conv_keeps_hyperparameters(rank: int) -> None:
    conv = CONV_FOR_RANK[rank](4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=True, padding_mode="reflect")
    ws = ws_conv_from(conv)
    assert isinstance(ws, WS_FOR_RANK[rank]) and isinstance(ws, CONV_FOR_RANK[rank])
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(ws, attr) == getattr(conv, attr)
    assert torch.equal(ws.weight, conv.weight) and torch.equal(ws.bias, conv.bias)
    assert ws.weight is not conv.weight  # the caller's conv is untouched
    x = torch.randn((2, 4, *(s + 6 for s in SPATIAL[rank])))
    ref = CONV_FN[rank](
        F.pad(x.double(), conv._reversed_padding_repeated_twice, mode="reflect"),
        ref_standardize(conv.weight, ws.eps), conv.bias.double(), 2, 0, 2, 2,
    )
    assert rel_err(ws(x), ref) <= 1e-5


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_export_form_is_a_plain_conv_with_same_function(rank: int) -> None:
    ws = _conv(rank)
    plain = ws.export_form()
    assert type(plain) is CONV_FOR_RANK[rank]
    x = torch.randn((2, 4, *SPATIAL[rank]))
    assert rel_err(plain(x), ws(x)) <= 1e-5
    assert torch.equal(plain.bias, ws.bias)


def test_onnx_export_form_is_a_single_conv() -> None:
    ws = _conv(2).eval()
    x = torch.randn(2, 4, 9, 9)
    model = onnx_parity(ws.export_form(), x)
    assert op_types(model) == ["Conv"], op_types(model)
    # the export form computes what the WS module computes
    from ._helpers import run_onnx

    assert rel_err(torch.from_numpy(run_onnx(model, x)), ws(x)) <= 1e-5


def test_onnx_raw_module_recomputes_statistics() -> None:
    """Exported without export_form, the standardization is recomputed at inference (why we bake)."""
    ws = _conv(2).eval()
    model = onnx_parity(ws, torch.randn(2, 4, 9, 9))
    assert len(op_types(model)) > 1 and "Conv" in op_types(model)


def test_gradient_reaches_raw_weight_and_training_lowers_loss() -> None:
    torch.manual_seed(0)
    ws = WSConv2d(3, 4, 3, padding=1)
    x, target = torch.randn(8, 3, 6, 6), torch.randn(8, 4, 6, 6)
    opt = torch.optim.Adam(ws.parameters(), lr=0.05)
    first = None
    for _ in range(20):
        opt.zero_grad()
        loss = ((ws(x) - target) ** 2).mean()
        loss.backward()
        assert ws.weight.grad is not None and ws.weight.grad.abs().sum() > 0
        opt.step()
        first = loss.item() if first is None else first
    assert ((ws(x) - target) ** 2).mean().item() < 0.9 * first


def test_fx_traceable() -> None:
    ws = _conv(2).eval()
    assert_fx_traceable(nn.Sequential(ws), torch.randn(1, 4, 5, 5))
