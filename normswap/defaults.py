"""Default settings shared by the library and the CLI, importable without torch.

The CLI builds its ``--help`` from these, so ``normswap --help`` never has to import torch; the
modules that use them (parity, recover, calibrate) re-export the same names.
"""

from __future__ import annotations

DEFAULT_ATOL = 1e-5  # parity: max |err| <= atol + rtol * max |reference|
DEFAULT_RTOL = 1e-4
NOISE_FACTOR = 4.0  # parity: "clearly worse" than the reference's own float32 noise
DEFAULT_LR = 3e-3  # recovery: Adam learning rate (linear warm-up, then cosine-decayed)
DEFAULT_RECOVER_BATCH = 256  # recovery: samples per step, regrouped from the calibration data
DEFAULT_TEMPERATURE = 2.0  # recovery: distillation temperature
DEFAULT_CALIB_BATCH = 32  # calibration batch size (each batch refines the fit; recovery regroups into DEFAULT_RECOVER_BATCH)
DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)  # when neither --input-shape nor the model says otherwise
