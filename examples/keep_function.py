#!/usr/bin/env python
"""Keep the trained function of a sigmoid-output and a regression network: naive → calibrated → recovered.

The two bundled non-classifier models (both trained here on scikit-learn's digits, weights shipped):

* ``multilabel`` — :mod:`normswap.models.multilabel`: five binary attributes per digit,
  ``sigmoid(Linear(...))`` output, one BatchNorm after ReLU + max-pool;
* ``regression`` — :mod:`normswap.models.regression`: rotation angle and scale of a transformed digit,
  identity output.

For each model and target every BatchNorm is swapped (γ, β copied: the *naive* swap), the new layers
are calibrated on ``--samples`` unlabeled training inputs (closed form, no training), then the
original is distilled into the swap for ``--steps`` label-free steps. After each stage the swap is
measured on the **held-out test split** (450 digits, never used for calibration or recovery):

* against the original, with the output kind's measures — multi-label: label agreement at 0.5 and mean
  absolute error of the probabilities; regression: R² of the swap's outputs against the original's
  and relative error ‖out − ref‖ / ‖ref‖;
* against the ground truth — label accuracy (multi-label) / R² (regression) — beside the original's
  own, and as a ratio to it.

``gap closed`` is the fraction of the naive swap's distance to the original (on the kind's first
measure: label agreement 1.0, R² 1.0) that calibration closed.

    python examples/keep_function.py                               # both models, ln, gn, gn-ws, 200 steps
    python examples/keep_function.py --models multilabel --targets ln,gn --seed 1
    python examples/keep_function.py --quick                       # a smoke run (tests)

Settings (as examples/recover_digits.py): calibration in batches of 64 on the first ``--samples``
training inputs; recovery regroups the same samples into steps of ``--recover-batch`` with Adam at
``--lr`` (cosine), the library's defaults unless given. The output kind is the model's own declaration (``normswap_output_kind``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normswap.defaults import DEFAULT_LR, DEFAULT_RECOVER_BATCH

MODELS = ("multilabel", "regression")


def model_setup(name: str) -> dict[str, Any]:
    """Original model, data and measures of one bundled model."""
    if name == "multilabel":
        from normswap.models.multilabel import label_accuracy, load_multilabel, multilabel_cnn

        x_tr, _ = load_multilabel("train")
        x_te, y_te = load_multilabel("test")
        return {"model": multilabel_cnn(), "kind": "multilabel", "x_train": x_tr, "x_test": x_te, "y_test": y_te,
                "truth": lambda m: label_accuracy(m, x_te, y_te)["label_accuracy"], "truth_name": "label accuracy",
                "spec": "normswap.models.multilabel:multilabel_cnn", "calib": "normswap.models.multilabel:calib"}
    if name == "regression":
        from normswap.models.regression import load_rotated, regression_cnn, regression_quality

        x_tr, _ = load_rotated("train")
        x_te, y_te = load_rotated("test")
        return {"model": regression_cnn(), "kind": "regression", "x_train": x_tr, "x_test": x_te, "y_test": y_te,
                "truth": lambda m: regression_quality(m, x_te, y_te)["r2"], "truth_name": "R²",
                "spec": "normswap.models.regression:regression_cnn", "calib": "normswap.models.regression:calib"}
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


@torch.no_grad()
def vs_original(kind: str, original: nn.Module, model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """The output kind's measures of ``model`` against ``original`` on ``x`` (both in eval mode)."""
    was = model.training
    model.eval()
    r, o = original(x).double(), model(x).double()
    model.train(was)
    rel = float((o - r).norm() / r.norm())
    if kind == "multilabel":
        return {"label_agreement": float(((r > 0.5) == (o > 0.5)).double().mean()),
                "mae": float((o - r).abs().mean()), "rel_err": rel}
    sst = float(((r - r.mean(0)) ** 2).sum())
    return {"r2": 1.0 - float(((o - r) ** 2).sum()) / sst, "rel_err": rel}


