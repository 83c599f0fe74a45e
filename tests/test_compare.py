"""Comparing targets (normswap.compare), the agreement metric, batch independence, the `normswap
compare` command, and DP training with Opacus on a swapped model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import normswap
from normswap.keep.calibrate import agreement
from normswap.checks import batch_independence
from normswap.compare import compare_targets
from normswap.load.data import calibration_batches
from normswap.errors import InputError
from normswap.models.digits import load_digits


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


def test_agreement_metric(original):
    x, _ = load_digits("test")
    same = agreement(original, original, x)
    assert same == {"top1_agreement": 1.0, "top1_within": 1.0, "rel_err": 0.0} and same.n == len(x)

    class Flipped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).flip(1)

    flipped = agreement(original, Flipped(original), [x[:100], x[100:]])
    assert flipped["top1_agreement"] < 0.2 and flipped["rel_err"] > 0.5
    assert not original.training


def test_compare_targets(original):
    x, _ = load_digits("test")
    calib = calibration_batches("digits", samples=256, batch=32)
    rep = compare_targets(original, ["fold", "ln", "frozen", "bin"], (x[:1],), calib=calib, heldout=[x],
                          heldout_name="digits test", runs=5, rounds=2, model_name="digits")
    rows = {r.target: r for r in rep.rows}
    assert list(rows) == ["fold", "ln", "frozen", "bin"] and all(r.status == "ok" for r in rows.values())
    assert rows["fold"].latency_vs_fold == 1.0 and all(r.latency_ms > 0 for r in rows.values())
    assert rows["fold"].params < rows["ln"].params  # folding removes the BN parameters
    assert rows["ln"].batch_independent and rows["frozen"].batch_independent and not rows["bin"].batch_independent
    assert rows["frozen"].exact_promised and rows["frozen"].naive_rel_err < 1e-5 and rows["frozen"].agreement == 1.0
    assert not rows["ln"].exact_promised and rows["ln"].naive_rel_err > 0.5
    assert rows["ln"].calibrated and rows["ln"].agreement >= 0.99 and 0 < rows["ln"].drift_mean < rows["ln"].drift_max
    assert not rows["bin"].calibrated  # exact at ρ = 1: nothing to calibrate
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["targets"][1]["target"] == "ln"
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(rep)
    text = console.export_text()
    assert "ORT" in text and "latency" in text and "recommended: " in text
    assert d["recommendation"].startswith("recommended: ") and d["eval_data"] == "held-out"
    with pytest.raises(InputError, match="unknown target"):
        compare_targets(original, ["gn", "batchnorm9"], (x[:1],), latency=False)


def test_compare_command_json(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    r = CliRunner().invoke(app, ["compare", "--targets", "fold,gn,in", "--calib", "digits", "--calib-samples", "64",
                                 "--no-latency", "--json", "--report", str(tmp_path / "cmp.json")])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [t["target"] for t in out["targets"]] == ["fold", "gn", "in"]
    assert out["evaluated_on"].startswith("the digits test split")
    in_row = out["targets"][2]
    assert in_row["refused"] == 1 and in_row["batch_independent"] is False  # the [N, C] head BN stays
    assert json.loads((tmp_path / "cmp.json").read_text()) == out
    bad = CliRunner().invoke(app, ["compare", "--targets", "fold,nope", "--no-latency"])
    assert bad.exit_code == 2 and "unknown target" in bad.output


# ----------------------------------------------------------------------------------- Opacus


@pytest.mark.parametrize("to", ["gn", "gn-ws", "ln", "ln-channels"])
def test_opacus_accepts_batch_independent_swaps(original, to):
    validators = pytest.importorskip("opacus.validators")
    model = normswap.convert(original, to, (torch.zeros(2, 1, 8, 8),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert validators.ModuleValidator.validate(model.train(), strict=True) == []
    assert batch_independence(model, (1, 1, 8, 8)).independent


def test_opacus_validator_is_not_proof_of_batch_independence(original):
    """Opacus only knows its own layer list: it accepts Switchable Norm and weight norm + mean-only BN,
    which use batch statistics in training. normswap's batch-independence probe catches them; 'in'
    leaves the [N, C] head BN (instance norm needs spatial dims), which Opacus does reject."""
    validators = pytest.importorskip("opacus.validators")
    x = load_digits("test")[0][:8]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for to in ("sn", "wn"):
            model = normswap.convert(original, to, (x[:2],))
            assert validators.ModuleValidator.validate(model.train(), strict=False) == []
            assert not batch_independence(model, (1, 1, 8, 8)).independent, to
        errors = validators.ModuleValidator.validate(normswap.convert(original, "in", (x[:2],)).train(), strict=False)
    assert errors and "BatchNorm" in str(errors[0])


def test_dp_training_example_runs():
    pytest.importorskip("opacus")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "dp_train_opacus.py"
    spec = importlib.util.spec_from_file_location("dp_train_opacus", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--steps", "3", "--calib-samples", "128"])
    assert out["ok"] and 0 < out["epsilon"] < 10 and out["steps"] == 3
    assert out["accuracy"] > 0.8  # a few DP-SGD steps from the calibrated swap, not from scratch
    refused = mod.main(["--to", "sn", "--steps", "1"])
    assert not refused["ok"] and not refused["independent"]


def test_recommendation_uses_the_kinds_measure_within_the_latency_budget():
    """The quality column is the output kind's measure; the recommendation is the best one within the
    stated budget, and names a better target over budget with the budget that would admit it."""
    from normswap.compare import CompareReport, CompareRow

    def row(t, q, lat):
        return CompareRow(target=t, agreement=q, rel_err=1 - q, latency_vs_fold=lat, batch_independent=True,
                          exact_promised=False, calibrated=True)

    rep = CompareReport(model="m", input_shape=[1, 2], evaluated_on="20% held out", measure="R²",
                        rows=[CompareRow(target="fold", latency_vs_fold=1.0), row("gn", 0.90, 1.4), row("ln", 0.97, 2.3), row("sn", 0.80, 1.2)])
    line = rep.recommendation()
    assert line.startswith("recommended: gn — best R² 0.9000 (calibrated, held-out) among batch-independent targets "
                           "within the 2.0× fold latency budget (1.40×)")
    assert "ln scores higher (0.9700) but costs 2.30× (over budget: --latency-budget 2.3 admits it)" in line
    rep.latency_budget = 2.5
    assert rep.recommended().target == "ln"


def test_compare_on_a_sigmoid_model_measures_label_agreement_held_out():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 3), nn.Sigmoid()).eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.2, 0.2)
        m[1].running_var.uniform_(0.5, 2)
    x, _ = load_digits("train")
    calib = calibration_batches(x[:200], batch=50)
    rep = compare_targets(m, ["ln", "gn"], (x[:1],), calib=calib, latency=False, groups=2)
    assert rep.measure == "label agreement @0.5" and rep.evaluated_on.startswith("20% of the calibration data held out")
    assert all(set(r.measures) == {"label_agreement", "mae", "top1_agreement", "top1_within"} and r.agreement == r.measures["label_agreement"] for r in rep.rows)
    assert "best label agreement @0.5" in rep.recommendation()
