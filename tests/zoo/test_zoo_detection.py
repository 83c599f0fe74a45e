"""Beyond classification: detectors (a list of images in, boxes out), segmenters (dict outputs) and
half precision, end to end through the pipeline (fold → ONNX → parity), with randomized BN statistics.

CI runs one detector, one segmenter and one half-precision case. Every torchvision detection and
segmentation model:

    NORMSWAP_ZOO=all python -m pytest tests/zoo -q
"""

from __future__ import annotations

import os

import pytest
import torch

from normswap.export import onnx_op_counts
from normswap.pipeline import run_conversion
from tests.helpers import count_bn, randomize_bn

tv = pytest.importorskip("torchvision")
from torchvision.models import detection, segmentation  # noqa: E402

ALL = os.environ.get("NORMSWAP_ZOO") == "all"
DETECTORS = (sorted(tv.models.list_models(module=detection)) if ALL
             else ["fasterrcnn_mobilenet_v3_large_320_fpn"])
SEGMENTERS = (sorted(tv.models.list_models(module=segmentation)) if ALL else ["deeplabv3_mobilenet_v3_large"])
HALF = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf"] if ALL else ["mobilenet_v3_small"]


def _detector(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kw: dict = {"weights": None, "weights_backbone": None}
    if not name.endswith("_320_fpn") and not name.startswith("ssd"):
        kw.update(min_size=256, max_size=256)  # the 800-px default costs minutes on 2 CPU cores
    return randomize_bn(tv.models.get_model(name, **kw)).eval()


@pytest.mark.zoo
@pytest.mark.parametrize("name", DETECTORS)
def test_detector_folds_exports_and_verifies_before_post_processing(name, tmp_path):
    model = _detector(name)
    if count_bn(model) == 0:
        pytest.skip(f"{name} has no BatchNorm")
    onnx = tmp_path / f"{name}.onnx"
    res = run_conversion(model, "fold", onnx=onnx)
    assert res.exit_code == 0, res.verdict.line
    assert count_bn(res.model) == 0
    assert onnx_op_counts(onnx).get("BatchNormalization", 0) == 0
    stats = res.parity.stats
    pre = [s for s in stats if s.output.startswith("pre.")]
    # the continuous part is held to the tolerance, and it is really compared (not vacuous)
    assert pre and all(s.passed and not s.vacuous for s in pre)
    assert max(s.max_rel for s in pre) < 1e-4
    assert {s.output.split(".")[1] for s in pre} >= {"backbone"}
    # onnxruntime ran the exported detector on the same images and was judged on its outputs
    assert any(s.pair == "original↔onnxruntime" for s in stats)
    assert any(n.startswith("detections on images×1") for n in res.parity.notes)
    assert any("exactly 1 image(s)" in n for n in res.notes)


@pytest.mark.zoo
@pytest.mark.parametrize("name", SEGMENTERS)
def test_segmenter_folds_and_exports_dict_outputs_with_dynamic_batch(name, tmp_path):
    torch.manual_seed(0)
    kw = {"weights": None, "weights_backbone": None}
    if not name.startswith("lraspp"):
        kw["aux_loss"] = True  # two dict outputs: {"out", "aux"}
    model = randomize_bn(tv.models.get_model(name, **kw)).eval()
    onnx = tmp_path / f"{name}.onnx"
    res = run_conversion(model, "fold", onnx=onnx, input_shape=(1, 3, 96, 96))
    assert res.exit_code == 0, res.verdict.line
    assert onnx_op_counts(onnx).get("BatchNormalization", 0) == 0
    ort = [s for s in res.parity.stats if s.pair == "original↔onnxruntime"]
    assert {s.batch for s in ort} == {1, 3}  # the ONNX keeps a dynamic batch
    assert {s.output for s in ort} == ({"out"} if name.startswith("lraspp") else {"out", "aux"})
    assert all(s.passed and not s.vacuous for s in ort)


@pytest.mark.zoo
@pytest.mark.parametrize("name", HALF)
def test_half_precision_fold_exports_fp16_and_passes(name, tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(tv.models.get_model(name, weights=None, num_classes=10)).eval().half()
    onnx = tmp_path / f"{name}.onnx"
    res = run_conversion(model, "fold", onnx=onnx, input_shape=(1, 3, 64, 64))
    assert res.exit_code == 0, res.verdict.line
    assert res.model_info["dtype"] == "float16"
    assert onnx_op_counts(onnx).get("BatchNormalization", 0) == 0
    import onnx as onnx_lib

    proto = onnx_lib.load(str(onnx), load_external_data=False)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx_lib.TensorProto.FLOAT16
