#!/usr/bin/env python
"""Train the bundled contrast-invariant InstanceNorm CNN on jittered digits and write its weights.

    python examples/train_contrast.py          # writes normswap/models/contrast_in.{safetensors,json}
    python examples/train_contrast.py --seed 1 --out /tmp/cin.safetensors

Every training image gets a fresh random gain and offset each epoch (:func:`normswap.models.contrast.jitter`)
and a random 1-pixel shift; cross-entropy, AdamW with a one-cycle schedule (the digits recipe of
``examples/train_digits.py``). Seeded and deterministic on CPU; half a minute on one core. No running
statistics (InstanceNorm and GroupNorm use each sample's own), so nothing is re-estimated; accuracy is
measured on the fixed jittered test split and, to show what the InstanceNorms buy, on the un-jittered one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_digits import accuracy, random_shift, save_weights, set_determinism  # noqa: E402

from normswap.models.contrast import MAX_GAIN, MAX_OFFSET, WEIGHTS_PATH, contrast_in, jitter, load_jittered  # noqa: E402
from normswap.models.digits import load_digits  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    args = ap.parse_args(argv)

    set_determinism(args.seed, args.threads)
    X8_train, y_train = load_digits("train")
    X_train, _ = load_jittered("train")
    X_test, y_test = load_jittered("test")
    model = contrast_in(pretrained=False)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = -(-len(X8_train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"ContrastINCNN: {n_params} parameters; train {len(X8_train)} digits (fresh jitter each epoch), test {len(X_test)}")
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        xs = jitter(random_shift(X8_train, gen), gen)
        for idx in torch.randperm(len(xs), generator=gen).split(args.batch_size):
            loss = F.cross_entropy(model(xs[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 10 == 0 or epoch == args.epochs:
            print(f"epoch {epoch:3d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.1f}s)")
    seconds = time.perf_counter() - t0
    test_acc, train_acc = accuracy(model, X_test, y_test), accuracy(model, X_train, y_train)
    plain_acc = accuracy(model, load_digits("test")[0], y_test)
    print(f"final: train acc {train_acc:.4f}  test acc {test_acc:.4f}  un-jittered test acc {plain_acc:.4f}  ({seconds:.1f}s)")
    return save_weights(
        model, args.out, "normswap.models.contrast:contrast_in",
        output="logits [N, 10]",
        jitter=f"per sample g * x + b, g log-uniform in [1/{MAX_GAIN:g}, {MAX_GAIN:g}], b uniform in [-{MAX_OFFSET:g}, {MAX_OFFSET:g}]",
        dataset="sklearn.datasets.load_digits, train_test_split(test_size=0.25, random_state=0, stratify=y)",
        test_accuracy=round(test_acc, 6), train_accuracy=round(train_acc, 6), unjittered_test_accuracy=round(plain_acc, 6),
        n_test=len(X_test), epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
        augment="fresh jitter and random 1-pixel shifts every epoch", param_count=n_params,
        torch_version=torch.__version__,
    )


if __name__ == "__main__":
    main()
