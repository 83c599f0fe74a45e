"""An ONNX export that fails does not hide a good rewrite: verdict NOT EXPORTED (exit 5), the line says
what the exporter could not do, the exact rewrite is still checked in PyTorch, --save is still written
and no ONNX file is left behind."""

from __future__ import annotations

import torch
from torch import nn

from normswap.pipeline import EXIT_CODES, run_conversion


class _SVD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.bn.running_mean.normal_(generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(self.bn(self.conv(x)).flatten(2))  # no ONNX operator for SVD


def test_failed_export_is_not_exported_and_still_saves(tmp_path):
    onnx, save = tmp_path / "m.onnx", tmp_path / "saved"
    res = run_conversion(_SVD().eval(), "fold", input_shape=(1, 3, 8, 8), onnx=onnx, save=save, exporter="torchscript")
    assert res.verdict.word == "NOT EXPORTED" and res.exit_code == EXIT_CODES["NOT EXPORTED"] == 5
    assert "svdvals" in res.verdict.line and "computes what the original did" in res.verdict.line
    assert res.parity is not None and res.parity.passed  # the fold itself was checked
    assert not onnx.exists() and not list(tmp_path.glob(".m.onnx*"))
    assert (save / "model.safetensors").exists()
