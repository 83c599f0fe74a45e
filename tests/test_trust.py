"""A verdict that cannot lie: every case of issue 10 through the CLI (a real subprocess) and the API.

Each CLI case asserts the exit code, a one-line message, and that no output was written or replaced.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import normswap
from tests.test_cli import assert_one_line_error, run

MODELS = Path(__file__).parent / "data" / "odd_models.py"


def _spec(fn: str) -> str:
    return f"{MODELS}:{fn}"


@pytest.fixture()
def old_onnx(tmp_path):
    p = tmp_path / "out.onnx"
    p.write_bytes(b"an earlier export")
    return p


def _untouched(old_onnx: Path) -> None:
    assert old_onnx.read_bytes() == b"an earlier export"
    assert not [f.name for f in old_onnx.parent.iterdir() if f.name.startswith(".")]  # no staging leftovers


# ---------------------------------------------------------------- 1. parity that fails when it should


def test_nan_output_fails_and_keeps_the_existing_onnx(tmp_path, old_onnx):
    rep = tmp_path / "r.json"
    p = run("convert", _spec("nan_conv"), "--input-shape", "1,3,8,8", "--onnx", str(old_onnx), "--report", str(rep))
    assert p.returncode == 3, (p.stdout, p.stderr)
    assert "the original model itself outputs NaN" in p.stdout and "PASSED" not in p.stdout
    _untouched(old_onnx)
    r = json.loads(rep.read_text())  # the report that explains the failure is written
    assert r["parity"]["verdict"] == "failed" and r["passed"] is False
    assert "outputs NaN" in r["parity"]["divergence"]  # where the NaN starts
    # --keep-failed writes it anyway
    p = run("convert", _spec("nan_conv"), "--input-shape", "1,3,8,8", "--onnx", str(old_onnx), "--keep-failed")
    assert p.returncode == 3 and old_onnx.read_bytes() != b"an earlier export"


@pytest.mark.parametrize("fn,needle", [("nan_var", "running statistics contain NaN"), ("eps0", "running_var + eps is 0")])
def test_bn_without_a_finite_fold_is_refused(fn, needle, old_onnx):
    p = run("convert", _spec(fn), "--input-shape", "1,3,8,8", "--onnx", str(old_onnx))
    assert_one_line_error(p, 2, needle, "rewrote none")
    _untouched(old_onnx)


@pytest.mark.parametrize("fn,needle", [("empty", "empty output"), ("const", "constant output")])
def test_nothing_compared_is_its_own_verdict(fn, needle, old_onnx, tmp_path):
    rep = tmp_path / "r.json"
    p = run("convert", _spec(fn), "--input-shape", "1,3,8,8", "--onnx", str(old_onnx), "--report", str(rep))
    assert p.returncode == 4, (p.stdout, p.stderr)
    assert "NOTHING COMPARED" in p.stdout and needle in p.stdout and "--samples" in p.stdout
    assert p.stderr.strip().startswith("nothing was compared")
    _untouched(old_onnx)
    assert json.loads(rep.read_text())["parity"]["verdict"] == "nothing compared"


def test_badly_conditioned_original_passes_on_its_own_noise_floor(tmp_path):
    p = run("convert", _spec("illcond"), "--input-shape", "1,3,8,8", "--onnx", str(tmp_path / "o.onnx"))
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "own float32 noise" in p.stdout and (tmp_path / "o.onnx").is_file()


def test_api_rewrite_names_a_nan_original_and_carries_the_result():
    m = torch.nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        m[0].weight[0, 0, 0, 0] = math.inf
    with pytest.raises(normswap.ParityError) as e:
        normswap.rewrite(m, "fold", (torch.randn(1, 3, 6, 6),))
    msg = str(e.value)
    assert "\n" not in msg and "itself outputs" in msg and "please report" not in msg
    assert e.value.result.verdict == "failed" and e.value.conversion.model is not None


def test_api_too_tight_tolerance_is_blamed_on_the_tolerance(monkeypatch):
    from normswap.parity import results

    # no floor: only the user's atol decides (NOISE_FACTOR is read by OutputStats.allowed, the rule's allowance)
    monkeypatch.setattr(results, "NOISE_FACTOR", 0.0)
    torch.manual_seed(0)
    m = torch.nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16)).eval()
    for bn in (m[1], m[3]):
        bn.running_var.uniform_(0.1, 3)
        bn.running_mean.normal_()
    with pytest.raises(normswap.ParityError, match="tighter than float32 rounding allows"):
        normswap.rewrite(m, "fold", (torch.randn(2, 3, 16, 16),), atol=0.0, rtol=0.0)


# ---------------------------------------------------------------- 3. bad input refused before work, exit 2


BAD_INPUT = [
    (["--onnx", "{d}/x.onnx", "--report", "{d}/x.onnx"], "is also --onnx"),
    (["--weights", "{d}/w.pt", "--report", "{d}/w.pt"], "would overwrite the input --weights"),
    (["--onnx", "{d}/adir"], "is an existing directory"),
    (["--report", "{d}/adir"], "is an existing directory"),
    (["--onnx", "{d}/afile/x.onnx"], "is a file, not a directory"),
    (["--report", "/proc/normswap-test/x.json"], "cannot write in"),
    (["--save", "{d}/afile"], "exists and is a file"),
    (["--save", "{d}/s", "--report", "{d}/s/conversion.json"], "give each output its own path"),
    (["--to", "gn", "--groups", "0"], "--groups 0"),
    (["--to", "gn", "--groups", "-4"], "--groups -4"),
    (["--to", "gn", "--groups", "7"], "does not divide"),
    (["--to", "gn", "--groups", "100000"], "rewrote none"),
    (["--atol", "-1"], "--atol"),
    (["--atol", "nan"], "--atol"),
    (["--rtol", "nan"], "--rtol"),
    (["--input-shape", ""], "--input-shape"),
    (["--input-shape", "1,3,100000,100000"], "GiB"),
    (["--to", "gn", "--calib", "digits", "--recover-steps", "-1"], "--recover-steps"),
    (["--to", "gn", "--calib", "digits", "--lr", "0"], "--lr"),
    (["--to", "gn", "--calib", "digits", "--lr", "nan"], "--lr"),
    (["--to", "gn", "--calib", "digits", "--calib-batch", "0"], "--calib-batch"),
]


@pytest.mark.parametrize("args,needle", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_refused_up_front(tmp_path, args, needle):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "w.pt").write_bytes(b"weights")
    before = sorted(f.name for f in tmp_path.iterdir())
    p = run("convert", *[a.format(d=tmp_path) for a in args], cwd=tmp_path)
    assert_one_line_error(p, 2, needle)
    assert sorted(f.name for f in tmp_path.iterdir()) == before  # nothing written, nothing replaced
    assert (tmp_path / "w.pt").read_bytes() == b"weights"


def test_other_commands_validate_their_numbers(tmp_path):
    assert_one_line_error(run("compare", "--runs", "0"), 2, "--runs")
    assert_one_line_error(run("inspect", "--groups", "0"), 2, "--groups")
    assert_one_line_error(run("recover", str(tmp_path), "--calib", "digits", "--lr", "-1"), 2, "--lr")


def _bn(**set_: float) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        bn.running_var.copy_(torch.tensor([1.0, 0.25, 4.0]))
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
        for name, v in set_.items():
            tensor, i = name.rsplit("_", 1)
            getattr(bn, {"rm": "running_mean", "rv": "running_var", "w": "weight", "b": "bias"}[tensor])[int(i)] = v
    return bn


@pytest.mark.parametrize("bad,needle", [
    ({"rm_0": math.nan}, "running statistics contain NaN or Inf"), ({"rm_1": math.inf}, "running statistics contain NaN or Inf"),
    ({"rv_2": math.nan}, "running statistics contain NaN or Inf"), ({"rv_0": math.inf}, "running statistics contain NaN or Inf"),
    ({"rv_0": -math.inf}, "running statistics contain NaN or Inf"),
    ({"rv_1": -1e-7}, "running_var has negative entries"),  # σ² + ε still > 0: only the range test sees it
    ({"w_0": math.nan}, "affine weight or bias contains NaN or Inf"), ({"w_2": -math.inf}, "affine weight or bias contains NaN or Inf"),
    ({"b_1": math.inf}, "affine weight or bias contains NaN or Inf"),
    ({"w_0": 1e38, "rv_0": 0.0}, "overflows float32"),
])
def test_every_reason_a_batchnorm_has_no_exact_affine_is_found_behind_the_one_combined_check(bad, needle):
    """bn_params checks the common case with one combined test and looks for the reason only when it
    fails: each bad statistic or parameter must still be caught, with its own reason."""
    from normswap.rewriting.fold import bn_scale_shift
    from normswap.rewriting.sites import bn_params

    good = bn_params(_bn())
    s, t = bn_scale_shift(good.running_mean, good.running_var, good.weight, good.bias, good.eps)
    assert torch.equal(good.scale, s) and torch.equal(good.shift, t) and good.scale.dtype == torch.float64
    why = bn_params(_bn(**bad))
    assert isinstance(why, str) and needle in why, why
    zero = _bn(rv_1=0.0)
    zero.eps = 0.0
    assert "running_var + eps is 0 in 1 channel(s)" in bn_params(zero)
