"""The bundled digits ResNet: weights load, the architecture is what the other tests rely on, it is accurate."""

from __future__ import annotations

import copy
import hashlib
import json
import sys

import pytest
import torch
import torch.fx
from torch import nn

from normswap.errors import InputError
from normswap.models.digits import METADATA_PATH, WEIGHTS_PATH, DigitsResNet, digits_resnet, load_digits


@pytest.fixture(scope="module")
def model() -> DigitsResNet:
    return digits_resnet()


def test_weights_file_is_small_and_matches_metadata():
    assert WEIGHTS_PATH.is_file()
    assert WEIGHTS_PATH.stat().st_size < 1_000_000
    meta = json.loads(METADATA_PATH.read_text())
    assert meta["sha256"] == hashlib.sha256(WEIGHTS_PATH.read_bytes()).hexdigest()
    assert meta["param_count"] == sum(p.numel() for p in DigitsResNet().parameters())
    assert meta["test_accuracy"] >= 0.97


def test_bundled_model_loads_in_eval_mode(model):
    assert isinstance(model, DigitsResNet)
    assert not model.training
    assert all(not m.training for m in model.modules())
    # the shipped weights are not the random init
    fresh = digits_resnet(pretrained=False)
    assert not torch.equal(fresh.stem[0].weight, model.stem[0].weight)
    assert DigitsResNet.normswap_input_shape == (1, 1, 8, 8)


def test_architecture_has_the_norm_sites_a_rewriter_needs(model):
    bn2d = [m for m in model.modules() if type(m) is nn.BatchNorm2d]
    bn1d = [m for m in model.modules() if type(m) is nn.BatchNorm1d]
    assert len(bn2d) == 8  # stem + 2 per block x 3 + projection shortcut
    assert len(bn1d) == 1
    for bn in bn2d + bn1d:
        assert bn.num_features % 32 == 0
        assert bn.eps == 1e-5 and bn.momentum == 0.1 and bn.affine and bn.track_running_stats
        assert int(bn.num_batches_tracked) > 0  # running stats were estimated, not left at init
    # Linear (with bias) -> BatchNorm1d in the head
    assert isinstance(model.head[0], nn.Linear) and model.head[0].bias is not None
    assert isinstance(model.head[1], nn.BatchNorm1d)
    # one projection (1x1 conv + BN) shortcut, the others identity
    assert isinstance(model.layer2.shortcut[0], nn.Conv2d) and model.layer2.shortcut[0].kernel_size == (1, 1)
    assert isinstance(model.layer1.shortcut, nn.Identity) and isinstance(model.layer3.shortcut, nn.Identity)


def test_symbolic_trace_matches_eager(model):
    gm = torch.fx.symbolic_trace(model)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "head.1" in targets and "layer2.shortcut.1" in targets
    x = torch.rand(4, *DigitsResNet.normswap_input_shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
        assert model(x).shape == (4, 10)


def test_test_accuracy(model):
    pytest.importorskip("sklearn")
    X, y = load_digits("test")
    assert X.shape == (450, 1, 8, 8) and X.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(X.min()) and float(X.max()) <= 1.0
    with torch.no_grad():
        acc = (model(X).argmax(1) == y).float().mean().item()
    assert acc >= 0.97


def test_running_stats_match_the_training_population(model):
    """Eval mode on the train split ~= train mode on the whole train split as one batch.

    This holds only if the running statistics are the train-split population statistics, which is
    what a deployment fold bakes in."""
    pytest.importorskip("sklearn")
    X, _ = load_digits("train")
    batch_mode = copy.deepcopy(model).train()
    for m in batch_mode.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0  # don't touch the copy's running stats either
    with torch.no_grad():
        eval_logits = model(X)
        batch_logits = batch_mode(X)
    # the only gap is BN's unbiased (running) vs biased (batch) variance: n/(n-1), n = 1347 for BN1d.
    # (measured: 5e-3 of a max |logit| of 11; momentum-0.1 running stats over one epoch give 0.8, which fails)
    torch.testing.assert_close(eval_logits, batch_logits, rtol=0, atol=0.01 * float(batch_logits.abs().max()))
    assert torch.equal(eval_logits.argmax(1), batch_logits.argmax(1))


def test_split_is_deterministic_disjoint_and_stratified():
    pytest.importorskip("sklearn")
    X_all, y_all = load_digits("all")
    X_tr, y_tr = load_digits("train")
    X_te, y_te = load_digits("test")
    assert len(X_all) == 1797 and len(X_tr) + len(X_te) == len(X_all)
    assert len(X_te) == 450
    X_tr2, y_tr2 = load_digits("train")
    assert torch.equal(X_tr, X_tr2) and torch.equal(y_tr, y_tr2)
    # the 1797 digits images are pairwise distinct, so comparing images is comparing rows
    def keys(X, y):
        return [row.tobytes() + bytes([label]) for row, label in zip(X.reshape(len(X), -1).numpy(), y.tolist())]

    k_all, k_tr, k_te = keys(X_all, y_all), keys(X_tr, y_tr), keys(X_te, y_te)
    assert len(set(k_all)) == len(k_all)
    assert set(k_tr).isdisjoint(k_te)
    assert set(k_tr) | set(k_te) == set(k_all)
    # stratified: every class in both splits, in proportion
    counts_all = torch.bincount(y_all, minlength=10).float()
    counts_te = torch.bincount(y_te, minlength=10).float()
    assert bool((counts_te > 0).all())
    assert torch.allclose(counts_te / len(y_te), counts_all / len(y_all), atol=0.01)


def test_bad_split_is_an_input_error():
    with pytest.raises(InputError, match="split"):
        load_digits("validation")


def test_missing_sklearn_is_a_one_line_input_error(monkeypatch):
    for name in list(sys.modules):
        if name == "sklearn" or name.startswith("sklearn."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn...` raise ImportError
    with pytest.raises(InputError) as info:
        load_digits("test")
    msg = str(info.value)
    assert "\n" not in msg and "pip install 'normswap[train]'" in msg
