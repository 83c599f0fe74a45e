#!/usr/bin/env python
"""Keep the function of a segmentation network (dense per-pixel logits): naive → calibrated → recovered.

The model is torchvision's ``lraspp_mobilenet_v3_large`` (``weights=None, weights_backbone=None``: no
download) with random weights whose BatchNorms are made to matter: every BN's running statistics
are first estimated on the data (so activations keep a sane scale through the network) and then
*randomized* — each channel's running mean moved by N(0, 0.25²) of its standard deviation, its running
variance scaled by a log-uniform factor in [1/1.4, 1.4] — and γ, β are drawn at random (γ ∈ [0.75, 1.25],
β ~ N(0, 0.1²)). A swap that ignored any of them would show. The output is ``{"out": [N, C, H, W]}``
logits; its kind is ``dense``.

Data: crops of the two photos scikit-learn ships (``sklearn.datasets.load_sample_images``: a temple
in China, a flower; 427×640 each). Calibration / recovery crops are drawn from the left 70 % of each
photo, held-out crops from the right 30 % — disjoint pixels. Each crop has a random side in
[64, 128] px, is resized to ``--size`` (64), randomly flipped and jittered in brightness and contrast,
and normalized with the ImageNet mean and std.

Every target is measured on the held-out crops against the original (the teacher): per-pixel top-1
agreement and mIoU of the swap's argmax map against the original's (the classes the original predicts
there), and the relative error of the logits.

    python examples/segmentation.py                    # ln, gn; 192 fit crops of 64 px; 50 recovery steps (~2 min)
    python examples/segmentation.py --targets gn --steps 200
    python examples/segmentation.py --quick            # a smoke run (tests)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: how far the estimated BN statistics are moved: mean by N(0, MEAN_SHIFT²) standard deviations, variance
#: by a log-uniform factor in [1/VAR_FACTOR, VAR_FACTOR]. Larger moves (0.5, 2) make this random network
#: chaotic — 1 % input noise then changes 19 % of the original's own pixel labels (8 % here) — and no
#: swap can be measured against it.
MEAN_SHIFT = 0.25
VAR_FACTOR = 1.4


# ------------------------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=1)
def photos() -> tuple[torch.Tensor, ...]:
    """scikit-learn's two sample photos as ``[3, H, W]`` float tensors in [0, 1]."""
    import numpy as np
    from sklearn.datasets import load_sample_images

    return tuple(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255.0 for im in load_sample_images().images)


