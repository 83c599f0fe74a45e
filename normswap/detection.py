"""Models that take a *list* of images: torchvision's detectors (Faster/Mask/Keypoint R-CNN, RetinaNet,
FCOS, SSD/SSDlite) and any user model called as ``model([img, ...])``.

Their final outputs (boxes, scores, labels after top-k and NMS) are a discontinuous function of the
images: a near-tie reorders under a 1e-7 change, so comparing them says little about a fold. What a
rewrite must reproduce is the continuous part *before* post-processing. A registered **probe** per
detector family recomputes it from the model's own submodules:

* backbone (+FPN) features, one tensor per level;
* the dense heads: the RPN's objectness and box deltas (R-CNN), classification / box regression /
  centerness logits over all anchors (RetinaNet, FCOS, SSD);
* the R-CNN box, mask and keypoint heads run on a **fixed grid of boxes** instead of the RPN's
  proposals — the proposals are post-processed (NMS) and would make these heads discontinuous too.

:class:`Probed` wraps a detector so that its output is ``{"pre": {probe tensors}, "post": model(images)}``;
the parity rule then judges ``pre.*`` against the tolerance and ``post*`` against the original's own
noise floor (a post-processed output the original itself changes under noise is "not comparable").
:func:`detection_agreement` summarises boxes/scores/labels as counts and matches, for the report.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PROBES", "register_probe", "detector_family", "takes_image_list", "Probed", "probed",
           "image_list_inputs", "default_image_shape", "detection_agreement"]

# family name -> (class names it applies to, probe(model, image_list, features) -> {name: tensor})
PROBES: dict[str, tuple[tuple[str, ...], Callable[[nn.Module, Any, OrderedDict[str, Tensor]], dict[str, Tensor]]]] = {}


def register_probe(family: str, classes: Sequence[str]) -> Callable[[Callable[..., dict[str, Tensor]]], Callable[..., dict[str, Tensor]]]:
    """Register ``fn(model, image_list, features) -> {name: tensor}`` as the pre-post-processing probe of
    ``classes`` (``image_list``: the model's transform output; ``features``: its backbone's, as a dict)
    (matched by class name along the model's MRO, so a user's subclass is covered)."""

    def deco(fn: Callable[..., dict[str, Tensor]]) -> Callable[..., dict[str, Tensor]]:
        PROBES[family] = (tuple(classes), fn)
        return fn

    return deco


def detector_family(model: nn.Module) -> str | None:
    """The registered family of ``model`` ("rcnn", "retinanet", "fcos", "ssd"), or None."""
    names = {c.__name__ for c in type(model).__mro__}
    for family, (classes, _) in PROBES.items():
        if names & set(classes):
            return family
    return None


def takes_image_list(model: nn.Module) -> bool:
    """Whether ``model`` is called with a list of images (a registered detector family)."""
    return detector_family(model) is not None


def default_image_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """One image's ``(C, H, W)`` at the size the detector's own transform resizes to, or None."""
    t = getattr(model, "transform", None)
    size = getattr(t, "fixed_size", None)
    if size:
        return (3, int(size[0]), int(size[1]))
    m = getattr(t, "min_size", None)
    if m:
        m = int(m[0] if isinstance(m, (tuple, list)) else m)
        return (3, m, m)
    return None


def image_list_inputs(shape: Sequence[int], images: int, *, seed: int = 0, dtype: Any = None,
                      labels: Sequence[str] = ("images",)) -> list[tuple[str, tuple[list[Tensor]]]]:
    """Seeded inputs for a list-of-images model: one entry per label, each ``([img_1, …, img_images],)``
    with images of ``shape`` (C, H, W; a leading batch dim of 1 is dropped) drawn uniform in [0, 1) —
    the range torchvision's detectors expect before their own normalisation."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    out = []
    for k, label in enumerate(labels):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919 * k + int(images))
        imgs = [torch.rand(shape, generator=g) for _ in range(int(images))]
        if dtype is not None:
            imgs = [x.to(dtype) for x in imgs]
        out.append((f"{label}×{images}", (imgs,)))
    return out


