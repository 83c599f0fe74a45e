"""Tests for normswap.export and normswap.atomic."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from normswap import export as export_mod
from normswap.atomic import atomic_path, atomic_write_text, default_file_mode, staging_dir
from normswap.errors import InputError, NormswapError
from normswap.export import ExportResult, export_onnx, onnx_op_counts, prepare_for_export
from normswap.parity import check_parity, run_onnxruntime


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = ConvBN()

    def forward(self, x):
        y = self.body(x)
        return {"logits": y, "aux": (y.softmax(-1), x.flatten(1).sum(1, keepdim=True))}


def _model(cls=ConvBN, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = cls()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _batch_dims(path) -> tuple[list, list]:
    m = onnx.load(str(path), load_external_data=False)
    dim0 = lambda vi: vi.type.tensor_type.shape.dim[0].dim_param  # noqa: E731
    return [dim0(i) for i in m.graph.input], [dim0(o) for o in m.graph.output]


def _assert_runs_like_torch(model, path, shape):
    for b in (1, 3):
        x = torch.randn(b, *shape[1:])
        with torch.no_grad():
            ref = model(x)
        res = check_parity(model, None, path, inputs=[(b, (x,))])
        assert res, res.summary()
        assert res.stats[0].shape[0] == b
    return ref


# ---------------------------------------------------------------------------------------------
# exporting


@pytest.mark.parametrize("exporter", ["torchscript"])  # dynamo: see test_auto_falls_back_to_dynamo...
def test_tensor_output_with_dynamic_batch(tmp_path, exporter):
    m = _model()
    before = copy.deepcopy(m.state_dict())
    r = export_onnx(m, (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx", exporter=exporter)
    assert isinstance(r, ExportResult) and r.exporter == exporter and r.opset == 20
    assert r.input_names == ["input"] and r.output_names == ["output"]
    assert r.verified_batches == [1, 3] and r.max_rel_err < 1e-5
    assert _batch_dims(r.path) == (["batch"], ["batch"])
    assert "BatchNormalization" not in r.op_counts and r.op_counts["Conv"] == 1  # both exporters fold eval BN
    assert not r.external_data and r.data_path is None and r.ir_version >= 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    _assert_runs_like_torch(m, r.path, (1, 3, 8, 8))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    d = r.to_dict()
    assert json.loads(json.dumps(d))["path"] == str(r.path)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_dict_and_tuple_outputs(tmp_path, exporter):
    m = _model(DictOut)
    r = export_onnx(m, (torch.randn(2, 3, 8, 8),), tmp_path / "d.onnx", exporter=exporter)
    assert r.output_names == ["logits", "aux_0", "aux_1"]
    assert _batch_dims(r.path) == (["batch"], ["batch", "batch", "batch"])
    x = torch.randn(3, 3, 8, 8)
    outs = run_onnxruntime(r.path, (x,))
    with torch.no_grad():
        ref = m(x)
    np.testing.assert_allclose(outs[0], ref["logits"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outs[2], ref["aux"][1].numpy(), rtol=1e-4, atol=1e-4)
    assert check_parity(m, None, r.path, input_shape=(1, 3, 8, 8))


def test_tuple_output_custom_names_and_non_tensor_leaves(tmp_path):
    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            y = self.lin(x)
            return y, None, [y.relu(), 2]  # non-tensor leaves are dropped

    m = TupleOut().eval()
    r = export_onnx(m, (torch.randn(2, 4),), tmp_path / "t.onnx", exporter="torchscript")
    assert r.output_names == ["output_0", "output_2_0"]
    r2 = export_onnx(m, (torch.randn(2, 4),), tmp_path / "t2.onnx", exporter="torchscript",
                     input_names=["features"], output_names=["a", "b"])
    assert r2.input_names == ["features"] and r2.output_names == ["a", "b"]
    assert check_parity(m, None, r2.path, input_shape=(1, 4))
    with pytest.raises(InputError):
        export_onnx(m, (torch.randn(2, 4),), tmp_path / "t3.onnx", output_names=["only_one"])


def test_multi_input_with_non_tensor_leaves_dynamo(tmp_path):
    class TwoIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.emb = nn.Embedding(10, 3)

        def forward(self, x, ids):
            y = self.lin(x) + self.emb(ids).mean(1)
            return {"a": y, "none": None, "k": 3, "b": [y * 2]}

    m = TwoIn().eval()
    r = export_onnx(m, (torch.randn(1, 4), torch.randint(0, 10, (1, 5))), tmp_path / "two.onnx", exporter="dynamo")
    assert r.input_names == ["input_0", "input_1"] and r.output_names == ["a", "b_0"]
    assert _batch_dims(r.path) == (["batch", "batch"], ["batch", "batch"])
    inputs = [(b, (torch.randn(b, 4), torch.randint(0, 10, (b, 5)))) for b in (1, 3)]
    assert check_parity(m, None, r.path, inputs=inputs)


def test_static_batch(tmp_path):
    m = _model()
    r = export_onnx(m, (torch.randn(2, 3, 8, 8),), tmp_path / "s.onnx", exporter="torchscript", dynamic_batch=False)
    m_onnx = onnx.load(str(r.path))
    assert m_onnx.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert r.verified_batches == [2]


def test_opset_21_goes_to_dynamo_and_emits_groupnorm_with_external_data(tmp_path):
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8)).eval()
    with pytest.raises(InputError, match="dynamo"):
        export_onnx(m, (torch.randn(1, 3, 8, 8),), tmp_path / "g.onnx", exporter="torchscript", opset=21)
    r = export_onnx(m, (torch.randn(1, 3, 8, 8),), tmp_path / "g.onnx", opset=21, external_data=True)
    assert r.exporter == "dynamo" and r.opset == 21 and r.op_counts.get("GroupNormalization") == 1
    assert r.external_data and sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]
    assert check_parity(m, None, r.path, input_shape=(1, 3, 8, 8))


def test_bad_arguments_are_input_errors(tmp_path):
    m = _model()
    x = (torch.randn(1, 3, 8, 8),)
    for kw in ({"exporter": "tflite"}, {"opset": 99}, {"input_names": ["a", "b"]}):
        with pytest.raises(InputError):
            export_onnx(m, x, tmp_path / "m.onnx", **kw)
    with pytest.raises(InputError, match="directory"):
        export_onnx(m, x, tmp_path)
    with pytest.raises(InputError, match="example_inputs"):
        export_onnx(m, ("not a tensor",), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
    assert 21 <= export_mod.ort_max_opset() <= onnx.defs.onnx_opset_version()
    assert 20 in export_mod.supported_opsets("torchscript") and 21 not in export_mod.supported_opsets("torchscript")


def test_export_is_silent(tmp_path, capfd):
    export_onnx(_model(), (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx", exporter="torchscript")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# ---------------------------------------------------------------------------------------------
# atomicity and failures


class Raises(nn.Module):
    def forward(self, x):
        raise RuntimeError("forward is broken")


class Untraceable(nn.Module):
    """Runs eagerly, refuses to be traced by either exporter."""

    def forward(self, x):
        if torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.compiler.is_compiling():
            raise RuntimeError("this forward cannot be traced")
        return x * 2


def test_failing_forward_leaves_nothing_and_keeps_the_old_file(tmp_path):
    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"old")
    with pytest.raises(InputError, match="forward is broken"):
        export_onnx(Raises(), (torch.randn(1, 3),), dest)
    assert dest.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_unexportable_model_fails_with_both_exporters_and_leaves_nothing(tmp_path):
    with pytest.raises(NormswapError) as info:
        export_onnx(Untraceable(), (torch.randn(1, 3),), tmp_path / "u.onnx")
    msg = str(info.value)
    assert not isinstance(info.value, InputError)
    assert "\n" not in msg and "torchscript" in msg and "dynamo" in msg and "cannot be traced" in msg
    assert list(tmp_path.iterdir()) == []


def test_single_exporter_failure_names_it_and_suggests_the_other(tmp_path):
    with pytest.raises(NormswapError) as info:
        export_onnx(Untraceable(), (torch.randn(1, 3),), tmp_path / "u.onnx", exporter="torchscript")
    msg = str(info.value)
    assert "torchscript exporter failed" in msg and "--exporter dynamo" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("exc", "expected"), [(RuntimeError("checker exploded"), NormswapError),
                                               (KeyboardInterrupt(), KeyboardInterrupt)])
def test_failure_after_the_file_was_written_leaves_nothing(tmp_path, monkeypatch, exc, expected):
    seen = []

    def boom(file, *a, **k):
        assert file.exists() and file.stat().st_size > 0  # the exporter did write, in the staging dir
        seen.append(file)
        raise exc

    monkeypatch.setattr(export_mod, "_check_and_verify", boom)
    with pytest.raises(expected):
        export_onnx(_model(), (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx", exporter="torchscript",
                    external_data=True)
    assert seen and not seen[0].exists()
    assert list(tmp_path.iterdir()) == []


def test_auto_falls_back_to_dynamo_when_torchscript_output_is_rejected(tmp_path, monkeypatch):
    real = export_mod._export_torchscript

    def sabotage(model, args, file, *a, **k):
        real(model, args, file, *a, **k)
        file.write_bytes(b"not an onnx model")

    monkeypatch.setattr(export_mod, "_export_torchscript", sabotage)
    r = export_onnx(_model(), (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx")
    assert r.exporter == "dynamo" and [a["exporter"] for a in r.attempts] == ["torchscript", "dynamo"]
    assert r.attempts[0]["error"] and "torchscript exporter failed" in r.notes[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    # the dynamo file: tensor output, dynamic batch, BN folded, runs at batch 1 and 3
    assert r.input_names == ["input"] and r.output_names == ["output"] and r.verified_batches == [1, 3]
    assert _batch_dims(r.path) == (["batch"], ["batch"])
    assert "BatchNormalization" not in r.op_counts and r.op_counts["Conv"] == 1
    _assert_runs_like_torch(_model(), r.path, (1, 3, 8, 8))


def test_external_data_forced_loads_and_passes_parity(tmp_path):
    m = _model()
    dest = tmp_path / "big.onnx"
    r = export_onnx(m, (torch.randn(1, 3, 8, 8),), dest, exporter="torchscript", external_data=True)
    assert r.external_data and r.data_path == tmp_path / "big.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    proto = onnx.load(str(dest), load_external_data=False)
    ext = [t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert ext and all(e.value == "big.onnx.data" for t in ext for e in t.external_data if e.key == "location")
    onnx.checker.check_model(str(dest))
    assert check_parity(m, None, dest, input_shape=(1, 3, 8, 8))
    # the same destination without external data: the stale data file goes away
    r2 = export_onnx(m, (torch.randn(1, 3, 8, 8),), dest, exporter="torchscript", external_data=False)
    assert not r2.external_data and sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx"]
    assert check_parity(m, None, dest, input_shape=(1, 3, 8, 8))


def test_external_data_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_THRESHOLD", 100)  # bytes
    r = export_onnx(_model(), (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx", exporter="torchscript")
    assert r.external_data and (tmp_path / "m.onnx.data").exists()


# ---------------------------------------------------------------------------------------------
# op counts


def test_onnx_op_counts_include_functions_and_subgraphs(tmp_path):
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e1"]), helper.make_node("Relu", ["e1"], ["e"])],
                               "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y0"], then_branch=then_g, else_branch=else_g),
        helper.make_node("AddTwice", ["y0"], ["y"], domain="local"),
    ]
    fn = helper.make_function("local", "AddTwice", ["a"], ["b"],
                              [helper.make_node("Add", ["a", "a"], ["a2"]), helper.make_node("Add", ["a2", "a"], ["b"])],
                              [helper.make_opsetid("", 20)])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              initializer=[helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("local", 1)],
                              functions=[fn])
    expected = {"Relu": 2, "Add": 2, "ReduceSum": 1, "Greater": 1, "If": 1, "Neg": 1, "local::AddTwice": 1}
    assert onnx_op_counts(model) == expected
    path = tmp_path / "if.onnx"
    onnx.save(model, str(path))
    assert onnx_op_counts(path) == expected
    assert list(onnx_op_counts(path))[0] in ("Add", "Relu")  # most frequent first


# ---------------------------------------------------------------------------------------------
# prepare_for_export


class StdConv(nn.Conv2d):
    """A weight-standardized conv; its export form bakes the standardized weight into a plain conv."""

    def standardized(self) -> torch.Tensor:
        w = self.weight
        mean = w.mean((1, 2, 3), keepdim=True)
        var = w.var((1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) / torch.sqrt(var + 1e-5)

    def forward(self, x):
        return F.conv2d(x, self.standardized(), self.bias, self.stride, self.padding)

    def export_form(self) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding)
        conv.weight.data.copy_(self.standardized())
        conv.bias.data.copy_(self.bias)
        return conv


class SelfForm(nn.Module):
    def forward(self, x):
        return x + 1

    def export_form(self):
        return self  # nothing to substitute: must not loop


def test_prepare_for_export_substitutes_and_does_not_mutate():
    torch.manual_seed(0)
    shared = StdConv(4, 4, 3, padding=1)
    m = nn.Sequential(StdConv(3, 4, 3, padding=1), nn.ReLU(), nn.Sequential(shared, shared), SelfForm())
    m.train()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = m.eval()(x)
    m.train()
    p = prepare_for_export(m)
    assert type(p[0]) is nn.Conv2d and type(p[2][0]) is nn.Conv2d and p[2][0] is p[2][1]  # sharing kept
    assert isinstance(p[3], SelfForm) and not p.training and not p[0].training
    assert type(m[0]) is StdConv and m.training  # the argument is untouched
    assert not p[0].weight.requires_grad or p[0].weight.grad_fn is None
    with torch.no_grad():
        torch.testing.assert_close(p(x), ref, rtol=1e-5, atol=1e-5)
    root = prepare_for_export(StdConv(3, 2, 3))
    assert type(root) is nn.Conv2d


def test_export_uses_the_export_form(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(StdConv(3, 4, 3, padding=1), nn.ReLU()).eval()
    r = export_onnx(m, (torch.randn(1, 3, 8, 8),), tmp_path / "ws.onnx", exporter="torchscript")
    assert set(r.op_counts) == {"Conv", "Relu"}  # the standardization is baked, not computed per inference
    assert check_parity(m, None, r.path, input_shape=(1, 3, 8, 8))
    assert type(m[0]) is StdConv


# ---------------------------------------------------------------------------------------------
# atomic.py


def test_atomic_write_text_and_path(tmp_path):
    dest = tmp_path / "sub" / "report.json"
    atomic_write_text(dest, '{"a": 1}')
    assert json.loads(dest.read_text()) == {"a": 1}
    assert dest.stat().st_mode & 0o777 == default_file_mode()  # not mkstemp's 0o600
    with pytest.raises(ValueError):
        with atomic_path(dest) as tmp:
            tmp.write_text("partial")
            raise ValueError("stop")
    assert json.loads(dest.read_text()) == {"a": 1}
    assert sorted(p.name for p in dest.parent.iterdir()) == ["report.json"]
    with atomic_path(tmp_path / "x.txt") as tmp:
        assert tmp.parent == tmp_path
        tmp.write_text("done")
    assert (tmp_path / "x.txt").read_text() == "done"
    with pytest.raises(KeyboardInterrupt):
        with staging_dir(tmp_path / "y.onnx") as d:
            (d / "y.onnx").write_bytes(b"x")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub", "x.txt"]
