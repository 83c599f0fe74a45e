#!/usr/bin/env python
"""Naive swap → calibration → recovery on the bundled pitch tracker, measured in cents.

    python examples/pitch_recovery.py gn peaked 3e-3 256 0 8192     # TARGET LOSS LR BATCH SEED CALIB-FRAMES

LOSS is the output kind whose distillation loss recovery uses (``peaked``: the detected kind; ``multilabel``:
the loss before peaked heads were recognised); the measures are always the model's decoder (pitch within
50 cents of the original's) and raw pitch accuracy against the 1024 labelled held-out tones. Prints one JSON
line: {stage: [decoded agreement, raw pitch accuracy]}. The README's pitch table comes from these runs.
"""

from __future__ import annotations

import json
import sys
import time

import torch

import normswap
from normswap.keep import kinds
from normswap.models.pitch import heldout, pitch_cnn, tones
from normswap.keep.recover import keep_function


def main(argv: list[str]) -> dict:
    to, loss, lr, batch, seed, frames = argv[0], argv[1], float(argv[2]), int(argv[3]), int(argv[4]), int(argv[5])
    torch.set_num_threads(1)
    original = pitch_cnn()
    conv = normswap.rewrite(original, to, (torch.zeros(1, 1, 1024),))
    data = normswap.calibration_batches(tones(frames, 1000)[0], batch=32)
    hx, hy = heldout()
    outputs = kinds.detect(original, [hx[:256]], loss if loss != "auto" else None)
    t = time.time()
    rep = keep_function(original, conv, data, heldout=(hx, hy), output_kind=outputs, recover_steps=200,
                        recover_batch=batch, lr=lr, seed=seed, progress=False)
    out = {"to": to, "loss": loss, "lr": lr, "batch": batch, "seed": seed, "frames": frames,
           "original": rep.original_accuracy, "samples": rep.stages[0].agreement.n,
           **{s.stage: [round(s.agreement.quality, 4), round(s.accuracy, 4)] for s in rep.stages},
           "seconds": round(time.time() - t)}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1:] or ["gn", "peaked", "3e-3", "256", "0", "8192"])
