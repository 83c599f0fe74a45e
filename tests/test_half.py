"""Half precision conversion (issue 11 B): ``run_conversion(dtype=...)`` / ``convert --dtype``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normswap.errors import InputError
from normswap.pipeline import run_conversion
from normswap.pipeline.conversion import half_tolerances
from tests.helpers import randomize_bn, same_state, snapshot


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def _model():
    torch.manual_seed(0)
    return randomize_bn(ConvBN()).eval()


def test_half_tolerances_rule():
    a, r = half_tolerances(1e-5, 1e-4, torch.float16)
    assert a == pytest.approx(1e-5 * 8192 ** 0.5) and r == pytest.approx(1e-4 * 8192 ** 0.5)
    a, r = half_tolerances(1e-5, 1e-4, torch.bfloat16)
    assert a == pytest.approx(2.56e-3) and r == pytest.approx(2.56e-2)


def test_float16_fold_exports_fp16_onnx_and_passes(tmp_path):
    import onnx

    model = _model()
    snap = snapshot(model)
    out = tmp_path / "m.onnx"
    res = run_conversion(model, "fold", input_shape=(1, 3, 16, 16), dtype="float16", onnx=out)
    assert res.exit_code == 0 and res.verdict.word == "PASSED", res.verdict.line
    assert res.parity.atol == pytest.approx(1e-5 * 8192 ** 0.5)
    assert res.model_info["dtype"] == "float16"
    assert all(p.dtype == torch.float16 for p in res.model.parameters())
    # the caller's model is neither cast nor changed
    assert all(p.dtype == torch.float32 for p in model.parameters()) and same_state(model, snap)
    g = onnx.load(str(out)).graph
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert res.export.op_counts.get("BatchNormalization", 0) == 0
    assert any(s.pair.endswith("onnxruntime") for s in res.parity.stats)
    assert any("float16" in n and "tolerances" in n for n in res.model_info["notes"])


def test_default_dtype_is_the_models_own_half():
    model = _model().half()
    res = run_conversion(model, "fold", input_shape=(2, 3, 16, 16))
    assert res.exit_code == 0, res.verdict.line
    assert res.model_info["dtype"] == "float16"
    assert res.parity.rtol == pytest.approx(1e-4 * 8192 ** 0.5)


def test_float32_model_default_unchanged():
    res = run_conversion(_model(), "fold", input_shape=(1, 3, 16, 16))
    assert res.exit_code == 0 and res.model_info["dtype"] == "float32"
    assert res.parity.atol == 1e-5


def test_bfloat16_passes_without_onnx_and_refuses_onnx(tmp_path):
    res = run_conversion(_model(), "fold", input_shape=(1, 3, 16, 16), dtype=torch.bfloat16)
    assert res.exit_code == 0, res.verdict.line
    assert all(p.dtype == torch.bfloat16 for p in res.model.parameters())
    with pytest.raises(InputError, match="bfloat16 cannot be exported: onnxruntime CPU lacks bfloat16"):
        run_conversion(_model(), "fold", input_shape=(1, 3, 16, 16), dtype="bfloat16", onnx=tmp_path / "b.onnx")
    assert not (tmp_path / "b.onnx").exists()


def test_bad_dtype_and_swap_target_refused():
    with pytest.raises(InputError, match="float16 or bfloat16"):
        run_conversion(_model(), "fold", input_shape=(1, 3, 16, 16), dtype="int8")
    with pytest.raises(InputError, match="fold only"):
        run_conversion(_model(), "gn", input_shape=(1, 3, 16, 16), dtype="float16")


def test_noise_floor_runs_on_a_half_model():
    from normswap.parity.rule import noise_floor

    model = _model().half()
    x = torch.randn(2, 3, 16, 16).half()
    with torch.no_grad():
        out = model(x)
    (floor,) = noise_floor(model, (x,), out)
    assert 0 < floor < float(out.abs().max()) * 0.05


def test_cli_dtype(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "r.onnx"
    r = CliRunner().invoke(app, ["convert", "torchvision.models:resnet18", "--arg", "num_classes=10", "--dtype", "float16",
                                 "--input-shape", "1,3,32,32", "--onnx", str(out)])
    assert r.exit_code == 0, r.output
    assert "PASSED" in r.output and out.exists()
