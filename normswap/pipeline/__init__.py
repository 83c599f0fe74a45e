"""One conversion job, as ``normswap convert`` runs it: the stages in order, the verdict rules, and
the result object a pipeline reads.

    result = normswap.run_conversion("torchvision.models:resnet50", to="fold", onnx="r50.onnx", report="r50.json")
    if not result:                      # truthy when the verdict is good
        raise SystemExit(result.verdict.line)

**Stages** (each timed and shown through ``progress``; nothing is written before the last one)::

    validate ─ every option and output path, before any work (InputError)
    load     ─ the model spec / weights (or the nn.Module given)
    rewrite  ─ fold, or swap for a norm target, on a copy
    calibrate, recover ─ with ``calib`` (function-changing swaps only)
    export   ─ with ``onnx``, into a staging directory
    parity   ─ exact rewrites: original ↔ rewritten (↔ onnxruntime); swaps: rewritten ↔ onnxruntime
    measure  ─ swaps: drift vs the original, batch independence
    write    ─ the ONNX (if the verdict allows), ``save``, ``report``

**Verdict rules** (:func:`normswap.pipeline.verdict.decide`, the only place they live):

=================== ==== =================================================================
verdict             exit when
=================== ==== =================================================================
PASSED              0    an exact rewrite whose parity passed (the rewrite is proven)
EXPORTED            0    a function-changing swap, exported, its ONNX matching it; says how
                         far the function moved ("top-1 agreement 33% (naive swap; …)")
CONVERTED           0    the same without an export
FAILED              3    a parity comparison failed (see :mod:`normswap.parity`)
NOTHING COMPARED    4    every comparison passed only vacuously (empty/constant outputs)
NOT EXPORTED        5    the requested ONNX export failed (the line says which part and why);
                         an exact rewrite is still checked in PyTorch and ``save`` still written
=================== ==== =================================================================

Bad input is :class:`~normswap.errors.InputError` (exit 2) before anything runs; a real bug is any
other exception (exit 1). On FAILED and NOTHING COMPARED the ONNX is not written unless
``keep_failed``; ``save`` and ``report`` are written whatever the verdict, so a failure explains itself.
"""

from __future__ import annotations

from .check import CheckResult, run_check
from .comparison import run_comparison
from .conversion import ConversionResult, run_conversion
from .recovery import RecoveryResult, run_recovery
from .stages import BUNDLED_NAME, drift_plot_path, example_input, example_shape, heldout_for, load_stage
from .verdict import EXIT_CODES, Verdict, decide

__all__ = [
    "BUNDLED_NAME", "CheckResult", "ConversionResult", "EXIT_CODES", "RecoveryResult", "Verdict", "decide",
    "drift_plot_path", "example_input", "example_shape", "heldout_for", "load_stage", "run_check", "run_comparison", "run_conversion", "run_recovery",
]
