"""List-of-images models and detectors: inputs, the pre-post-processing probe, fixed-count ONNX
export, parity at the right level, box/score/label agreement (normswap.detection,
normswap.pipeline.image_lists). The torchvision zoo members run in tests/zoo/test_zoo_detection.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import normswap
from normswap.detection import Probed, detection_agreement, image_list_inputs, takes_image_list
from normswap.export import onnx_op_counts
from normswap.parity.rule import compare_arrays, judge
from normswap.pipeline import run_conversion
from tests.helpers import count_bn, randomize_bn

tv = pytest.importorskip("torchvision")


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.out_channels = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def tiny_detector(score_thresh: float = 0.0) -> nn.Module:
    """A small Faster R-CNN (BN backbone, one feature map) that runs in milliseconds."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(0)
    m = FasterRCNN(_Backbone(), num_classes=3, min_size=64, max_size=64, box_score_thresh=score_thresh, box_detections_per_img=10,
                   rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20,
                   rpn_anchor_generator=AnchorGenerator(((16, 32),), ((0.5, 1.0, 2.0),)),
                   box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2))
    return randomize_bn(m).eval()


class ListModel(nn.Module):
    """A user model called with a list of images (not a registered detector)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(torch.stack(list(images))))).mean((2, 3))


def test_image_list_inputs_are_seeded_images_in_unit_range():
    a = image_list_inputs((3, 8, 8), 2)
    b = image_list_inputs((1, 3, 8, 8), 2)
    (label, (imgs,)), = a
    assert label == "images×2" and len(imgs) == 2 and imgs[0].shape == (3, 8, 8)
    assert all(bool((x >= 0).all() and (x < 1).all()) for x in imgs)
    assert all(torch.equal(x, y) for x, y in zip(imgs, b[0][1][0]))
    assert not torch.equal(imgs[0], imgs[1])


def test_detection_agreement_counts_matches_by_label_and_iou():
    ref = [{"boxes": torch.tensor([[0., 0., 10., 10.], [20., 20., 30., 30.]]), "labels": torch.tensor([1, 2]),
            "scores": torch.tensor([0.9, 0.8])}]
    cand = [{"boxes": torch.tensor([[0., 0., 10., 11.], [20., 20., 30., 30.]]), "labels": torch.tensor([1, 3]),
             "scores": torch.tensor([0.85, 0.8])}]
    a = detection_agreement(ref, cand)
    assert (a["reference"], a["candidate"], a["matched"]) == (2, 2, 1)  # the second box has another label
    assert a["max_score_diff"] == pytest.approx(0.05, abs=1e-6)
    assert a["max_box_shift"] == pytest.approx(1.0)


def test_probe_compares_pre_post_processing_tensors_and_catches_a_wrong_bn():
    m = tiny_detector()
    assert takes_image_list(m)
    (_, xs), = image_list_inputs((3, 64, 64), 2)
    with torch.no_grad():
        out = Probed(m)(*xs)
    assert {"backbone.0", "rpn.objectness.0", "rpn.box_deltas.0", "roi.class_logits", "roi.box_regression"} <= set(out["pre"])
    assert len(out["post"]) == 2
    # a wrong running mean in the backbone is visible before post-processing: the rule fails it
    wrong = copy.deepcopy(m)
    wrong.backbone.body[1].running_mean += 0.3
    with torch.no_grad():
        bad = Probed(wrong)(*xs)
    stats, _ = judge(Probed(m), out, bad, xs, pair="original↔rewritten", batch="images", atol=1e-5, rtol=1e-4)
    pre = [s for s in stats if s.output.startswith("pre.")]
    assert any(not s.passed for s in pre)


def test_rewrite_of_a_detector_verifies_through_the_probe_and_leaves_the_caller_alone():
    m = tiny_detector()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    (_, xs), = image_list_inputs((3, 64, 64), 1)
    conv = normswap.rewrite(m, "fold", xs)
    assert count_bn(conv.model) == 0
    outs = {s.output for s in conv.verification.stats}
    assert "pre.backbone.0" in outs and any(o.startswith("post_0") for o in outs)
    assert conv.verification
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_convert_a_detector_exports_a_fixed_image_count_and_checks_onnxruntime(tmp_path):
    onnx = tmp_path / "det.onnx"
    res = run_conversion(tiny_detector(), "fold", onnx=onnx, images=2, input_shape=(3, 64, 64))
    assert res.exit_code == 0, res.verdict.line
    assert onnx.exists() and onnx_op_counts(onnx).get("BatchNormalization", 0) == 0
    assert res.export.input_names == ["image_0", "image_1"]
    pairs = {s.pair for s in res.parity.stats}
    assert pairs == {"original↔rewritten", "original↔onnxruntime", "rewritten↔onnxruntime"}
    pre = [s for s in res.parity.stats if s.output.startswith("pre.")]
    assert pre and all(s.passed and not s.vacuous for s in pre)
    lines = [n for n in res.parity.notes if n.startswith("detections on")]
    assert len(lines) == 1 and "onnxruntime" in lines[0]
    assert res.model_info["images"] == 2


def test_samples_folder_of_images_feeds_a_detector(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    res = run_conversion(tiny_detector(), "fold", samples=str(folder), images=2, input_shape=(3, 64, 64))
    assert res.exit_code == 0, res.verdict.line
    assert any(str(s.batch) == "samples×2" for s in res.parity.stats)
    assert any("last 1 image(s) were not used" in n for n in res.model_info["notes"])


def test_images_option_for_a_users_list_model(tmp_path):
    onnx = tmp_path / "list.onnx"
    res = run_conversion(randomize_bn(ListModel()).eval(), "fold", images=3, input_shape=(3, 8, 8), onnx=onnx)
    assert res.exit_code == 0, res.verdict.line
    assert res.export.input_names == ["image_0", "image_1", "image_2"]
    assert any(s.pair == "original↔onnxruntime" and s.passed and not s.vacuous for s in res.parity.stats)


def test_images_with_a_batch_shape_is_refused_in_one_line():
    from normswap.errors import InputError

    with pytest.raises(InputError, match="one image's C,H,W"):
        run_conversion(ListModel(), "fold", images=2, input_shape=(2, 3, 8, 8))
    with pytest.raises(InputError, match="--images"):
        run_conversion(ListModel(), "fold", images=0, input_shape=(3, 8, 8))


def test_a_floor_as_large_as_the_output_makes_it_not_comparable():
    r = np.array([1.0, 2.0, 3.0])
    c = np.array([3.0, 2.0, 1.0])  # reordered, as near-tied boxes after NMS
    s = compare_arrays(r, c, pair="original↔onnxruntime", output="boxes", batch=1, atol=1e-5, rtol=1e-4, floor=1.5)
    assert s.passed and s.vacuous and "not comparable" in s.note
    s = compare_arrays(r, c, pair="original↔onnxruntime", output="boxes", batch=1, atol=1e-5, rtol=1e-4, floor=0.01)
    assert not s.passed


def test_check_a_detector_onnx_against_its_model(tmp_path):
    from normswap.pipeline import run_check

    onnx = tmp_path / "det.onnx"
    assert run_conversion(tiny_detector(), "fold", onnx=onnx, images=2, input_shape=(3, 64, 64))
    res = run_check(onnx, "tests/test_detection.py:tiny_detector")
    assert res.exit_code in (0, 4), res.verdict.line  # 4: every post-processed output too near-tied to judge
    assert res.against["images"] == 2
    assert {str(s.batch) for s in res.parity.stats} == {"images×2"}
    assert not any(not s.passed for s in res.parity.stats)


def test_compare_on_a_detector_is_refused_in_one_line():
    from normswap.errors import InputError
    from normswap.pipeline import run_comparison

    with pytest.raises(InputError, match="takes a list of images"):
        run_comparison(tiny_detector(), ["fold", "gn"])


def test_swap_on_a_detector_reports_drift_before_post_processing():
    res = run_conversion(tiny_detector(), "gn", input_shape=(3, 64, 64))
    assert res.drift is not None and res.drift["inputs"] == "images×1"
    assert res.drift["max_rel"] > 0  # measured on the probe's tensors, not on (possibly empty) boxes


def test_images_on_a_tensor_model_says_what_failed():
    from normswap.errors import InputError

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(InputError, match=r"a list of 2 image\(s\) of \[3, 8, 8\].*drop --images"):
        run_conversion(model, "fold", images=2, input_shape=(3, 8, 8))


def test_an_output_smaller_than_atol_proves_nothing_unless_it_matches_relatively():
    r = np.array([1e-13, -2e-13, 3e-13])  # a random-weights backbone's features
    wrong = compare_arrays(r, r * 2, pair="original↔rewritten", output="f", batch=1, atol=1e-5, rtol=1e-4)
    assert wrong.passed and wrong.vacuous and wrong.note.startswith("too small to judge")
    right = compare_arrays(r, r * (1 + 1e-7), pair="original↔rewritten", output="f", batch=1, atol=1e-5, rtol=1e-4)
    assert right.passed and not right.vacuous


def test_passed_does_not_vouch_for_an_onnx_that_compared_nothing(tmp_path):
    res = run_conversion(tiny_detector(score_thresh=1.0), "fold", onnx=tmp_path / "d.onnx", input_shape=(3, 64, 64))
    assert res.exit_code == 0  # the PyTorch fold is proven before post-processing
    assert "its ONNX ran but none of its" in res.verdict.line and "and its ONNX compute" not in res.verdict.line
    assert not res.parity.worst().vacuous  # the summary's "worst" is a real comparison
