#!/usr/bin/env python
"""Train the bundled multi-label CNN (sigmoid output) on scikit-learn's digits and write its weights.

    python examples/train_multilabel.py          # writes normswap/models/multilabel_cnn.{safetensors,json}
    python examples/train_multilabel.py --seed 1 --out /tmp/ml.safetensors
    python examples/train_multilabel.py --norm gn  # GroupNorm(8, C) from the start: multilabel_gn.{safetensors,json}

Five binary attributes per digit (see :mod:`normswap.models.multilabel`), binary cross-entropy on the
sigmoid outputs, AdamW with a one-cycle schedule, random 1-pixel shifts. Seeded and deterministic on
CPU; about half a minute on 2 cores. As for the digits ResNet, the BatchNorm running statistics are
re-estimated exactly after training (momentum ``None``, one train-mode pass over the un-augmented
training split), then quality is measured in eval mode on the test split. ``--norm gn`` trains the same
recipe with GroupNorm in place of every BatchNorm (no running statistics: nothing is re-estimated).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import random_shift, recalibrate_bn, save_weights, set_determinism  # noqa: E402

from normswap.models.multilabel import (  # noqa: E402
    ATTRIBUTES, GN_WEIGHTS_PATH, WEIGHTS_PATH, MultiLabelCNN, label_accuracy, load_multilabel, multilabel_gn,
)

#: --norm → (the untrained model, the bundled weights path, the spec its metadata names)
NORMS = {
    "bn": (MultiLabelCNN, WEIGHTS_PATH, "normswap.models.multilabel:MultiLabelCNN"),
    "gn": (lambda: multilabel_gn(pretrained=False), GN_WEIGHTS_PATH, "normswap.models.multilabel:multilabel_gn"),
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--norm", choices=sorted(NORMS), default="bn", help="the norm trained with (default: bn)")
    ap.add_argument("--out", type=Path, default=None, help="safetensors output (default: the --norm's bundled path)")
    args = ap.parse_args(argv)
    build, default_out, spec = NORMS[args.norm]
    out = args.out or default_out

    set_determinism(args.seed, args.threads)
    X_train, Y_train = load_multilabel("train")
    X_test, Y_test = load_multilabel("test")
    model = build()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(X_train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"MultiLabelCNN ({args.norm}): {n_params} parameters; train {len(X_train)}, test {len(X_test)}; labels {list(ATTRIBUTES)}")
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(X_train), generator=gen)
        loss_sum, total = 0.0, 0
        for idx in perm.split(args.batch_size):
            if len(idx) < args.batch_size // 2:
                continue
            xb = random_shift(X_train[idx], gen)
            loss = F.binary_cross_entropy(model(xb), Y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            total += len(idx)
        if epoch % 5 == 0 or epoch == args.epochs:
            print(f"epoch {epoch:3d}  bce {loss_sum / total:.4f}  ({time.perf_counter() - t0:.1f}s)")
    seconds = time.perf_counter() - t0
    if args.norm == "bn":
        recalibrate_bn(model, X_train)
    train_q = label_accuracy(model, X_train, Y_train)
    test_q = label_accuracy(model, X_test, Y_test)
    print(f"final (eval mode): train {train_q}  test {test_q}  ({seconds:.1f}s)")

    meta = save_weights(
        model, out, spec,
        output="sigmoid probabilities [N, 5] (multi-label)",
        labels={k: list(v) for k, v in ATTRIBUTES.items()},
        dataset="sklearn.datasets.load_digits, train_test_split(test_size=0.25, random_state=0, stratify=y)",
        test={k: round(v, 6) for k, v in test_q.items()},
        train={k: round(v, 6) for k, v in train_q.items()},
        n_test=len(X_test),
        epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
        augment="random 1-pixel shifts",
        param_count=n_params,
        torch_version=torch.__version__,
        **({"bn_stats": "recalibrated after training: momentum=None, one train-mode pass over the full train split"} if args.norm == "bn"
           else {"norm": "GroupNorm(8, C) in place of every BatchNorm, trained from the start"}),
    )
    return meta


if __name__ == "__main__":
    main()
