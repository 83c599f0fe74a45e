"""The batch-size sweep of `compare` (normswap.compare / normswap.checks.batch_dependence), on a model
whose batch dependence is known by construction: a lone BatchNorm1d on [N, C] features, whose
training-mode output is (x − batch mean) / sqrt(batch var + eps) · γ + β (computed here by hand), and its
GroupNorm swap, whose training-mode output of a sample does not depend on the batch at all."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from normswap.checks import batch_dependence
from normswap.compare import DEFAULT_BATCH_SIZES, batch_sizes_from, compare_targets
from normswap.errors import InputError

pytestmark = pytest.mark.usefixtures("single_thread")

N, C = 32, 6
SIZES = [1, 2, 4, 8]


def lone_bn() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm1d(C)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(C, generator=g))
        bn.running_mean.copy_(torch.randn(C, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    return nn.Sequential(bn).eval()


def inputs() -> torch.Tensor:
    return torch.randn(N, C, generator=torch.Generator().manual_seed(1)) * 1.5 + 0.2


def expected_drift(model: nn.Module, x: torch.Tensor, b: int) -> float:
    """Mean over samples of ‖y_train − y_eval‖/‖y_eval‖ for consecutive batches of b, by hand, in float64."""
    bn = model[0]
    x = x.double()
    w, beta = bn.weight.detach().double(), bn.bias.detach().double()
    y_eval = (x - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps) * w + beta
    ys = []
    for i in range(0, len(x), b):
        xb = x[i:i + b]
        ys.append((xb - xb.mean(0)) / torch.sqrt(xb.var(0, unbiased=False) + bn.eps) * w + beta)
    y = torch.cat(ys)
    return float(((y - y_eval).norm(dim=1) / y_eval.norm(dim=1)).mean())


@pytest.fixture(scope="module")
def report():
    x = inputs()
    return compare_targets(lone_bn(), ["gn"], (x[:1],), heldout=[x], heldout_name="the test inputs", groups=2,
                           latency=False, batch_sizes=SIZES, batch_samples=N, model_name="lone BN")


def test_bn_drift_matches_the_formula_and_batch_1_is_undefined(report):
    sweep = report.batch_sweep
    assert sweep.batch_sizes == SIZES and sweep.samples == N
    bn = sweep.row("original")
    p1 = bn.points[0]
    assert p1.batch == 1 and not p1.defined and "more than 1 value per channel" in p1.reason
    assert p1.drift_eval_mean is None and p1.top1_agreement is None
    model, x = lone_bn(), inputs()
    for p in bn.points[1:]:
        assert p.defined
        assert p.drift_eval_mean == pytest.approx(expected_drift(model, x, p.batch), rel=1e-5)
        assert p.drift_alone_mean is None  # no output alone to compare with
        assert p.drift_eval_max >= p.drift_eval_mean > 0.05
    # more samples per batch: batch statistics closer to the running ones here
    drifts = [p.drift_eval_mean for p in bn.points[1:]]
    assert drifts == sorted(drifts, reverse=True)


def test_gn_is_exactly_batch_independent(report):
    gn = report.batch_sweep.row("gn")
    assert [p.batch for p in gn.points] == SIZES and all(p.defined for p in gn.points)
    for p in gn.points:
        assert p.drift_eval_mean == 0 and p.drift_eval_max == 0  # GroupNorm keeps no running statistics
        assert p.drift_alone_mean == 0 and p.drift_alone_max == 0
    agreements = {p.top1_agreement for p in gn.points}
    assert len(agreements) == 1 and 0 <= agreements.pop() <= 1
    assert report.rows[0].batch_independent


def test_sweep_renders_in_80_columns_and_serializes(report, tmp_path):
    from rich.console import Console

    console = Console(record=True, width=80)
    console.print(report)
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "undef." in text and "b=8" in text and "original (BN)" in text
    d = json.loads(json.dumps(report.to_dict()))
    rows = {r["target"]: r for r in d["batch_sweep"]["rows"]}
    assert rows["original"]["points"][0]["defined"] is False and rows["gn"]["points"][3]["drift_eval_mean"] == 0
    png = report.batch_sweep.save_plot(tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report.batch_sweep.to_dict()["plot"] == str(png)
    from PIL import Image

    assert Image.open(png).size == (1200, 560)


def test_batch_dependence_directly():
    x = inputs()
    model = lone_bn()
    pts = batch_dependence(model, x, [2, 32], original=model)
    assert pts[0].drift_eval_mean == pytest.approx(expected_drift(model, x, 2), rel=1e-5)
    assert pts[1].drift_eval_mean == pytest.approx(expected_drift(model, x, 32), rel=1e-5)
    assert not model.training  # the model was not changed: a training copy ran
    with pytest.raises(ValueError, match="at least"):
        batch_dependence(model, x[:4], [8])


def test_batch_sizes_parsing():
    assert batch_sizes_from("default") == list(DEFAULT_BATCH_SIZES)
    assert batch_sizes_from("8, 1,2,2") == [1, 2, 8] and batch_sizes_from([4, 1]) == [1, 4]
    for bad in ("0,x", "0,2", "", "1.5"):
        with pytest.raises(InputError, match="--batch-sizes"):
            batch_sizes_from(bad)
    with pytest.raises(InputError):
        compare_targets(lone_bn(), ["gn"], (inputs()[:1],), latency=False, batch_sizes=[1, 2], batch_samples=0)


def test_compare_command_batch_sizes(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    rep = tmp_path / "cmp.json"
    r = CliRunner().invoke(app, ["compare", "--targets", "gn", "--no-latency", "--batch-sizes", "1,4",
                                 "--batch-samples", "16", "--json", "--report", str(rep)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    sweep = out["batch_sweep"]
    assert sweep["batch_sizes"] == [1, 4] and [row["target"] for row in sweep["rows"]] == ["original", "gn"]
    assert sweep["rows"][0]["points"][0]["defined"] is False  # the digits head is a BatchNorm1d on [N, 128]
    assert sweep["plot"] == str(tmp_path / "cmp.batch.png") and (tmp_path / "cmp.batch.png").is_file()
    assert json.loads(rep.read_text()) == out
    for args in (["--batch-sizes", "0,x"], ["--batch-sizes", "2,-1"], ["--plot", str(tmp_path / "p.png")]):
        bad = CliRunner().invoke(app, ["compare", "--targets", "gn", "--no-latency", *args])
        assert bad.exit_code == 2, bad.output
        assert "--batch-sizes" in bad.output and len(bad.output.strip().splitlines()) == 1


def test_small_batch_example_runs(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "small_batch.py"
    spec = importlib.util.spec_from_file_location("small_batch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    n = torch.get_num_threads()
    try:
        out = mod.main(["--targets", "bn,gn", "--batch-sizes", "1,4", "--samples", "32", "--seeds", "1",
                        "--plot", str(tmp_path / "sb.png")])
    finally:
        torch.set_num_threads(n)
    bn, gn = out["targets"]["bn"], out["targets"]["gn"]
    assert bn[1]["mean"] is None and bn[1]["runs"] == [None]  # BatchNorm refuses to train at batch 1
    assert 0 < bn[4]["mean"] <= 1 and 0 < gn[1]["mean"] <= 1 and 0 < gn[4]["mean"] <= 1
    assert (tmp_path / "sb.png").is_file()
