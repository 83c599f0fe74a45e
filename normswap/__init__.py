"""normswap: rewrite the normalization layers of trained PyTorch networks.

    import normswap
    loaded = normswap.load_model("torchvision.models:resnet50")
    x = torch.randn(1, 3, 224, 224)
    folded = normswap.convert(loaded.model, to="fold", example_inputs=(x,))
    normswap.export_onnx(folded, (x,), "r50.onnx")
    assert normswap.check_parity(loaded.model, folded, "r50.onnx", input_shape=x.shape)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .convert import Conversion, convert, inspect, load_conversion, rewrite, save_conversion, targets  # noqa: E402
from .errors import InputError, NormswapError, ParityError, RewriteError  # noqa: E402
from .export import ExportResult, export_onnx  # noqa: E402
from .load import LoadedModel, load_model  # noqa: E402
from .parity import ParityResult, check_parity  # noqa: E402
from .calibrate import CalibrationReport, agreement, calibrate  # noqa: E402
from .compare import compare_targets  # noqa: E402
from .data import calibration_batches  # noqa: E402
from .recover import FunctionReport, RecoveryReport, keep_function, recover  # noqa: E402

__all__ = [
    "__version__",
    "CalibrationReport",
    "FunctionReport",
    "RecoveryReport",
    "agreement",
    "calibrate",
    "calibration_batches",
    "compare_targets",
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
