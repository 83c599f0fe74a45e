"""Differentially private fine-tuning of a BatchNorm network, made possible by a calibrated swap.

DP-SGD (Opacus) needs per-sample gradients, which BatchNorm's batch statistics make meaningless, so
``opacus.validators.ModuleValidator`` rejects BN models — and its own ``fix`` swaps BN for
GroupNorm *without* carrying anything over, so the network forgets what it learned. Here normswap
swaps the bundled digits ResNet's BatchNorms for GroupNorm, calibrates the new layers on 256 unlabeled
training images (no training), checks that Opacus accepts the model *and* that it really is
batch-independent in training mode (Opacus' validator only knows its own list of layers), then runs a
few DP-SGD steps and prints ε and the held-out accuracy.

    python examples/dp_train_opacus.py                 # gn, 30 DP-SGD steps
    python examples/dp_train_opacus.py --to ln --steps 60 --noise 1.0
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--to", default="gn", help="batch-independent target: gn, gn-ws, ln, ln-channels (default gn)")
    p.add_argument("--steps", type=int, default=30, help="DP-SGD steps")
    p.add_argument("--batch", type=int, default=64, help="expected batch size (Poisson sampling)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    p.add_argument("--noise", type=float, default=1.0, help="noise multiplier")
    p.add_argument("--clip", type=float, default=1.0, help="per-sample gradient clipping norm")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator
    from torch.utils.data import DataLoader, TensorDataset

    import normswap
    from normswap.keep.calibrate import accuracy, agreement, calibrate
    from normswap.checks import batch_independence
    from normswap.load.data import calibration_batches
    from normswap.models.digits import digits_resnet, load_digits

    torch.manual_seed(args.seed)
    original = digits_resnet()
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("test")

    conv = normswap.rewrite(original, args.to, (x_test[:2],))
    naive_acc = accuracy(conv.model, x_test, y_test)
    cal = calibrate(original, conv, calibration_batches("digits", samples=args.calib_samples))
    model = conv.model
    cal_acc = accuracy(model, x_test, y_test)
    print(f"--to {args.to}: held-out accuracy original {accuracy(original, x_test, y_test):.4f}, "
          f"naive swap {naive_acc:.4f}, calibrated {cal_acc:.4f} ({cal.seconds:.2f}s, no labels)")

    errors = ModuleValidator.validate(model.train(), strict=False)
    bi = batch_independence(model, (1, 1, 8, 8))
    independent = bi.independent
    print(f"Opacus ModuleValidator.validate: {len(errors)} error(s); batch-independent in training: {independent}"
          f" (sample alone vs in a batch of {bi.batch}: max rel diff {bi.max_rel_diff:.1e})")
    if errors or not independent:
        for e in errors:
            print(f"  {str(e).splitlines()[0]}")
        print("this model cannot be trained with DP-SGD; use --to gn, gn-ws, ln or ln-channels")
        return {"ok": False, "errors": [str(e) for e in errors], "independent": independent}

    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=args.batch, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.0)
    engine = PrivacyEngine(accountant="rdp")
    dp_model, optimizer, dp_loader = engine.make_private(
        module=model.train(), optimizer=optimizer, data_loader=loader,
        noise_multiplier=args.noise, max_grad_norm=args.clip,
    )
    step = 0
    loss_fn = torch.nn.CrossEntropyLoss()
    while step < args.steps:
        for xb, yb in dp_loader:
            if len(xb) == 0:  # Poisson sampling can draw an empty batch
                continue
            optimizer.zero_grad()
            loss = loss_fn(dp_model(xb), yb)
            loss.backward()
            optimizer.step()
            step += 1
            if step >= args.steps:
                break
    eps = engine.get_epsilon(args.delta)
    net = getattr(dp_model, "_module", dp_model)  # Opacus' GradSampleModule wraps the model
    dp_acc = accuracy(net, x_test, y_test)
    agree = agreement(original, net, x_test)["top1_agreement"]
    print(f"DP-SGD: {step} steps, noise {args.noise}, clip {args.clip}: ε = {eps:.2f} (δ = {args.delta}); "
          f"held-out accuracy {dp_acc:.4f}, agreement with the original {agree:.4f}")
    return {"ok": True, "epsilon": eps, "accuracy": dp_acc, "calibrated_accuracy": cal_acc, "steps": step}


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
