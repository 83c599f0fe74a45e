"""normswap: rewrite the normalization layers of trained PyTorch networks.

    import normswap
    loaded = normswap.load_model("torchvision.models:resnet50")
    x = torch.randn(1, 3, 224, 224)
    folded = normswap.convert(loaded.model, to="fold", example_inputs=(x,))
    normswap.export_onnx(folded, (x,), "r50.onnx")
    assert normswap.check_parity(loaded.model, folded, "r50.onnx", input_shape=x.shape)

Importing ``normswap`` is cheap: the public names below are imported from their submodules on
first use (PEP 562), so ``import normswap`` and the CLI's ``--help`` / ``targets`` / ``version``
never import torch. ``normswap.parity``, ``normswap.fold`` ... (any submodule) load on first access
too.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("Conversion", "convert", "inspect", "load_conversion", "rewrite", "save_conversion", "targets"), "convert"),
    **dict.fromkeys(("InputError", "NormswapError", "ParityError", "RewriteError"), "errors"),
    **dict.fromkeys(("ExportResult", "export_onnx"), "export"),
    **dict.fromkeys(("LoadedModel", "load_model"), "load"),
    **dict.fromkeys(("ParityResult", "check_parity"), "parity"),
    **dict.fromkeys(("CalibrationReport", "agreement", "calibrate"), "calibrate"),
    "compare_targets": "compare",
    "calibration_batches": "data",
    **dict.fromkeys(("FunctionReport", "RecoveryReport", "keep_function", "recover"), "recover"),
    **dict.fromkeys(("CheckResult", "ConversionResult", "RecoveryResult", "Verdict", "run_check", "run_comparison", "run_conversion",
                     "run_recovery"), "pipeline"),
}

#: functions named like the submodule that defines them: ``normswap.convert`` / ``.calibrate`` /
#: ``.recover`` are the functions (as they were when this file imported everything eagerly), even
#: after ``from normswap.recover import ...`` made the import system bind the submodule here.
_SHADOWED = frozenset(name for name, mod in _EXPORTS.items() if name == mod)

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
    from .calibrate import CalibrationReport, agreement, calibrate
    from .compare import compare_targets
    from .convert import Conversion, convert, inspect, load_conversion, rewrite, save_conversion, targets
    from .data import calibration_batches
    from .errors import InputError, NormswapError, ParityError, RewriteError
    from .export import ExportResult, export_onnx
    from .load import LoadedModel, load_model
    from .pipeline import (CheckResult, ConversionResult, RecoveryResult, Verdict, run_check, run_comparison,
                           run_conversion, run_recovery)
    from .parity import ParityResult, check_parity
    from .recover import FunctionReport, RecoveryReport, keep_function, recover


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


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package (``setattr(normswap, "recover", <module>)``);
    for the names in :data:`_SHADOWED` bind the function instead, so ``normswap.recover`` is the
    function whichever import ran first."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
