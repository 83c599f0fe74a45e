"""A verdict that cannot lie: ``normswap check`` refuses what would make its verdict meaningless,
untrusted pickles are refused naming what they import, and Ctrl-C at start-up is one line.

Through the CLI as a real subprocess (as tests/test_cli.py runs it) and through the API. Every
refusal asserts the exit code, a single stderr line, that no output file was written and that the
marker a malicious pickle would create does not exist.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SYSTEM = f"{os.system.__module__}.system"  # posix.system: what os.system pickles as


def cli_cmd() -> list[str]:
    exe = shutil.which("normswap")
    return [exe] if exe else [sys.executable, "-m", "cli.main"]


def cli_env() -> dict[str, str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("NORMSWAP_DEBUG", None)
    return env


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*cli_cmd(), *args], capture_output=True, text=True, cwd=cwd, env=cli_env(), timeout=600)


def files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def assert_refused(p: subprocess.CompletedProcess, code: int, *needles: str, before: set[str] | None = None,
                   where: Path | None = None, marker: Path | None = None) -> str:
    """Exit ``code``, exactly one stderr line starting ``error:`` holding every needle, no traceback or
    warning, no new file in ``where`` (compared with ``before``), no ``marker``."""
    assert p.returncode == code, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:"), err
    assert "Traceback" not in err and "Warning" not in err, err
    for n in needles:
        assert n in err, (n, err)
    if where is not None:
        assert files(where) == (before or set()), files(where) ^ (before or set())
    if marker is not None:
        assert not marker.exists(), "the malicious pickle ran"
    return err


class Shell:
    """Unpickling this runs ``touch MARKER`` through os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory) -> Path:
    """The bundled digits model, folded and exported by the CLI (input [N, 1, 8, 8])."""
    d = tmp_path_factory.mktemp("digits")
    p = run("convert", "--onnx", str(d / "d.onnx"))
    assert p.returncode == 0, p.stderr
    return d / "d.onnx"


def _small_model_source(path: Path) -> Path:
    path.write_text(
        "from torch import nn\n"
        "def make(width=4):\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))\n"
    )
    return path


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    """A 3-channel model given as file.py:make, its weights (w.pt) and the ONNX convert wrote from them."""
    d = tmp_path_factory.mktemp("rgb")
    src = _small_model_source(d / "rgbmodel.py")
    ns: dict = {}
    exec(src.read_text(), ns)
    torch.manual_seed(0)
    m = ns["make"]()
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    torch.save(m.state_dict(), d / "w.pt")
    p = run("convert", f"{src}:make", "--weights", str(d / "w.pt"), "-s", "1,3,12,12", "--onnx", str(d / "m.onnx"))
    assert p.returncode == 0, p.stderr
    return d, f"{src}:make"


# --------------------------------------------------------------------------- check: unreadable ONNX


def _bad_onnx(d: Path, kind: str, good: Path) -> Path:
    path = d / f"{kind}.onnx"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("this is not an ONNX model\n")
    elif kind == "directory":
        path.mkdir()
    elif kind == "torch-file":
        torch.save({"w": torch.zeros(2)}, path)
    return path


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "directory", "torch-file"])
def test_check_unreadable_onnx_is_bad_input_before_loading_the_model(digits_onnx, tmp_path, kind):
    path = _bad_onnx(tmp_path, kind, digits_onnx)
    before = files(tmp_path)
    # an --against that cannot even be imported: the ONNX file is refused first, so its error shows
    p = run("check", str(path), "--against", "no_such_pkg_xyz:build")
    err = assert_refused(p, 2, "is not a readable ONNX model", "pass the file normswap convert --onnx wrote",
                         before=before, where=tmp_path)
    assert "no_such_pkg_xyz" not in err and "re-export" not in err


def test_check_missing_onnx(tmp_path):
    assert_refused(run("check", str(tmp_path / "nope.onnx")), 2, "not found", before=set(), where=tmp_path)


def test_read_onnx_inputs_api(digits_onnx, tmp_path):
    from normswap.pipeline.check import read_onnx_inputs
    from normswap.errors import InputError

    (name, dims), = read_onnx_inputs(digits_onnx)
    assert dims[1:] == [1, 8, 8] and len(dims) == 4
    for kind in ("empty", "truncated", "text", "directory"):
        with pytest.raises(InputError, match="is not a readable ONNX model") as info:
            read_onnx_inputs(_bad_onnx(tmp_path, kind, digits_onnx))
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- check: tolerances


@pytest.mark.parametrize("opt,value", [("--atol", "-1e-5"), ("--rtol", "-0.1"), ("--atol", "nan"), ("--rtol", "inf")])
def test_check_bad_tolerance_names_the_option(digits_onnx, tmp_path, opt, value):
    p = run("check", str(digits_onnx), opt, value)
    assert_refused(p, 2, opt, "finite", before=set(), where=tmp_path)


# --------------------------------------------------------------------------- check: which model


