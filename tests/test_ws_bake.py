"""Weight standardization baked at fold time (issue 11 A): normswap's WSConv and timm's StdConv family
become plain convolutions holding Ŵ, reported as ``ws-baked``; exact in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normswap.rewriting.fold import bake_ws_weight, fold
from normswap.norms.ws import WSConv1d, WSConv2d, standardize


def _run(m, x):
    with torch.no_grad():
        return m.eval()(x)


def _f64_rel(model, x):
    m64 = copy.deepcopy(model).double().eval()
    res = fold(m64, (x.double(),))
    a, b = _run(m64, x.double()), _run(res.model, x.double())
    return res, float((a - b).abs().max() / a.abs().max())


def test_bake_weight_matches_standardize_and_timm_batch_norm():
    w = torch.randn(8, 3, 3, 3, dtype=torch.float64)
    assert torch.allclose(bake_ws_weight(w, 1e-6), standardize(w, 1e-6), atol=0, rtol=1e-12)
    gain = torch.rand(8, 1, 1, 1, dtype=torch.float64) + 0.5
    ref = torch.nn.functional.batch_norm(w.reshape(1, 8, -1), None, None, weight=(gain * 0.3).view(-1),
                                         training=True, momentum=0.0, eps=1e-5).reshape_as(w)
    assert torch.allclose(bake_ws_weight(w, 1e-5, gain, 0.3), ref, atol=1e-14, rtol=1e-12)


class WSBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = WSConv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = WSConv2d(8, 8, 3, stride=2, padding=1, groups=2, padding_mode="reflect")
        self.bn2 = nn.BatchNorm2d(8)
        self.c3 = WSConv1d(8, 4, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.c1(x)))
        x = self.bn2(self.c2(x))
        return self.c3(x.flatten(2))


def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
    return model


def test_normswap_ws_baked_then_bn_folds():
    model = _randomize_bn(WSBN()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 10, 10)
    res, rel = _f64_rel(model, x)
    assert rel < 1e-12
    acts = {a.site: a.action for a in fold(model, (x,)).actions}
    assert acts == {"c1": "ws-baked", "c2": "ws-baked", "c3": "ws-baked", "bn1": "into-producer", "bn2": "into-producer"}
    out = fold(model, (x,)).model
    assert not any(isinstance(m, (WSConv1d, WSConv2d, nn.BatchNorm2d)) for m in out.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # caller's model untouched
    assert isinstance(model.c1, WSConv2d)


def test_shared_ws_conv_stays_one_module():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = WSConv2d(4, 4, 3, padding=1)
            self.d = self.c

        def forward(self, x):
            return self.d(self.c(x))

    model = Twice().eval()
    res = fold(model, (torch.randn(1, 4, 6, 6),))
    assert [a.action for a in res.actions] == ["ws-baked"]
    _, rel = _f64_rel(model, torch.randn(1, 4, 6, 6))
    assert rel < 1e-12


timm = pytest.importorskip("timm")


@pytest.mark.parametrize("cls", ["StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"])
@pytest.mark.parametrize("hw", [(9, 9), (10, 7)])
def test_timm_std_convs_baked_exactly(cls, hw):
    from timm.layers import std_conv

    conv_cls = getattr(std_conv, cls)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_cls(3, 6, 3, stride=2)
            self.bn = nn.BatchNorm2d(6)
            self.b = conv_cls(6, 4, 5, stride=1, dilation=2) if "Same" in cls else conv_cls(6, 4, 1)

        def forward(self, x):
            return self.b(torch.relu(self.bn(self.a(x))))

    torch.manual_seed(0)
    model = _randomize_bn(Net()).eval()
    if hasattr(model.a, "gain"):
        model.a.gain.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, *hw)
    res, rel = _f64_rel(model, x)
    assert rel < 1e-12, rel
    kinds = {a.site: a.action for a in res.actions}
    assert kinds["a"] == kinds["b"] == "ws-baked"
    assert not any(type(m).__module__.startswith("timm.") for m in res.model.modules())
    # float32: within the default parity tolerance
    out = fold(model, (x,)).model
    a, b = _run(model, x), _run(out, x)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5
    assert isinstance(model.a, conv_cls)


def test_nf_model_onnx_has_no_batchnorm(tmp_path):
    from normswap.export import export_onnx

    model = timm.create_model("nf_regnet_b0", pretrained=False).eval()
    x = torch.randn(1, 3, 32, 32)
    res = fold(model, (x,))
    assert {a.action for a in res.actions} == {"ws-baked"}
    exp = export_onnx(res.model, (x,), tmp_path / "nf.onnx", verify=False)
    assert exp.op_counts.get("BatchNormalization", 0) == 0
