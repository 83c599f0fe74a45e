#!/usr/bin/env python
"""Train the digits ResNet with GroupNorm or LayerNorm from the start and write its weights.

    python examples/train_digits_norms.py --norm gn   # writes normswap/models/digits_gn.{safetensors,json}
    python examples/train_digits_norms.py --norm ln   # writes normswap/models/digits_ln.{safetensors,json}

Same recipe as ``examples/train_digits.py`` (AdamW, one-cycle, 1-pixel shifts, seeded, deterministic);
these norms have no running statistics, so nothing is re-estimated after training.
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

from normswap.models.digits import load_digits  # noqa: E402
from normswap.models.digits_norms import NORMS, digits_norm_resnet, weights_path  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--norm", choices=sorted(NORMS), required=True)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="safetensors output (default: the bundled path)")
    args = ap.parse_args(argv)
    out = args.out or weights_path(args.norm)

    set_determinism(args.seed, args.threads)
    X_train, y_train = load_digits("train")
    X_test, y_test = load_digits("test")
    model = digits_norm_resnet(args.norm, pretrained=False)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = -(-len(X_train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        for idx in torch.randperm(len(X_train), generator=gen).split(args.batch_size):
            loss = F.cross_entropy(model(random_shift(X_train[idx], gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 10 == 0:
            print(f"epoch {epoch:3d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.1f}s)")
    train_seconds = time.perf_counter() - t0
    test_acc, train_acc = accuracy(model, X_test, y_test), accuracy(model, X_train, y_train)
    print(f"final: train acc {train_acc:.4f}  test acc {test_acc:.4f}  ({train_seconds:.1f}s)")
    return save_weights(
        model, out, f"normswap.models.digits_norms:digits_{args.norm}",
        dataset="sklearn.datasets.load_digits, train_test_split(test_size=0.25, random_state=0, stratify=y)",
        norm=args.norm, test_accuracy=round(test_acc, 6), train_accuracy=round(train_acc, 6), n_test=len(X_test),
        epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, lr=args.lr, augment=True, param_count=n_params,
        torch_version=torch.__version__,
    )


if __name__ == "__main__":
    main()
