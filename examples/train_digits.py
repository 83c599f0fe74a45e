#!/usr/bin/env python
"""Train the bundled DigitsResNet on scikit-learn's 8x8 digits and write its weights.

    python examples/train_digits.py                 # writes normswap/models/digits_resnet.{safetensors,json}
    python examples/train_digits.py --epochs 40 --seed 1 --out /tmp/digits.safetensors

Needs ``pip install 'normswap[train]'`` (scikit-learn). Runs on CPU in well under a minute.

The BatchNorm running statistics are what a deployment fold bakes into the weights, so after
training they are re-estimated exactly: the running stats are reset, momentum is set to ``None``
(cumulative average) and the un-augmented training set is passed once in train mode as one
batch. Test accuracy is then measured in eval mode.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    from normswap.models.digits import WEIGHTS_PATH, DigitsResNet, load_digits
except ImportError:  # running from a source checkout without `pip install -e .`
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from normswap.models.digits import WEIGHTS_PATH, DigitsResNet, load_digits

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


def set_determinism(seed: int, threads: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in each direction (zero padding)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, 1, h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, 1, h, w)
    return out.gather(3, cols)


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(X).argmax(1) == y).float().mean().item()


@torch.no_grad()
def recalibrate_bn(model: nn.Module, X: torch.Tensor, batch_size: int | None = None) -> None:
    """Re-estimate every BN's running stats on ``X`` (cumulative average, no augmentation)."""
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    batches = [X] if batch_size is None else X.split(batch_size)
    for xb in batches:
        model(xb)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()


def save_weights(model: nn.Module, out: Path, model_spec: str, **fields: object) -> dict:
    """Write ``model``'s state dict to ``out`` (safetensors, 0644: it ships as package data) and
    ``out`` with a .json suffix holding ``{"model", "weights", "sha256", **fields}``. Everything written
    is a function of the seed and the code: two runs give byte-identical files."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out), metadata={"format": "pt"})
    os.chmod(out, 0o644)  # safetensors creates the file 0600
    meta = {"model": model_spec, "weights": out.name, "sha256": hashlib.sha256(out.read_bytes()).hexdigest(), **fields}
    meta_path = out.with_suffix(".json")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB) and {meta_path}")
    return meta


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-augment", action="store_true", help="disable random 1-pixel shifts")
    ap.add_argument("--out", type=Path, default=WEIGHTS_PATH,
                    help="safetensors output; the metadata .json is written next to it (default: %(default)s)")
    args = ap.parse_args(argv)

    set_determinism(args.seed, args.threads)
    X_train, y_train = load_digits("train")
    X_test, y_test = load_digits("test")

    model = DigitsResNet()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(X_train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch
    )
    gen = torch.Generator().manual_seed(args.seed)

    print(f"DigitsResNet: {n_params} parameters; train {len(X_train)}, test {len(X_test)}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(X_train), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for idx in perm.split(args.batch_size):
            if len(idx) < args.batch_size // 2:
                continue  # a tiny last batch gives noisy BN statistics (and BatchNorm1d needs > 1 sample)
            xb, yb = X_train[idx], y_train[idx]
            if not args.no_augment:
                xb = random_shift(xb, gen)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            total += len(idx)
        print(f"epoch {epoch:3d}  loss {loss_sum / total:.4f}  train-batch acc {correct / total:.4f}  "
              f"({time.perf_counter() - t0:.1f}s)")
    train_seconds = time.perf_counter() - t0

    recalibrate_bn(model, X_train)
    train_acc = accuracy(model, X_train, y_train)
    test_acc = accuracy(model, X_test, y_test)
    print(f"final (eval mode, recalibrated BN): train acc {train_acc:.4f}  test acc {test_acc:.4f}  "
          f"train time {train_seconds:.1f}s")

    meta = save_weights(
        model, args.out, "normswap.models.digits:DigitsResNet",
        dataset="sklearn.datasets.load_digits, train_test_split(test_size=0.25, random_state=0, stratify=y)",
        test_accuracy=round(test_acc, 6),
        train_accuracy=round(train_acc, 6),
        n_test=len(X_test),
        epochs=args.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        augment=not args.no_augment,
        param_count=n_params,
        torch_version=torch.__version__,
        bn_stats="recalibrated after training: momentum=None, one train-mode pass over the full train split",
    )
    return meta


if __name__ == "__main__":
    main()
