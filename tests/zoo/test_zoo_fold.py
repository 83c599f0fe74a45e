"""Real model families: fold → ONNX → parity, with randomized BatchNorm statistics.

CI runs one member of every torchvision classification family that has BatchNorm (plus timm's
BatchNormAct2d families).  The whole zoo:

    NORMSWAP_ZOO=all python -m pytest tests/zoo -q
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

import normswap
from normswap.export import onnx_op_counts
from tests.helpers import count_bn, randomize_bn

tv = pytest.importorskip("torchvision")

# one member per torchvision family with BatchNorm (resnet covers resnext/wide_resnet,
# efficientnet covers v2; the rest run with NORMSWAP_ZOO=all)
FAMILY = [
    "resnet18", "densenet121", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
    "regnet_y_400mf", "mnasnet0_5", "shufflenet_v2_x0_5", "googlenet", "inception_v3", "vgg11_bn",
    "maxvit_t",
]
# classification models without BatchNorm: nothing to fold
NO_BN_FAMILIES = ("alexnet", "convnext", "squeezenet", "swin", "vit_")
NO_BN_MODELS = ("vgg11", "vgg13", "vgg16", "vgg19")


def _all_bn_models() -> list[str]:
    names = tv.models.list_models(module=tv.models)
    return sorted(n for n in names if not n.startswith(NO_BN_FAMILIES) and n not in NO_BN_MODELS)


def _size(name: str) -> int:
    if name.startswith("inception"):
        return 96
    if name.startswith("maxvit"):
        return 224
    return 64


MODELS = _all_bn_models() if os.environ.get("NORMSWAP_ZOO") == "all" else list(FAMILY)


def _build(name: str) -> torch.nn.Module:
    kw = {"num_classes": 10}
    if name in ("googlenet", "inception_v3"):
        kw.update(aux_logits=False, init_weights=False)
    return randomize_bn(tv.models.get_model(name, weights=None, **kw)).eval()


@pytest.mark.zoo
@pytest.mark.parametrize("name", MODELS)
def test_torchvision_model_folds_exports_and_passes_parity(name, tmp_path):
    torch.manual_seed(0)
    model = _build(name)
    assert count_bn(model) > 0
    shape = (1, 3, _size(name), _size(name))
    x = torch.randn(*shape)
    t0 = time.perf_counter()
    conv = normswap.rewrite(model, "fold", (x,))
    assert count_bn(conv.model) == 0, [a for a in conv.actions if a.action == "refuse"]
    # check_parity below runs every pair at batch 1 and 3: the exporter's own check would repeat it
    exp = normswap.export_onnx(conv.model, (x,), tmp_path / f"{name}.onnx", verify=False)
    assert onnx_op_counts(exp.path).get("BatchNormalization", 0) == 0
    res = normswap.check_parity(model, conv.model, exp.path, input_shape=shape)
    _record(name, shape, conv, exp, res, time.perf_counter() - t0)
    assert res, res.summary()
    assert {s.batch for s in res.stats} == {1, 3}


def _record(name, shape, conv, exp, res, seconds) -> None:
    """NORMSWAP_ZOO_REPORT=file.jsonl: one line per model, for the zoo table."""
    path = os.environ.get("NORMSWAP_ZOO_REPORT")
    if not path:
        return
    row = {"model": name, "input": list(shape), "sites": len(conv.actions), "actions": conv.summary(),
           "onnx_nodes": sum(exp.op_counts.values()), "bn_nodes": exp.op_counts.get("BatchNormalization", 0),
           "worst_rel_err": max(s.max_rel for s in res.stats), "passed": bool(res), "seconds": round(seconds, 2)}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


TIMM_CI = ["efficientnet_b0", "mobilenetv3_small_100", "resnet18d", "regnetx_002"]
# NORMSWAP_ZOO=all: one model per timm family a deployment engineer ships with BN; the ones in
# FOLD_EVERY_BN must end with no scale-and-shift (LeViT's reshaped Linear, MixNet's cat, tf_* "same"
# padding, RepVGG/MobileOne branch merging, NF-Net weight standardization baked)
FOLD_EVERY_BN = ["levit_128s", "mixnet_s", "tf_mixnet_s", "tf_efficientnet_b0", "repvgg_a0", "mobileone_s0",
                 "nf_resnet50", "resnetv2_50x1_bit", "efficientnet_b0", "mobilenetv3_small_100", "resnet18d",
                 "regnetx_002", "ghostnet_100", "cspresnet50", "dla34", "rexnet_100", "hrnet_w18_small"]
TIMM = TIMM_CI + [m for m in FOLD_EVERY_BN + ["densenet121", "inception_v3"] if m not in TIMM_CI] \
    if os.environ.get("NORMSWAP_ZOO") == "all" else TIMM_CI


@pytest.mark.zoo
@pytest.mark.parametrize("name", TIMM)
def test_timm_model_folds_and_keeps_activations(name, tmp_path):
    timm = pytest.importorskip("timm")
    kw = {"img_size": 64} if name.startswith("levit") else {}  # LeViT's attention biases fix the resolution
    model = randomize_bn(timm.create_model(name, pretrained=False, num_classes=10, **kw)).eval()
    x = torch.randn(1, 3, 96, 96) if name == "inception_v3" else torch.randn(1, 3, 64, 64)
    conv = normswap.rewrite(model, "fold", (x,))
    assert count_bn(conv.model) == 0
    if name in FOLD_EVERY_BN:
        left = [(a.site, a.reason) for a in conv.actions if a.action == "affine"]
        assert not left, left
    exp = normswap.export_onnx(conv.model, (x,), tmp_path / f"{name}.onnx", verify=False)
    # resnetv2 (BiT, GroupNorm): onnxruntime 1.31's graph optimizations (basic and up) put its output 3e-2
    # off; the exporter's ONNX of the *unconverted* model fails identically, so it is checked unoptimized
    level = "disable" if name.startswith("resnetv2") else "all"
    res = normswap.check_parity(model, conv.model, exp.path, input_shape=x.shape, ort_optimization=level)
    assert res, res.summary()
