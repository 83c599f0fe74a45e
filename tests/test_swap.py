"""The swap pass on whole models: every target converts, trains, exports and passes parity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normswap
from normswap.norms import registry
from normswap.norms.group import GROUP_NORM_EXPORT
from tests.helpers import count_bn, randomize_bn, rel_err, same_state, snapshot

tv = pytest.importorskip("torchvision")

ALL = ["gn-ws", "gn", "ln", "ln-channels", "in", "sn", "bin", "wn", "frozen", "sync"]
EXACT = {"bin", "wn", "frozen", "sync", "unsync"}
BATCH_INDEPENDENT = {"gn-ws", "gn", "ln", "ln-channels", "in"}
# big enough that the last feature maps are not 2x2: instance statistics over 4 values are
# ill-conditioned in float32 (torch and onnxruntime then differ by ~1e-4 for legitimate reasons)
MODELS = {"resnet18": 64, "mobilenet_v2": 128, "efficientnet_b0": 128}


def test_registry_names_and_exactness():
    assert set(ALL) | {"unsync"} <= set(registry.TARGETS)
    for name in EXACT:
        assert registry.TARGETS[name].exact, name
    for name in set(ALL) - EXACT:
        assert not registry.TARGETS[name].exact, name
    for name in BATCH_INDEPENDENT:
        assert registry.TARGETS[name].batch_independent, name


def _model(name: str) -> nn.Module:
    return randomize_bn(tv.models.get_model(name, weights=None, num_classes=10)).eval()


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("to", ALL)
def test_target_converts_trains_exports_and_passes_parity(model_name, to, tmp_path):
    torch.manual_seed(0)
    model = _model(model_name)
    snap = snapshot(model)
    size = MODELS[model_name]
    x = torch.randn(2, 3, size, size)
    conv = normswap.rewrite(model, to, (x,))
    assert same_state(model, snap), "the caller's model was mutated"
    swapped = [a for a in conv.actions if a.action == "swapped"]
    refused = [a for a in conv.actions if a.action == "refuse"]
    assert swapped, refused
    for a in refused:  # every refusal carries its reason
        assert a.reason
    if to not in ("frozen", "sync", "bin", "sn") and not refused:
        assert count_bn(conv.model) == 0
    if to in EXACT:
        with torch.no_grad():
            assert rel_err(model(x), conv.model.eval()(x)) <= 1e-5

    # one optimizer step in training mode works and changes the weights
    student = conv.model.train()
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)
    loss = nn.functional.cross_entropy(student(torch.randn(4, 3, size, size)), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    student.eval()

    exp = normswap.export_onnx(student, (x[:1],), tmp_path / f"{to}.onnx", verify=False)
    # no BatchNorm is left as one: the only BatchNormalization nodes are the GroupNorms' affines (their export form)
    gn_affines = sum(exp.export_forms.values())
    assert exp.op_counts.get("BatchNormalization", 0) == gn_affines or to in ("sync", "frozen", "bin", "sn")
    assert (gn_affines > 0) == (to in ("gn", "gn-ws", "ln"))
    res = normswap.check_parity(student, None, exp.path, input_shape=(1, 3, size, size))
    assert res, res.summary()


def test_gn_ws_export_has_no_standardization_arithmetic(tmp_path):
    model = _model("resnet18")
    x = torch.randn(1, 3, 64, 64)
    conv = normswap.rewrite(model, "gn-ws", (x,))
    exp = normswap.export_onnx(conv.model, (x,), tmp_path / "gnws.onnx")
    ops = exp.op_counts
    # each GroupNorm: InstanceNormalization, then its γ/β as a BatchNormalization (the export form)
    assert ops.get("BatchNormalization", 0) == ops["InstanceNormalization"] == exp.export_forms[GROUP_NORM_EXPORT.label] == 20
    # WS baked into the conv weights: nothing computes a weight mean or std at inference
    assert ops.get("Conv", 0) == 20
    for op in ("ReduceMean", "Sqrt", "Div", "Var", "ReduceSumSquare"):
        assert ops.get(op, 0) <= _norm_op_budget(op, ops), ops


def _norm_op_budget(op: str, ops: dict) -> int:
    # GroupNorm may lower to InstanceNormalization/GroupNormalization or to reductions; 20 norms at most
    return 20 * 2


def test_batch_independence_in_training_mode():
    model = _model("resnet18")
    x = torch.randn(8, 3, 32, 32)
    for to in ["gn", "ln", "gn-ws"]:
        m = normswap.convert(model, to, (x[:2],)).train()
        with torch.no_grad():
            alone, batched = m(x[:1]), m(x)[:1]
        assert rel_err(batched, alone) < 1e-5, to
    bn = model.train()
    with torch.no_grad():
        assert rel_err(bn(x)[:1], bn(x[:1].repeat(2, 1, 1, 1))[:1]) > 1e-3  # BN is batch-dependent


def test_batchnormact_keeps_activation_when_swapped():
    timm_layers = pytest.importorskip("timm.layers")
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 32, 3), timm_layers.BatchNormAct2d(32, act_layer=nn.ReLU))).eval()
    m = normswap.convert(model, "gn", (torch.randn(2, 3, 8, 8),))
    assert any(isinstance(x, nn.ReLU) for x in m.modules())
    out = m(torch.randn(2, 3, 8, 8))
    assert (out >= 0).all() and (out == 0).any()


def test_groups_that_do_not_divide_are_refused_with_reason():
    model = _model("resnet18")
    # every site refused: nothing was converted, which is an error and not a success
    with pytest.raises(normswap.RewriteError, match=r"rewrote none of the 20 norm site\(s\): bn1: --groups 7 does not divide C=64"):
        normswap.rewrite(model, "gn", (torch.randn(1, 3, 32, 32),), groups=7)
    rows = normswap.inspect(model, (torch.randn(1, 3, 32, 32),), to="gn", groups=7)  # inspect still says why, per site
    assert all(r["action"] == "refuse" and "7" in r["reason"] for r in rows)
    for bad in (0, -4):
        with pytest.raises(normswap.InputError, match="--groups"):
            normswap.rewrite(model, "gn", (torch.randn(1, 3, 32, 32),), groups=bad)
    # groups that fit some sites but not others: a partial swap, each refusal with its reason
    conv = normswap.rewrite(model, "gn", (torch.randn(1, 3, 32, 32),), groups=128)
    assert any(a.rewritten for a in conv.actions) and any(a.action == "refuse" for a in conv.actions)


def test_shared_conv_is_not_standardized():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 32, 3)
            self.bn = nn.BatchNorm2d(32)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = randomize_bn(Shared()).eval()
    conv = normswap.rewrite(model, "gn-ws", (torch.randn(2, 3, 8, 8),))
    assert type(conv.model.conv) is nn.Conv2d  # the other consumer still sees the plain conv
    assert isinstance(conv.model.bn, nn.GroupNorm)


def test_unsync_round_trip():
    model = _model("resnet18")
    x = torch.randn(2, 3, 32, 32)
    synced = normswap.convert(model, "sync", (x,))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    back = normswap.convert(synced, "unsync", (x,))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in back.modules())
    with torch.no_grad():
        assert rel_err(model(x), back.eval()(x)) < 1e-6


def test_swap_keeps_every_submodule_train_flag():
    """The swapped copy keeps each submodule's own mode (a Dropout frozen in eval inside a model in
    training mode stays in eval), and the caller's model is untouched."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5)).train()
    m[3].eval()
    res = normswap.rewrite(m, "gn", (torch.randn(2, 3, 8, 8),), verify=False)
    assert res.model.training and not res.model[3].training
    assert m.training and not m[3].training
