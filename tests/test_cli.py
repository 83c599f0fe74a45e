"""The CLI through a real subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("normswap")
    cmd = [exe] if exe else [sys.executable, "-m", "cli.main"]
    env = {**os.environ, "COLUMNS": "200"}
    if not exe:  # the source tree's cli/, from any working directory
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("NORMSWAP_DEBUG", None)
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def assert_one_line_error(p: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    err = p.stderr.strip()
    assert "Traceback" not in err, err
    assert err.startswith("error:"), err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`normswap convert` on the bundled model, with every output."""
    d = tmp_path_factory.mktemp("convert")
    p = run("convert", "--onnx", str(d / "digits.onnx"), "--report", str(d / "report.json"), "--save", str(d / "saved"))
    return d, p


def test_convert_bundled_default(converted):
    d, p = converted
    assert p.returncode == 0, p.stderr
    assert "PASSED" in p.stdout
    model = onnx.load(str(d / "digits.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    rep = json.loads((d / "report.json").read_text())
    assert rep["passed"] is True and rep["to"] == "fold"
    assert rep["summary"].get("refuse", 0) == 0
    pairs = {s["pair"] for s in rep["parity"]["stats"]}
    assert pairs == {"original↔rewritten", "original↔onnxruntime", "rewritten↔onnxruntime"}
    assert {s["batch"] for s in rep["parity"]["stats"]} == {1, 3}
    assert (d / "saved" / "conversion.json").is_file() and (d / "saved" / "model.safetensors").is_file()
    leftovers = [f.name for f in d.iterdir() if f.name.startswith(".")]
    assert not leftovers, leftovers


def test_saved_conversion_reloads_without_pickle(converted):
    import normswap

    d, _ = converted
    conv = normswap.load_conversion(d / "saved")
    original = normswap.load_model().model
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(conv.model(x), original(x), atol=1e-5)


def test_check_onnx_against_model(converted):
    d, _ = converted
    p = run("check", str(d / "digits.onnx"), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["passed"] is True


def test_check_against_random_weights_is_refused_not_failed(converted, tmp_path):
    """A spec that builds random weights on every load can never match an export: exit 2 saying so
    (a real mismatch, exit 3, is tests/test_check_cli.py::test_check_detects_a_real_mismatch_with_exit_3)."""
    d, _ = converted
    p = run("check", str(d / "digits.onnx"), "--against", "normswap.models.digits:digits_resnet", "--arg", "pretrained=False")
    assert_one_line_error(p, 2, "builds random weights")


def test_inspect_json():
    p = run("inspect", "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["sites"], rep
    assert all({"name", "type", "producer", "action"} <= set(s) for s in rep["sites"])
    assert {s["type"] for s in rep["sites"]} >= {"BatchNorm2d", "BatchNorm1d"}


@pytest.mark.parametrize(
    "args,needles",
    [
        (["convert", "no_such_pkg.nowhere:fn"], ["no_such_pkg"]),
        (["convert", "torch.nn:NoSuchThing"], ["NoSuchThing"]),
        (["convert", "--weights", "/nonexistent/w.safetensors"], ["does not exist"]),
        (["convert", "--input-shape", "1,x,8"], ["--input-shape"]),
        (["convert", "--to", "nosuchnorm"], ["nosuchnorm"]),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needles, tmp_path):
    p = run(*args, "--onnx", str(tmp_path / "out.onnx"))
    assert_one_line_error(p, 2, *needles)
    assert list(tmp_path.iterdir()) == [], "a failed run left files behind"


def test_wrong_input_shape_is_bad_input(tmp_path):
    p = run("convert", "--input-shape", "1,3,8,8", "--onnx", str(tmp_path / "o.onnx"))
    assert_one_line_error(p, 2, "input")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_and_truncated_checkpoints(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3)}, str(good))
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:20])
    p = run("convert", "--weights", str(trunc))
    assert_one_line_error(p, 2, "trunc.safetensors")
    p = run("convert", "--weights", str(good))  # wrong keys for the digits model
    assert_one_line_error(p, 2, "missing")


def test_untrusted_pickle_is_refused_and_trusted_one_loads(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    path = tmp_path / "whole.pt"
    torch.save(model, str(path))
    p = run("inspect", str(path), "-s", "1,1,8,8")
    assert_one_line_error(p, 2, "--trust-pickle")
    p = run("inspect", str(path), "-s", "1,1,8,8", "--trust-pickle", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["sites"][0]["action"] == "into-producer"


def test_file_spec_with_args_and_weights(tmp_path):
    """MODEL as path/to/file.py:callable with --arg, and --weights from a nested .pt checkpoint."""
    src = tmp_path / "mymodel.py"
    src.write_text(
        "from torch import nn\n"
        "def make(width=4):\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.Flatten(), nn.Linear(width * 36, 2))\n"
    )
    ns: dict = {}
    exec(src.read_text(), ns)
    m = ns["make"](width=6)
    m[1].running_var.fill_(3.0)
    torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, str(tmp_path / "ckpt.pt"))
    p = run("convert", f"{src}:make", "--arg", "width=6", "--weights", str(tmp_path / "ckpt.pt"), "-s", "1,3,8,8",
            "--onnx", str(tmp_path / "m.onnx"), "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["passed"] and rep["summary"] == {"into-producer": 1}
    assert (tmp_path / "m.onnx").is_file()


def test_check_with_user_samples(converted, tmp_path):
    import numpy as np

    d, _ = converted
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype("float32"))
    p = run("check", str(d / "digits.onnx"), "--samples", str(tmp_path / "x.npy"), "--json")
    assert p.returncode == 0, p.stderr
    stats = json.loads(p.stdout)["parity"]["stats"]
    assert any(s["batch"] == "samples" and s["shape"][0] == 5 for s in stats)
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not numpy")
    assert_one_line_error(run("check", str(d / "digits.onnx"), "--samples", str(bad)), 2, "bad.npy")
