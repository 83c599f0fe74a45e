#!/usr/bin/env python
"""Train the bundled regression CNN (identity output) and write its weights.

    python examples/train_regression.py          # writes normswap/models/regression_cnn.{safetensors,json}
    python examples/train_regression.py --seed 1 --out /tmp/reg.safetensors
    python examples/train_regression.py --norm gn  # GroupNorm(8, C) from the start: regression_gn.{safetensors,json}

The model reads the rotation angle and scale of a transformed digit (see
:mod:`normswap.models.regression`): mean squared error on the two targets, AdamW with a one-cycle
schedule, fresh random transforms of the training digits every epoch. Seeded and deterministic on CPU;
about a minute on one core. The BatchNorm running statistics are then re-estimated exactly (momentum
``None``, one train-mode pass over the fixed transformed training split) and quality is measured in
eval mode on the fixed transformed test split. ``--norm gn`` trains the same recipe with GroupNorm in
place of every BatchNorm (the head's BatchNorm1d(64) too; no running statistics: nothing is re-estimated).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import recalibrate_bn, save_weights, set_determinism  # noqa: E402

from normswap.models.digits import load_digits  # noqa: E402
from normswap.models.regression import (  # noqa: E402
    GN_WEIGHTS_PATH, MAX_ANGLE_DEG, MAX_SCALE, WEIGHTS_PATH, RegressionCNN, load_rotated, regression_gn, regression_quality,
    transform_digits,
)

#: --norm → (the untrained model, the bundled weights path, the spec its metadata names)
NORMS = {
    "bn": (RegressionCNN, WEIGHTS_PATH, "normswap.models.regression:RegressionCNN"),
    "gn": (lambda: regression_gn(pretrained=False), GN_WEIGHTS_PATH, "normswap.models.regression:regression_gn"),
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--norm", choices=sorted(NORMS), default="bn", help="the norm trained with (default: bn)")
    ap.add_argument("--out", type=Path, default=None, help="safetensors output (default: the --norm's bundled path)")
    args = ap.parse_args(argv)
    build, default_out, spec = NORMS[args.norm]
    out = args.out or default_out

    set_determinism(args.seed, args.threads)
    X8_train, _ = load_digits("train")
    X_train, Y_train = load_rotated("train")
    X_test, Y_test = load_rotated("test")
    model = build()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(X8_train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"RegressionCNN ({args.norm}): {n_params} parameters; train {len(X8_train)} digits (fresh transforms each epoch), "
          f"test {len(X_test)}")
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        xs, ys = transform_digits(X8_train, gen)
        perm = torch.randperm(len(xs), generator=gen)
        loss_sum, total = 0.0, 0
        for idx in perm.split(args.batch_size):
            if len(idx) < args.batch_size // 2:
                continue
            loss = F.mse_loss(model(xs[idx]), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            total += len(idx)
        if epoch % 10 == 0 or epoch == args.epochs:
            print(f"epoch {epoch:3d}  mse {loss_sum / total:.4f}  ({time.perf_counter() - t0:.1f}s)")
    seconds = time.perf_counter() - t0
    if args.norm == "bn":
        recalibrate_bn(model, X_train)
    train_q = regression_quality(model, X_train, Y_train)
    test_q = regression_quality(model, X_test, Y_test)
    print(f"final (eval mode): train {train_q}  test {test_q}  ({seconds:.1f}s)")

    meta = save_weights(
        model, out, spec,
        output="regression [N, 2] = (angle / 45 deg, log(scale) / log(1.25)), identity output",
        transforms=f"digits enlarged to 12x12, padded to 16x16, rotated by U(-{MAX_ANGLE_DEG:g}, {MAX_ANGLE_DEG:g}) deg, "
                   f"scaled by a log-uniform factor in [1/{MAX_SCALE}, {MAX_SCALE}]",
        dataset="sklearn.datasets.load_digits, train_test_split(test_size=0.25, random_state=0, stratify=y)",
        test={k: round(v, 6) for k, v in test_q.items()},
        train={k: round(v, 6) for k, v in train_q.items()},
        n_test=len(X_test),
        epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
        augment="fresh random transforms of the training digits every epoch",
        param_count=n_params,
        torch_version=torch.__version__,
        **({"bn_stats": "recalibrated after training: momentum=None, one train-mode pass over the fixed transformed train split"} if args.norm == "bn"
           else {"norm": "GroupNorm(8, C) in place of every BatchNorm, trained from the start"}),
    )
    return meta


if __name__ == "__main__":
    main()