def test_check_says_it_compares_against_the_bundled_model(digits_onnx):
    p = run("check", str(digits_onnx))
    assert p.returncode == 0, p.stderr
    assert "comparing against the bundled digits ResNet (no --against given)" in p.stdout.splitlines()[0]
    assert p.stderr.strip() == ""
    p = run("check", str(digits_onnx), "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["passed"] is True
    assert rep["against"]["bundled_default"] is True
    assert rep["against"]["description"] == "the bundled digits ResNet (no --against given)"
    assert rep["against"]["spec"] == "normswap.models.digits:digits_resnet"


def test_check_other_model_without_against_says_pass_against(rgb):
    d, _ = rgb
    before = files(d)
    p = run("check", str(d / "m.onnx"))
    assert_refused(p, 2, "[N,3,12,12]", "[N,1,8,8]", "pass --against MODEL", before=before, where=d)


def test_check_against_random_weights_is_refused(rgb, digits_onnx):
    d, spec = rgb
    before = files(d)
    p = run("check", str(d / "m.onnx"), "--against", spec, "-s", "1,3,12,12")
    err = assert_refused(p, 2, f"--against {spec} builds random weights on every load, so no export can match it",
                         "pass --weights FILE (the weights the ONNX was exported from) or the spec's pretrained argument",
                         before=before, where=d)
    assert "FAILED" not in p.stdout and err
    p = run("check", str(digits_onnx), "--against", "normswap.models.digits:digits_resnet", "--arg", "pretrained=False")
    assert_refused(p, 2, "builds random weights on every load")


def test_check_against_with_weights_passes_and_takes_the_onnx_input_shape(rgb):
    d, spec = rgb
    p = run("check", str(d / "m.onnx"), "--against", spec, "--weights", str(d / "w.pt"), "--json")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["passed"] is True and rep["against"]["bundled_default"] is False
    assert rep["against"]["input_shape"] == [1, 3, 12, 12]
    assert rep["against"]["input_shape_from"] == "the ONNX file's input"
    p = run("check", str(d / "m.onnx"), "--against", spec, "--weights", str(d / "w.pt"), "-s", "1,3,10,10")
    assert_refused(p, 2, "--input-shape", "[N,3,12,12]")


def test_check_detects_a_real_mismatch_with_exit_3(digits_onnx, tmp_path):
    """Trained weights, but not the ones the ONNX was exported from: a verdict, exit 3."""
    from safetensors.torch import save_file

    import normswap

    sd = normswap.load_model().model.state_dict()
    sd = {k: (v * 1.05 if v.is_floating_point() else v) for k, v in sd.items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "other.safetensors"))
    p = run("check", str(digits_onnx), "--weights", str(tmp_path / "other.safetensors"))
    assert p.returncode == 3, (p.stdout, p.stderr)
    assert "FAILED" in p.stdout


def test_check_weights_that_do_not_fit_name_the_keys(digits_onnx, tmp_path):
    from safetensors.torch import save_file

    import normswap

    sd = normswap.load_model().model.state_dict()
    sd = {k: v.contiguous() for k, v in sd.items() if k != "head.0.bias"}
    sd["stem.0.weight"] = torch.zeros(16, 1, 3, 3)
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    before = files(tmp_path)
    p = run("check", str(digits_onnx), "--weights", str(tmp_path / "bad.safetensors"))
    assert_refused(p, 2, "1 missing (head.0.bias)", "1 unexpected (extra.weight)",
                   "1 with the wrong shape (stem.0.weight: file (16, 1, 3, 3) vs model (32, 1, 3, 3))",
                   before=before, where=tmp_path)


# --------------------------------------------------------------------------- malicious pickles


@pytest.mark.parametrize(
    "role,legacy",
    [("model", False), ("model", True), ("weights", False), ("weights", True), ("check-weights", False), ("samples", True)],
)
def test_malicious_pickle_is_refused_through_the_cli(digits_onnx, tmp_path, legacy, role):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.pt"
    torch.save(Shell(marker), evil, _use_new_zipfile_serialization=not legacy)
    out = tmp_path / "out"
    out.mkdir()
    if role == "model":
        args = ["convert", str(evil), "--onnx", str(out / "o.onnx"), "--report", str(out / "r.json")]
    elif role == "weights":
        args = ["convert", "--weights", str(evil), "--onnx", str(out / "o.onnx"), "--save", str(out / "saved")]
    elif role == "check-weights":
        args = ["check", str(digits_onnx), "--weights", str(evil)]
    else:
        args = ["check", str(digits_onnx), "--samples", str(evil)]
    p = run(*args)
    assert_refused(p, 2, f"pickle refused: '{evil}' imports {SYSTEM}, which weights-only loading does not allow",
                   "pass --trust-pickle only for files you trust", before=set(), where=out, marker=marker)
    assert "corrupt" not in p.stderr


def test_malicious_pickle_api_never_runs(tmp_path):
    import normswap
    from normswap.errors import InputError
    from normswap.load import load_state_dict_file

    marker = tmp_path / "MARKER"
    for i, kw in enumerate([{}, {"_use_new_zipfile_serialization": False}, {"pickle_protocol": 4}]):
        evil = tmp_path / f"evil{i}.pt"
        torch.save(Shell(marker), evil, **kw)
        for call in (lambda: normswap.load_model(str(evil)), lambda: load_state_dict_file(evil),
                     lambda: normswap.load_model(weights=evil)):
            with pytest.raises(InputError, match=rf"^pickle refused: .* imports {SYSTEM}"):
                call()
    assert not marker.exists()


# --------------------------------------------------------------------------- Ctrl-C at start-up


def test_sigint_during_startup_is_one_line_no_traceback():
    if os.name != "posix":
        pytest.skip("SIGINT delivery to a child is POSIX-only")
    interrupted = 0
    for delay in (0.3, 0.8, 1.5):
        proc = subprocess.Popen([*cli_cmd(), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=cli_env())
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        assert "Traceback" not in err, err
        if proc.returncode == 0:  # finished (or the interrupt landed after the work was done)
            continue
        interrupted += 1
        assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)
        assert err.strip() in ("interrupted", ""), err
        assert len(err.strip().splitlines()) <= 1, err
    if not interrupted:
        pytest.skip("the CLI started faster than the interrupt could be sent")


def test_main_catches_keyboard_interrupt_in_imports(monkeypatch, capsys):
    """API level: an interrupt while the app is being built is caught by main()."""
    import cli.main as M

    def boom():
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "build_app", boom)
    assert M.main() == 130
    assert capsys.readouterr().err == "interrupted\n"
