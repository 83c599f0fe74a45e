"""The bundled sigmoid-output (multi-label) and regression models: weights load, the architecture is
what the issue-12 measurements rely on, the ground-truth quality is what their metadata states, and
building them is deterministic."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

from normswap.models import multilabel as ml
from normswap.models import regression as rg

MODELS = {
    "multilabel": (ml, ml.multilabel_cnn, ml.MultiLabelCNN),
    "regression": (rg, rg.regression_cnn, rg.RegressionCNN),
}


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


@pytest.mark.parametrize("name", list(MODELS))
def test_weights_are_small_and_match_metadata(name):
    mod, build, cls = MODELS[name]
    assert mod.WEIGHTS_PATH.is_file() and mod.METADATA_PATH.is_file()
    assert mod.WEIGHTS_PATH.stat().st_size < 500_000
    meta = json.loads(mod.METADATA_PATH.read_text())
    assert meta["sha256"] == hashlib.sha256(mod.WEIGHTS_PATH.read_bytes()).hexdigest()
    assert meta["param_count"] == sum(p.numel() for p in cls().parameters())
    assert meta["weights"] == mod.WEIGHTS_PATH.name


@pytest.mark.parametrize("name", list(MODELS))
def test_loads_in_eval_mode_with_trained_weights(name):
    _, build, cls = MODELS[name]
    model = build()
    assert isinstance(model, cls) and not any(m.training for m in model.modules())
    fresh = build(pretrained=False)
    assert not torch.equal(fresh.stem[0].weight, model.stem[0].weight)
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        assert int(bn.num_batches_tracked) > 0  # running statistics were estimated


def test_multilabel_quality_on_the_test_split():
    # measured when the weights were made: label accuracy 0.9924, exact match 0.9756 (450 test digits)
    x, y = ml.load_multilabel("test")
    assert x.shape == (450, 1, 8, 8) and y.shape == (450, 5)
    q = ml.label_accuracy(ml.multilabel_cnn(), x, y)
    assert q["label_accuracy"] >= 0.985
    assert q["exact_match"] >= 0.96
    meta = json.loads(ml.METADATA_PATH.read_text())
    assert q["label_accuracy"] == pytest.approx(meta["test"]["label_accuracy"], abs=1e-4)


def test_regression_quality_on_the_test_split():
    # measured when the weights were made: R² 0.9913, angle MAE 1.98° (450 transformed test digits)
    x, y = rg.load_rotated("test")
    assert x.shape == (450, 1, 16, 16) and y.shape == (450, 2)
    assert float(y.abs().max()) <= 1.0
    q = rg.regression_quality(rg.regression_cnn(), x, y)
    assert q["r2"] >= 0.985
    assert q["angle_mae_deg"] <= 2.5
    meta = json.loads(rg.METADATA_PATH.read_text())
    assert q["r2"] == pytest.approx(meta["test"]["r2"], abs=1e-4)


def test_multilabel_is_genuinely_multilabel_and_has_bn_after_relu_pool():
    y_all = ml.attributes_of(torch.arange(10))
    assert y_all.sum(1).max() >= 3 and y_all.sum(1).min() == 0  # a 6 has 4 labels, a 1 none
    assert len({tuple(r.tolist()) for r in y_all}) >= 8  # label combinations differ between digits
    model = ml.multilabel_cnn()
    down = list(model.down)
    assert [type(m) for m in down] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.BatchNorm2d]
    x, _ = ml.load_multilabel("test")
    with torch.no_grad():
        p = model(x[:64])
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
    assert float((p.sum(1) - 1).abs().max()) > 0.1  # independent sigmoids, not a softmax


@pytest.mark.parametrize("name,kind", [("multilabel", "multilabel"), ("regression", "regression")])
def test_output_kind_is_what_the_model_declares(name, kind):
    kinds = pytest.importorskip("normswap.keep.kinds")
    mod, build, _ = MODELS[name]
    model = build()
    x = mod.calib()[0]
    assert model.normswap_output_kind == kind
    assert kinds.detect(model, [x]).kind.name == kind
    if kind == "multilabel":  # detected from the outputs alone, too
        assert kinds.detect_kind(model(x).detach())[0] == "multilabel"


@pytest.mark.parametrize("name", list(MODELS))
def test_builds_and_data_are_deterministic(name):
    mod, build, _ = MODELS[name]
    a, b = build(), build()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c1, c2 = mod.calib(), mod.calib()
    assert len(c1) == len(c2) and all(torch.equal(u, v) for u, v in zip(c1, c2))
    h1, h2 = mod.heldout(), mod.heldout()
    assert all(torch.equal(u, v) for u, v in zip(h1, h2))
    with torch.no_grad():
        assert torch.equal(a(h1[0]), b(h1[0]))
    # calibration and held-out inputs are different samples
    assert sum(len(t) for t in c1) == 1347 and sum(len(t) for t in h1) == 450


def test_regression_transforms_are_seeded_per_split():
    x8, _ = rg.load_rotated("test")
    again, _ = rg.load_rotated("test")
    assert torch.equal(x8, again)
    xa, ya = rg.transform_digits(torch.ones(4, 1, 8, 8), torch.Generator().manual_seed(5))
    xb, yb = rg.transform_digits(torch.ones(4, 1, 8, 8), torch.Generator().manual_seed(5))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    mass = float(rg.transform_digits(torch.ones(1, 1, 8, 8), torch.Generator().manual_seed(6))[0].sum())
    assert 0.5 * 144 < mass < 1.6 * 144  # the 12x12 digit box, rotated and scaled, stays in the 16x16 frame


@pytest.mark.parametrize("name", list(MODELS))
def test_calib_callable_loads_as_calibration_data(name):
    from normswap.load.data import calibration_batches

    mod, _, cls = MODELS[name]
    data = calibration_batches(f"normswap.models.{name}:calib", batch=64, samples=128)
    batches = list(data)
    assert sum(b[0].shape[0] for b in batches) == 128
    assert tuple(batches[0][0].shape[1:]) == cls.normswap_input_shape[1:]