def crops(n: int, *, part: str, size: int = 64, seed: int = 0, augment: bool = True) -> torch.Tensor:
    """``[n, 3, size, size]`` normalized crops of the sample photos. ``part``: ``"fit"`` (left 70 % of
    each photo) or ``"heldout"`` (right 30 %); seeded."""
    if part not in ("fit", "heldout"):
        raise ValueError(f"part must be 'fit' or 'heldout', got {part!r}")
    g = torch.Generator().manual_seed(seed + (0 if part == "fit" else 10_000))
    ims = photos()
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for i in range(n):
        im = ims[i % len(ims)]
        _, h, w = im.shape
        cut = int(w * 0.7)
        lo, hi = (0, cut) if part == "fit" else (cut, w)
        side = int(torch.randint(64, 129, (1,), generator=g))
        side = min(side, hi - lo, h)
        x0 = lo + int(torch.randint(0, hi - lo - side + 1, (1,), generator=g))
        y0 = int(torch.randint(0, h - side + 1, (1,), generator=g))
        c = im[:, y0:y0 + side, x0:x0 + side][None]
        c = F.interpolate(c, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        if augment:
            if bool(torch.rand((), generator=g) < 0.5):
                c = c.flip(-1)
            bright = 1 + 0.4 * (float(torch.rand((), generator=g)) - 0.5)
            contrast = 1 + 0.4 * (float(torch.rand((), generator=g)) - 0.5)
            m = c.mean()
            c = ((c - m) * contrast + m * bright).clamp(0, 1)
        out.append((c - mean) / std)
    return torch.stack(out).contiguous()


def calib(samples: int = 192, batch: int = 32, size: int = 64) -> list[torch.Tensor]:
    """Unlabeled calibration crops (left 70 % of the photos), in batches — a ``--calib`` callable."""
    return list(crops(samples, part="fit", size=size, seed=0).split(batch))


def heldout(samples: int = 96, batch: int = 32, size: int = 64) -> list[torch.Tensor]:
    """Held-out crops (right 30 % of the photos), in batches — a ``--heldout`` callable."""
    return list(crops(samples, part="heldout", size=size, seed=1).split(batch))


# ------------------------------------------------------------------------------------------ model


@torch.no_grad()
def randomize_bn(model: nn.Module, x: torch.Tensor, *, seed: int = 0, batch: int = 32) -> nn.Module:
    """Estimate every BN's statistics on ``x`` (cumulative, train mode), then randomize them and γ, β
    (see the module docstring). ``model`` is changed in place and returned in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    g = torch.Generator().manual_seed(seed)
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        c = m.num_features
        m.weight.copy_(0.75 + 0.5 * torch.rand(c, generator=g))
        m.bias.copy_(0.1 * torch.randn(c, generator=g))
    model.train()
    for xb in x.split(batch):
        model(xb)
    for m in bns:
        c = m.num_features
        sd = (m.running_var + m.eps).sqrt()
        m.running_mean.add_(MEAN_SHIFT * sd * torch.randn(c, generator=g))
        m.running_var.mul_(torch.exp(math.log(VAR_FACTOR) * (2 * torch.rand(c, generator=g) - 1)))
        m.momentum = 0.1
    return model.eval()


def segmentation_model(num_classes: int = 6, seed: int = 0, size: int = 64) -> nn.Module:
    """``lraspp_mobilenet_v3_large`` with random weights (seeded) and randomized BatchNorm statistics
    (estimated on 128 fit crops first). Eval mode. Also a model spec for the CLI:
    ``normswap convert examples/segmentation.py:segmentation_model --to gn --calib examples/segmentation.py:calib
    --heldout examples/segmentation.py:heldout``."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(seed)
    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)
    return randomize_bn(model, crops(128, part="fit", size=size, seed=seed + 7), seed=seed)


# -------------------------------------------------------------------------------------- measures


@torch.no_grad()
def vs_original(original: nn.Module, model: nn.Module, batches: list[torch.Tensor]) -> dict[str, float]:
    """Per-pixel top-1 agreement, mIoU of the argmax maps against the original's, relative error."""
    was = model.training
    model.eval()
    match = count = 0
    err = ref = 0.0
    inter = union = None
    for xb in batches:
        r, o = original(xb)["out"].double(), model(xb)["out"].double()
        c = r.shape[1]
        a, b = r.argmax(1).reshape(-1), o.argmax(1).reshape(-1)
        match += int((a == b).sum())
        count += a.numel()
        i_ = torch.bincount(a[a == b], minlength=c).double()
        u_ = torch.bincount(a, minlength=c).double() + torch.bincount(b, minlength=c).double() - i_
        inter = i_ if inter is None else inter + i_
        union = u_ if union is None else union + u_
        err += float(((o - r) ** 2).sum())
        ref += float((r ** 2).sum())
    model.train(was)
    seen = union > 0
    return {"pixel_agreement": match / count, "miou": float((inter[seen] / union[seen]).mean()),
            "rel_err": math.sqrt(err / ref)}


@torch.no_grad()
def self_agreement(model: nn.Module, batches: list[torch.Tensor], noise: float = 0.01, seed: int = 0) -> float:
    """Pixel agreement of the original with itself when its (normalized) inputs get Gaussian noise of
    std ``noise``: how stable the labels a swap is measured against are."""
    g = torch.Generator().manual_seed(seed)
    match = count = 0
    for xb in batches:
        a = model(xb)["out"].argmax(1)
        b = model(xb + noise * torch.randn(xb.shape, generator=g))["out"].argmax(1)
        match += int((a == b).sum())
        count += a.numel()
    return match / count