def run_one(name: str, setup: dict[str, Any], target: str, args: argparse.Namespace) -> dict[str, Any]:
    """Naive → calibrated → recovered for one model and target, as :func:`normswap.keep.recover.keep_function`
    runs them (the calibration samples split 80/20, seeded: calibration and recovery fit the 80 %, the
    20 % is their held-out check — calibration keeps a site's previous parameters when its fit would
    worsen the loss there, recovery measures on it), each stage then measured on the test split, which
    no stage sees."""
    import normswap
    from normswap.keep.calibrate import calibrate
    from normswap.load.data import calibration_batches
    from normswap.keep.heldout import split_heldout
    from normswap.keep.recover import recover

    original, kind = setup["model"], setup["kind"]
    x_te = setup["x_test"]
    data = calibration_batches(setup["x_train"][:args.samples], batch=args.batch)
    split = split_heldout(data, args.heldout_fraction, args.seed)
    conv = normswap.rewrite(original, target, (x_te[:2],), groups=args.groups)
    row: dict[str, Any] = {"model": name, "target": target, "kind": kind, "original_truth": setup["truth"](original),
                           "split": split.describe(), "stages": {}}

    def measure(stage: str) -> None:
        row["stages"][stage] = {**vs_original(kind, original, conv.model, x_te), "truth": setup["truth"](conv.model)}

    measure("naive")
    t0 = time.perf_counter()
    rep = calibrate(original, conv, split.calib, output_kind=kind, heldout=split.heldout, heldout_name=split.describe(),
                    check=True)
    row["calibrate_seconds"] = round(time.perf_counter() - t0, 2)
    row["calibration"] = rep.to_dict()
    row["kept_previous"] = list(rep.kept_previous_sites)
    measure("calibrated")
    if args.steps > 0:
        t0 = time.perf_counter()
        rr = recover(original, conv, split.calib, steps=args.steps, lr=args.lr, seed=args.seed,
                     batch_size=args.recover_batch or None, progress=False, output_kind=kind,
                     heldout=split.heldout, keep_best=args.keep_best)
        row["recover_seconds"] = round(time.perf_counter() - t0, 2)
        row["recovery_heldout_evals"] = [list(e) if not isinstance(e, dict) else e for e in getattr(rr, "heldout_evals", [])]
        measure("recovered")
    primary = "label_agreement" if kind == "multilabel" else "r2"
    naive, cal = row["stages"]["naive"][primary], row["stages"]["calibrated"][primary]
    row["gap_closed_by_calibration"] = (cal - naive) / (1.0 - naive) if naive < 1.0 else None
    if kind == "multilabel":
        n_mae, c_mae = row["stages"]["naive"]["mae"], row["stages"]["calibrated"]["mae"]
        row["mae_gap_closed_by_calibration"] = (n_mae - c_mae) / n_mae if n_mae > 0 else None
    for s in row["stages"].values():
        s["truth_ratio"] = s["truth"] / row["original_truth"]
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--targets", default="ln,gn,gn-ws")
    p.add_argument("--samples", type=int, default=512, help="unlabeled samples from the train split (80 %% fitted, 20 %% their held-out check)")
    p.add_argument("--heldout-fraction", type=float, default=0.2, help="part of --samples held out for calibration's check and recovery's evaluations")
    p.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=True,
                   help="recovery ends on its best evaluation on that held-out part (as `normswap recover`)")
    p.add_argument("--batch", type=int, default=64, help="calibration batch size")
    p.add_argument("--steps", type=int, default=200, help="recovery steps (0 = calibration only)")
    p.add_argument("--recover-batch", type=int, default=DEFAULT_RECOVER_BATCH, help="recovery samples per step (0: --batch)")
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--groups", type=int, default=None, help="GroupNorm groups for gn / gn-ws (default: the library's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument("--quick", action="store_true", help="smoke run: ln only, 160 samples, 10 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.targets, args.samples, args.steps, args.recover_batch = "ln", 160, 10, 128
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        setup = model_setup(name)
        for target in [t.strip() for t in args.targets.split(",") if t.strip()]:
            rows.append(run_one(name, setup, target, args))
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    return rows


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"held-out test split (450 digits); calibration on {args.samples} unlabeled training inputs; "
          f"recovery {args.steps} steps of {args.recover_batch}, lr {args.lr}, seed {args.seed}")
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    for name, rs in by_model.items():
        kind = rs[0]["kind"]
        cols = ("label agr.", "MAE") if kind == "multilabel" else ("R² vs orig", "rel err")
        keys = ("label_agreement", "mae") if kind == "multilabel" else ("r2", "rel_err")
        truth = "label acc." if kind == "multilabel" else "R² truth"
        print(f"\n{name} ({kind}); original's {truth}: {rs[0]['original_truth']:.4f}")
        print(f"| target | stage | {cols[0]} | {cols[1]} | {truth} | / original | gap closed |")
        print("|---|---|---|---|---|---|---|")
        for r in rs:
            for stage, s in r["stages"].items():
                gap = f"{r['gap_closed_by_calibration']:.2f}" if stage == "calibrated" and r["gap_closed_by_calibration"] is not None else ""
                print(f"| {r['target']} | {stage} | {s[keys[0]]:.4f} | {s[keys[1]]:.4f} | {s['truth']:.4f} | "
                      f"{s['truth_ratio']:.4f} | {gap} |")


if __name__ == "__main__":
    main()
    sys.exit(0)
