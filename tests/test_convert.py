"""The public API: convert/rewrite, verification with first-divergence, save/load, inspect."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import normswap
import normswap.rewriting.fold as fold_mod
from tests.helpers import randomize_bn, rel_err, same_state, snapshot


def _net() -> nn.Module:
    return randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6),
    )).eval()


def test_convert_returns_new_module_and_leaves_caller_alone():
    model = _net()
    snap = snapshot(model)
    trained = normswap.convert(model.train(), to="fold", example_inputs=(torch.randn(2, 3, 8, 8),))
    assert same_state(model, snap) and all(m.training for m in model.modules()), "verification changed the caller"
    model.eval()
    assert not trained.training
    x = torch.randn(2, 3, 8, 8)
    out = normswap.convert(model, to="fold", example_inputs=(x,))
    assert out is not model and same_state(model, snap)
    assert rel_err(model(x), out(x)) < 1e-5
    conv = normswap.rewrite(model, "fold", x)  # a bare tensor is accepted too
    assert conv.exact and bool(conv.verification)
    assert conv.summary() == {"into-producer": 3}


def test_broken_rewrite_is_caught_and_names_the_first_diverging_node(monkeypatch):
    real = fold_mod.fold_conv_bn_weights
    calls = {"n": 0}

    def corrupt(*a, **k):
        w, b = real(*a, **k)
        calls["n"] += 1
        return (w * 1.5, b) if calls["n"] == 2 else (w, b)  # break the second conv only

    monkeypatch.setattr(fold_mod, "fold_conv_bn_weights", corrupt)
    with pytest.raises(normswap.ParityError) as exc:
        normswap.rewrite(_net(), "fold", (torch.randn(2, 3, 8, 8),))
    msg = str(exc.value)
    assert "first divergence at 3" in msg, msg  # node '3' = the second conv, which now stands for BN '4'
    assert "\n" not in msg


def test_bad_example_input_is_input_error():
    with pytest.raises(normswap.InputError, match="example input"):
        normswap.rewrite(_net(), "fold", (torch.randn(2, 5, 8, 8),))


def test_not_a_module_is_input_error():
    with pytest.raises(normswap.InputError):
        normswap.convert("resnet", to="fold")


def test_save_and_load_without_pickle(tmp_path):
    model = _net()
    x = torch.randn(2, 3, 8, 8)
    conv = normswap.rewrite(model, "fold", (x,))
    normswap.save_conversion(conv, tmp_path / "c")
    rec = json.loads((tmp_path / "c" / "conversion.json").read_text())
    assert rec["to"] == "fold" and len(rec["sites"]) == 3
    torch.manual_seed(123)
    fresh = _net()  # same architecture, different weights: everything comes from the saved file
    loaded = normswap.load_conversion(tmp_path / "c", model=fresh)
    assert rel_err(model(x), loaded.model(x)) < 1e-5
    raw = (tmp_path / "c" / "model.safetensors").read_bytes()
    assert not raw.startswith(b"\x80")  # safetensors, not a pickle


def test_load_conversion_keeps_refused_sites(tmp_path):
    model = _net()
    model[4].running_var[0] = float("nan")  # refused at save time: must be refused again at load
    x = torch.randn(2, 3, 8, 8)
    conv = normswap.rewrite(model, "fold", (x,), verify=False)
    assert [a.action for a in conv.actions].count("refuse") == 1
    normswap.save_conversion(conv, tmp_path / "c")
    fresh = _net()  # finite statistics: without the record the site would fold
    again = normswap.load_conversion(tmp_path / "c", model=fresh)
    assert [a.action for a in again.actions].count("refuse") == 1


def test_load_conversion_errors(tmp_path):
    with pytest.raises(normswap.InputError, match="not a saved conversion"):
        normswap.load_conversion(tmp_path)


def test_inspect_lists_every_site_with_producer():
    model = _net().train()
    snap = snapshot(model)
    rows = normswap.inspect(model, (torch.randn(2, 3, 8, 8),))
    assert same_state(model, snap) and all(m.training for m in model.modules())
    assert [r["name"] for r in rows] == ["1", "4", "9"]
    assert rows[0]["producer"].startswith("0 (Conv2d)") and rows[2]["action"] == "into-producer"


def test_targets_lists_fold_and_every_norm():
    names = set(normswap.targets())
    assert {"fold", "gn-ws", "gn", "ln", "ln-channels", "in", "sn", "bin", "wn", "frozen", "sync", "unsync"} <= names