@torch.no_grad()
def class_histogram(model: nn.Module, batches: list[torch.Tensor]) -> list[float]:
    """The fraction of held-out pixels the model assigns to each class (a degenerate teacher would
    put them all in one)."""
    counts = None
    for xb in batches:
        a = model(xb)["out"].argmax(1).reshape(-1)
        c = torch.bincount(a, minlength=model(xb[:1])["out"].shape[1]).double()
        counts = c if counts is None else counts + c
    return [round(float(v), 4) for v in counts / counts.sum()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Naive → calibrated → recovered per target, as :func:`normswap.keep.recover.keep_function` runs them:
    the fit crops are split 80/20 (seeded) — calibration and recovery fit the 80 %, the 20 % is
    calibration's never-worse check and recovery's evaluations (``--keep-best``: it ends on the best);
    every stage is then measured on the held-out crops (other pixels), which no stage sees."""
    import normswap
    from normswap.keep.calibrate import calibrate
    from normswap.load.data import calibration_batches
    from normswap.keep.heldout import split_heldout
    from normswap.keep.recover import recover

    original = segmentation_model(args.classes, args.seed, args.size)
    data = calibration_batches(torch.cat(calib(args.samples, args.batch, args.size)), batch=args.batch)
    split = split_heldout(data, 0.2, args.seed)
    held = heldout(args.heldout, args.batch, args.size)
    result: dict[str, Any] = {"classes": args.classes, "teacher_class_fractions": class_histogram(original, held),
                              "teacher_self_agreement_1pct_noise": self_agreement(original, held),
                              "split": split.describe(), "rows": []}
    for target in [t.strip() for t in args.targets.split(",") if t.strip()]:
        conv = normswap.rewrite(original, target, (held[0][:2],), groups=args.groups)
        row: dict[str, Any] = {"target": target, "stages": {"naive": vs_original(original, conv.model, held)}}
        t0 = time.perf_counter()
        rep = calibrate(original, conv, split.calib, output_kind="dense", heldout=split.heldout,
                        heldout_name=split.describe(), check=True)
        row["calibrate_seconds"] = round(time.perf_counter() - t0, 1)
        row["kept_previous"] = list(rep.kept_previous_sites)
        row["calibration_heldout"] = {k: v for k, v in (rep.heldout or {}).items() if k != "trace"}
        row["stages"]["calibrated"] = vs_original(original, conv.model, held)
        if args.steps > 0:
            t0 = time.perf_counter()
            rr = recover(original, conv, split.calib, steps=args.steps, lr=args.lr, seed=args.seed,
                         batch_size=args.recover_batch or None, progress=False, output_kind="dense",
                         heldout=split.heldout, keep_best=args.keep_best)
            row["recover_seconds"] = round(time.perf_counter() - t0, 1)
            row["recovery_heldout_evals"] = [list(e) for e in getattr(rr, "heldout_evals", [])]
            row["stages"]["recovered"] = vs_original(original, conv.model, held)
        result["rows"].append(row)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="ln,gn")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--size", type=int, default=64, help="crop side after resizing (px)")
    p.add_argument("--samples", type=int, default=192, help="fit crops (80 %% calibration / recovery, 20 %% their check)")
    p.add_argument("--heldout", type=int, default=96, help="held-out crops (measured on)")
    p.add_argument("--batch", type=int, default=32, help="calibration batch size")
    p.add_argument("--steps", type=int, default=50, help="recovery steps (0 = calibration only)")
    p.add_argument("--recover-batch", type=int, default=32, help="recovery samples per step (0: --batch)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--groups", type=int, default=None)
    p.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=True,
                   help="recovery ends on its best evaluation on the 20 %% check split (as `normswap recover`)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: ln, 64 crops of 64 px, 5 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.targets, args.samples, args.heldout, args.size, args.steps = "ln", 64, 32, 64, 5
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = run(args)
    print(f"lraspp_mobilenet_v3_large, random weights + randomized BN statistics, {args.classes} classes; "
          f"{args.samples} calibration crops, {args.heldout} held-out crops of {args.size} px; "
          f"recovery {args.steps} steps of {args.recover_batch}, lr {args.lr}, seed {args.seed}")
    print(f"original's class fractions on the held-out pixels: {result['teacher_class_fractions']}; "
          f"its pixel agreement with itself under 1 % input noise: {result['teacher_self_agreement_1pct_noise']:.3f}")
    print("| target | stage | pixel agreement | mIoU vs original | rel err |")
    print("|---|---|---|---|---|")
    for row in result["rows"]:
        for stage, s in row["stages"].items():
            print(f"| {row['target']} | {stage} | {s['pixel_agreement']:.4f} | {s['miou']:.4f} | {s['rel_err']:.4f} |")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