class Probed(nn.Module):
    """``model``'s output plus its pre-post-processing tensors: ``{"pre": {...}, "post": model(images)}``.

    One run of the model: forward hooks (registered for this call only) keep the transform's image
    list and the backbone's features; the probe computes the heads from them. Shares ``model``'s
    modules (no copy; it only reads them)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        family = detector_family(model)
        if family is None:
            raise ValueError(f"{type(model).__name__} is not a registered detector family")
        self.model = model
        self.family = family

    def forward(self, images: list[Tensor]) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def keep(key: str, out: Any) -> None:  # returns None: a hook's return value would replace the output
            seen.setdefault(key, out)

        hooks = [self.model.transform.register_forward_hook(lambda m, a, out: keep("images", out[0])),
                 self.model.backbone.register_forward_hook(lambda m, a, out: keep("features", out))]
        try:
            post = self.model(images)
        finally:
            for h in hooks:
                h.remove()
        feats = seen["features"]
        if isinstance(feats, Tensor):
            feats = OrderedDict([("0", feats)])
        return {"pre": PROBES[self.family][1](self.model, seen["images"], feats), "post": post}


def probed(model: nn.Module) -> nn.Module:
    """:class:`Probed` for a registered detector, else ``model`` itself."""
    return Probed(model) if takes_image_list(model) else model


# -- probes: (model, the transform's ImageList, the backbone's features) -> {name: tensor} ----------


def _grid_boxes(image_sizes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device, n: int = 4) -> list[Tensor]:
    """A fixed, input-independent set of boxes per image: an ``n``×``n`` grid of cells plus the 2×2 grid
    and the whole image — every scale the ROI pooler maps to a different FPN level."""
    boxes = []
    for h, w in image_sizes:
        rows = []
        for k in (n, 2, 1):
            for i in range(k):
                for j in range(k):
                    rows.append([w * j / k, h * i / k, w * (j + 1) / k, h * (i + 1) / k])
        boxes.append(torch.tensor(rows, dtype=dtype, device=device))
    return boxes


@register_probe("rcnn", ("GeneralizedRCNN",))
def _rcnn(model: nn.Module, image_list: Any, feats: OrderedDict[str, Tensor]) -> dict[str, Tensor]:
    out = {f"backbone.{k}": v for k, v in feats.items()}
    objectness, deltas = model.rpn.head(list(feats.values()))
    out.update({f"rpn.objectness.{i}": t for i, t in enumerate(objectness)})
    out.update({f"rpn.box_deltas.{i}": t for i, t in enumerate(deltas)})
    first = next(iter(feats.values()))
    boxes = _grid_boxes(image_list.image_sizes, first.dtype, first.device)
    heads = model.roi_heads
    x = heads.box_head(heads.box_roi_pool(feats, boxes, image_list.image_sizes))
    out["roi.class_logits"], out["roi.box_regression"] = heads.box_predictor(x)
    if heads.has_mask():
        m = heads.mask_head(heads.mask_roi_pool(feats, boxes, image_list.image_sizes))
        out["roi.mask_logits"] = heads.mask_predictor(m)
    if heads.has_keypoint():
        k = heads.keypoint_head(heads.keypoint_roi_pool(feats, boxes, image_list.image_sizes))
        out["roi.keypoint_logits"] = heads.keypoint_predictor(k)
    return out


def _dense_head(model: nn.Module, image_list: Any, feats: OrderedDict[str, Tensor]) -> dict[str, Tensor]:
    out = {f"backbone.{k}": v for k, v in feats.items()}
    head = model.head(list(feats.values()))
    out.update({f"head.{k}": v for k, v in head.items()})
    return out


register_probe("retinanet", ("RetinaNet",))(_dense_head)
register_probe("fcos", ("FCOS",))(_dense_head)
register_probe("ssd", ("SSD",))(_dense_head)


# -- agreement of post-processed detections ---------------------------------------------------


def _box_iou(a: Tensor, b: Tensor) -> Tensor:
    from torchvision.ops import box_iou

    return box_iou(a.double(), b.double())


def detection_agreement(reference: Any, candidate: Any, *, iou: float = 0.5) -> dict[str, Any]:
    """Boxes / scores / labels of two detectors' post-processed outputs (lists of dicts, one per image):
    how many each found, how many of the reference's detections the candidate matches (same label,
    IoU ≥ ``iou``, greedy by score), the worst score difference and the worst box corner shift (px)
    over the matches."""
    n_ref = n_cand = matched = 0
    d_score = d_box = 0.0
    for r, c in zip(reference, candidate):
        rb, rl, rs = r["boxes"], r["labels"], r["scores"]
        cb, cl, cs = torch.as_tensor(c["boxes"]), torch.as_tensor(c["labels"]), torch.as_tensor(c["scores"])
        n_ref += len(rb)
        n_cand += len(cb)
        if not len(rb) or not len(cb):
            continue
        ious = _box_iou(torch.as_tensor(rb), cb)
        ious[torch.as_tensor(rl)[:, None] != cl[None, :]] = -1.0
        used: set[int] = set()
        for i in torch.argsort(torch.as_tensor(rs), descending=True).tolist():
            row = ious[i].clone()
            if used:
                row[list(used)] = -1.0
            j = int(row.argmax())
            if row[j] >= iou:
                used.add(j)
                matched += 1
                d_score = max(d_score, float((torch.as_tensor(rs)[i].double() - cs[j].double()).abs()))
                d_box = max(d_box, float((torch.as_tensor(rb)[i].double() - cb[j].double()).abs().max()))
    return {"reference": n_ref, "candidate": n_cand, "matched": matched, "iou": iou,
            "max_score_diff": d_score, "max_box_shift": d_box}
