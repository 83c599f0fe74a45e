"""Shared test helpers for the norm family: float64 references, ONNX round trips, tiny training runs."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

BN_FOR_RANK = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV_FOR_RANK = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPATIAL = {0: (), 1: (7,), 2: (5, 6), 3: (3, 4, 5)}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got − ref| / max |ref| (both compared in float64)."""
    got, ref = torch.as_tensor(got).detach().double(), torch.as_tensor(ref).detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def make_input(n: int, c: int, spatial_dims: int, seed: int = 0, shift: float = 0.5) -> torch.Tensor:
    """A float32 [N, C, *S] input with per-channel offsets/scales (so that the statistics differ)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c, *SPATIAL[spatial_dims]), generator=g)
    scale = torch.rand(c, generator=g) * 2 + 0.5
    offset = torch.randn(c, generator=g) * shift
    shape = (1, c) + (1,) * spatial_dims
    return x * scale.reshape(shape) + offset.reshape(shape)


def trained_bn(spatial_dims: int, c: int, *, affine: bool = True, seed: int = 0, **kw) -> nn.Module:
    """A BN of the right rank with random γ, β (some negative γ) and running statistics, in eval mode."""
    torch.manual_seed(seed)
    bn = BN_FOR_RANK[spatial_dims](c, affine=affine, **kw)
    with torch.no_grad():
        if affine:
            bn.weight.uniform_(-1.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
        if bn.running_mean is not None:
            bn.running_mean.uniform_(-1.0, 1.0)
            bn.running_var.uniform_(0.3, 3.0)
            bn.num_batches_tracked.fill_(100)
    return bn.eval()


def ref_normalize(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    """(x − mean)/√(biased var + ε) over ``dims``, in float64."""
    x = x.double()
    mu = x.mean(dim=dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=dims, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A [C] vector shaped to broadcast on dim 1 of an ``ndim``-d tensor, float64."""
    return v.detach().double().reshape((1, -1) + (1,) * (ndim - 2))


def export_onnx(module: nn.Module, x: torch.Tensor, opset: int = 18) -> onnx.ModelProto:
    """TorchScript-exporter ONNX (dynamo=False) with a dynamic batch axis, module in its current mode."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x,), f, dynamo=False, opset_version=opset, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    return onnx.load_from_string(f.getvalue())


def run_onnx(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.numpy()})[0]


def onnx_parity(module: nn.Module, x: torch.Tensor, tol: float = 1e-5) -> onnx.ModelProto:
    """Export ``module`` (eval mode), run onnxruntime on ``x`` and on a batch of a different size;
    assert both match torch within ``tol`` (relative). Returns the model for op checks."""
    module = module.eval()
    model = export_onnx(module, x)
    onnx.checker.check_model(model)
    for inp in (x, torch.cat([x, x.flip(0)], 0)[: x.shape[0] + 3]):
        with torch.no_grad():
            ref = module(inp)
        got = torch.from_numpy(run_onnx(model, inp))
        assert got.shape == ref.shape
        err = rel_err(got, ref)
        assert err <= tol, f"onnxruntime vs torch: rel err {err:.2e} > {tol:.0e}"
    return model


def assert_fx_traceable(module: nn.Module, x: torch.Tensor, ref: torch.Tensor | None = None) -> None:
    """``torch.fx.symbolic_trace(module)`` computes what ``module`` (or ``ref``) does on ``x``."""
    gm = torch.fx.symbolic_trace(module)
    assert rel_err(gm(x), module(x) if ref is None else ref) <= 1e-6


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def assert_batch_independent(module: nn.Module, x: torch.Tensor, independent: bool, tol: float = 1e-5) -> None:
    """Training mode: sample 0 alone vs in the batch ``x`` (N ≥ 8). ``independent`` says which result to
    expect; a batch-dependent module must give a measurably different output."""
    module.train()
    with torch.no_grad():
        try:
            alone = module(x[:1].clone())
        except ValueError as err:  # like nn.BatchNorm: a batch statistic of one value is refused
            assert not independent, f"a batch-independent module refused a single sample: {err}"
            return
        in_batch = module(x.clone())[:1]
    err = rel_err(alone, in_batch)
    if independent:
        assert err <= tol, f"output of a sample depends on the batch (rel err {err:.2e})"
    else:
        assert err > 1e-3, f"expected batch dependence, got rel err {err:.2e}"


def train_loss_drops(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 25, lr: float = 0.05
) -> tuple[float, float]:
    """Adam on cross-entropy for ``steps`` steps on a fixed batch; returns (first loss, last loss)."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = float(nn.functional.cross_entropy(model(x), y))
    return losses[0], final


def tiny_task(spatial_dims: int, c_in: int = 3, n: int = 16, classes: int = 3, seed: int = 0):
    """A fixed random classification batch whose label depends on the input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c_in, *SPATIAL[spatial_dims]), generator=g)
    flat = x.reshape(n, -1)
    y = (flat[:, : flat.shape[1] // 2].sum(1) > flat[:, flat.shape[1] // 2 :].sum(1)).long()
    y = y + (flat[:, 0] > 1).long()
    return x, y.clamp_max(classes - 1)


class Head(nn.Module):
    """producer → norm → ReLU → global mean → Linear: the tiny model for training tests."""

    def __init__(self, producer: nn.Module, norm: nn.Module, c: int, classes: int = 3) -> None:
        super().__init__()
        self.producer, self.norm, self.fc = producer, norm, nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.producer(x)))
        if h.dim() > 2:
            h = h.flatten(2).mean(-1)
        return self.fc(h)
