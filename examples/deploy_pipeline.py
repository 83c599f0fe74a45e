"""A deployment pipeline: load → fold → export → parity gate.

    python examples/deploy_pipeline.py                                   # the bundled digits model
    python examples/deploy_pipeline.py torchvision.models:resnet50 --input-shape 1,3,224,224 --out r50.onnx

Exits non-zero (and writes no ONNX) when the exported model does not match the original.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import normswap
from normswap.atomic import staging_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="MODEL spec (default: the bundled digits ResNet)")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--input-shape", default=None, help="e.g. 1,3,224,224 (default: the model's own)")
    ap.add_argument("--out", default="model.onnx")
    ap.add_argument("--rtol", type=float, default=1e-4)
    args = ap.parse_args(argv)

    try:
        loaded = normswap.load_model(args.model, weights=args.weights)
        shape = tuple(int(d) for d in args.input_shape.split(",")) if args.input_shape else loaded.input_shape
        if shape is None:
            raise normswap.InputError("this model does not say its input shape; pass --input-shape")
        x = torch.randn(*shape)

        conv = normswap.rewrite(loaded.model, "fold", (x,))  # raises ParityError if the fold is not exact
        refused = [a for a in conv.actions if not a.rewritten]
        for a in refused:
            print(f"not folded: {a.site}: {a.reason}", file=sys.stderr)

        out = Path(args.out)
        with staging_dir(out) as tmp:  # the gate: nothing lands unverified
            # verify=False: the parity gate below checks onnxruntime against both models itself
            exported = normswap.export_onnx(conv.model, (x,), tmp / out.name, verify=False)
            result = normswap.check_parity(loaded.model, conv.model, exported.path, input_shape=shape, rtol=args.rtol)
            print(result.summary())
            if not result:
                print("parity gate FAILED: not deploying", file=sys.stderr)
                return 3
            exported.move_into(out.parent)  # the .onnx and, for large models, its .onnx.data
        bn = exported.op_counts.get("BatchNormalization", 0)
        print(f"deployed {out}: {sum(exported.op_counts.values())} ONNX nodes, {bn} BatchNormalization, "
              f"{len(conv.actions) - len(refused)}/{len(conv.actions)} BN sites folded")
        return 0
    except normswap.NormswapError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
