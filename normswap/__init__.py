"""normswap: rewrite the normalization layers of trained PyTorch networks.

    import normswap
    loaded = normswap.load_model("torchvision.models:resnet50")
    x = torch.randn(1, 3, 224, 224)
    folded = normswap.convert(loaded.model, to="fold", example_inputs=(x,))
    normswap.export_onnx(folded, (x,), "r50.onnx")
    assert normswap.check_parity(loaded.model, folded, "r50.onnx", input_shape=x.shape)

Importing ``normswap`` is cheap: the public names below are imported from their submodules on
first use (PEP 562), so ``import normswap`` and the CLI's ``--help`` / ``targets`` / ``version``
never import torch. ``normswap.parity``, ``normswap.rewriting`` ... (any subpackage) load on first access
too.

The packages follow the stages: ``load`` (specs, weights, calibration data, saved conversions) →
``rewriting`` (capture, sites, fold, swap) → ``keep`` (calibrate, recover, output kinds, held-out
split, per-sample norm fits) → ``export`` → ``parity`` (verify) → ``pipeline`` (the CLI's one entry
per command). Each public function has one name: ``normswap.calibrate`` is the function, its package
is ``normswap.keep.calibrate``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("Conversion", "convert", "inspect", "load_conversion", "rewrite", "save_conversion", "targets"), "rewriting.convert"),
    **dict.fromkeys(("InputError", "NormswapError", "ParityError", "RewriteError"), "errors"),
    **dict.fromkeys(("ExportResult", "export_onnx"), "export"),
    **dict.fromkeys(("LoadedModel", "load_model"), "load"),
    **dict.fromkeys(("ParityResult", "check_parity"), "parity"),
    **dict.fromkeys(("CalibrationReport", "agreement", "calibrate"), "keep.calibrate"),
    "compare_targets": "compare",
    "calibration_batches": "load.data",
    **dict.fromkeys(("FunctionReport", "RecoveryReport", "keep_function", "recover"), "keep.recover"),
    **dict.fromkeys(("CheckResult", "ConversionResult", "RecoveryResult", "Verdict", "run_check", "run_comparison", "run_conversion",
                     "run_recovery"), "pipeline"),
}

__all__ = [
    "__version__",
    "CalibrationReport",
    "FunctionReport",
    "RecoveryReport",
    "agreement",
    "calibrate",
    "calibration_batches",
    "compare_targets",
    "CheckResult",
    "ConversionResult",
    "RecoveryResult",
    "Verdict",
    "run_check",
    "run_comparison",
    "run_conversion",
    "run_recovery",
    "keep_function",
    "recover",
    "Conversion",
    "ExportResult",
    "InputError",
    "LoadedModel",
    "NormswapError",
    "ParityError",
    "ParityResult",
    "RewriteError",
    "check_parity",
    "convert",
    "export_onnx",
    "inspect",
    "load_conversion",
    "load_model",
    "rewrite",
    "save_conversion",
    "targets",
]

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .keep.calibrate import CalibrationReport, agreement, calibrate
    from .compare import compare_targets
    from .rewriting.convert import Conversion, convert, inspect, load_conversion, rewrite, save_conversion, targets
    from .load.data import calibration_batches
    from .errors import InputError, NormswapError, ParityError, RewriteError
    from .export import ExportResult, export_onnx
    from .load import LoadedModel, load_model
    from .pipeline import (CheckResult, ConversionResult, RecoveryResult, Verdict, run_check, run_comparison,
                           run_conversion, run_recovery)
    from .parity import ParityResult, check_parity
    from .keep.recover import FunctionReport, RecoveryReport, keep_function, recover


def __getattr__(name: str) -> Any:
    """A public name: import its submodule and cache the name here; else a submodule (``normswap.parity``)."""
    mod = _EXPORTS.get(name)
    if mod is not None:
        value = getattr(importlib.import_module(f".{mod}", __name__), name)
        globals()[name] = value  # next access is a plain global lookup
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":  # the submodule exists but one of its imports is missing
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

