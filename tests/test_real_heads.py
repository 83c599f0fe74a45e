"""Keeping the function on real heads: peaked sigmoid outputs, user decoders, sample counts and
intervals, noise-aware held-out decisions, bad calibration data refused as data."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import normswap
from normswap.keep import kinds
from normswap.errors import InputError, NonFiniteError
from normswap.keep.heldout import compare_losses
from normswap.models.pitch import BIN_CENTS, decode, pitch_cnn, targets, tones


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "normswap", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


# ----------------------------------------------------------------------------------- peaked outputs


def test_a_pitch_histogram_is_peaked_not_multilabel_and_a_multilabel_head_stays_multilabel():
    x, cents = tones(64, seed=7)
    name, why = kinds.detect_kind(pitch_cnn()(x).detach())
    assert name == "peaked" and "bump" in why
    assert kinds.detect_kind(targets(cents))[0] == "peaked"
    scattered = torch.zeros(64, 40)
    scattered[:, ::7] = 0.9  # several independent labels on at once, far apart
    assert kinds.detect_kind(scattered)[0] == "multilabel"
    assert kinds.detect_kind(torch.rand(64, 5))[0] == "multilabel"  # few labels: never peaked


def test_peaked_measures_read_the_peak_and_label_agreement_does_not():
    _, cents = tones(200, seed=3)
    ref, moved = targets(cents), targets(cents + 60.0)  # every peak moved by 3 bins
    m = kinds.Meter(kinds.outputs_for(ref))
    m.add(ref, moved)
    got = m.result()
    assert got.primary == "peak_within" and got["peak_within"] == 0.0
    assert got["peak_mad"] == pytest.approx(3.0, abs=0.05)
    ml = kinds.Meter(kinds.outputs_for(ref, "multilabel"))
    ml.add(ref, moved)
    assert ml.result()["label_agreement"] > 0.98  # what agreement at 0.5 would have said


def test_the_peaked_loss_sees_a_moved_peak_more_than_the_per_bin_loss():
    _, cents = tones(32, seed=5)
    t, s = targets(cents), targets(cents + 40.0)
    peaked, multi = kinds.get("peaked"), kinds.get("multilabel")
    assert float(peaked.loss(s, t, 1.0)) - float(multi.loss(s, t, 1.0)) > 1.0  # the rows' KL: the bump moved
    assert float(peaked.loss(t, t, 1.0)) == pytest.approx(0.0, abs=1e-5)
    per = peaked.sample_losses(s, t, 2.0)
    assert per.shape == (32,) and float(per.mean()) == pytest.approx(float(peaked.loss(s, t, 2.0)), rel=1e-6)


def test_every_class_axis_reports_top1_and_top1_within_one_bin():
    r = torch.zeros(4, 10)
    r[torch.arange(4), torch.tensor([1, 3, 5, 7])] = 1.0
    o = torch.zeros(4, 10)
    o[torch.arange(4), torch.tensor([1, 4, 5, 9])] = 1.0
    for kind in ("logits", "multilabel"):
        m = kinds.Meter(kinds.outputs_for(r, kind))
        m.add(r, o)
        got = m.result()
        assert got["top1_agreement"] == 0.5 and got["top1_within"] == 0.75 and got.n == 4


# ----------------------------------------------------------------------------------- decoders


def test_a_decoder_makes_agreement_in_its_units_the_primary_measure():
    _, cents = tones(100, seed=9)
    ref, out = targets(cents), targets(cents + 30.0)  # 30 cents: the same pitch within 50, not within 20
    outputs = kinds.outputs_for(ref).with_decoder(decode, 50.0, unit="cents", spec="pitch:decode")
    m = kinds.Meter(outputs)
    m.add(ref, out)
    got = m.result()
    assert got.primary == "decoded_within" and got.quality == 1.0
    assert got["decoded_mad"] == pytest.approx(30.0, abs=1.0)
    assert "decoded within ±50 cents" in got.describe() and "(n = 100)" in got.describe()
    strict = kinds.Meter(kinds.outputs_for(ref).with_decoder(decode, 20.0))
    strict.add(ref, out)
    assert strict.result().quality == 0.0
    # ground truth in the decoder's units
    assert outputs.kind.truth(out, cents) == 1.0 and outputs.kind.truth(out, cents - 100) == 0.0


def test_decoder_resolution_and_its_one_line_errors():
    assert kinds.resolve_decoder(None, None, pitch_cnn())[1] == 50.0  # the model's own, with its tolerance
    assert kinds.resolve_decoder(None, None, torch.nn.Linear(2, 2)) is None
    with pytest.raises(InputError, match="--decode-tol"):
        kinds.resolve_decoder(lambda o: o[:, 0], None)
    with pytest.raises(InputError, match="add --decode"):
        kinds.resolve_decoder(None, 3.0, torch.nn.Linear(2, 2))
    bad = kinds.Decoded(kinds.get("logits"), lambda o: o.sum(), 1.0, spec="m:f")
    with pytest.raises(InputError, match="returned"):
        bad.decode(torch.randn(4, 3))
    boom = kinds.Decoded(kinds.get("logits"), lambda o: 1 / 0, 1.0, spec="m:f")
    with pytest.raises(InputError, match="ZeroDivisionError"):
        boom.decode(torch.randn(4, 3))


# ----------------------------------------------------------------------------------- figures with their size


def test_wilson_interval_matches_the_formula_and_measures_carry_it():
    lo, hi = kinds.wilson(0.9, 50)
    assert (lo, hi) == pytest.approx((0.7864, 0.9565), abs=1e-4)  # the textbook 45/50 interval
    assert kinds.wilson(1.0, 450)[1] == pytest.approx(1.0) and kinds.wilson(1.0, 450)[0] == pytest.approx(0.99154, abs=1e-4)
    assert kinds.wilson(None, 10) is None and kinds.wilson(0.5, 0) is None
    r = torch.randn(51, 10)
    m = kinds.Meter(kinds.outputs_for(r, "logits"))
    m.add(r, r)
    got = m.result()
    assert got.n == 51 and got.interval() == pytest.approx(kinds.wilson(1.0, 51))
    assert got.to_dict()["samples"] == 51 and "top1_agreement" in got.to_dict()["intervals"]
    assert got.interval("rel_err") is None  # not a proportion


def test_ground_truth_figures_carry_their_interval_when_they_are_proportions():
    from rich.console import Console

    from normswap.keep.recover.report import FunctionReport, StageMetrics

    def report(kind: str) -> FunctionReport:
        outs = kinds.outputs_for(torch.rand(8, 360), kind)
        m = kinds.measures_like({k: 0.9 for k in outs.kind.measures} | {"rel_err": 0.1}, outs, n=200)
        return FunctionReport(target="gn", evaluated_on="held-out", original_accuracy=0.95, stages=[StageMetrics("naive", m, 0.8)],
                              truth_label=outs.kind.truth_label, truth_proportion=outs.kind.truth_proportion)

    peaked, reg = report("peaked"), report("regression")
    lo, hi = kinds.wilson(0.8, 200)
    assert peaked.to_dict()["stages"][0]["accuracy_interval"] == pytest.approx([lo, hi], abs=1e-6)
    assert peaked.to_dict()["original_accuracy_interval"] == pytest.approx(list(kinds.wilson(0.95, 200)), abs=1e-6)
    console = Console(width=220, record=True)
    console.print(peaked)
    assert f"0.8000 [{lo:.4f}–{hi:.4f}]" in console.export_text()
    assert reg.to_dict()["stages"][0]["accuracy_interval"] is None  # R² is not a proportion: no Wilson interval


def test_paired_loss_comparison_calls_a_difference_only_beyond_its_noise():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(200, generator=g, dtype=torch.float64)
    same = base + 1e-4 * torch.randn(200, generator=g, dtype=torch.float64)
    assert compare_losses(same, base).word == "within noise"
    better = base - 0.05
    c = compare_losses(better, base)
    assert c.lower and not c.higher and c.n == 200
    noisy = base + 0.01 * torch.randn(200, generator=g, dtype=torch.float64) * 50  # big scatter, tiny mean shift
    assert compare_losses(noisy, base).word == "within noise"
    with pytest.raises(ValueError):
        compare_losses(base[:10], base)


def test_recovery_keeps_the_last_weights_unless_an_earlier_evaluation_is_better_beyond_noise(tmp_path):
    from normswap.keep.calibrate import calibrate
    from normswap.models.digits import digits_resnet, load_digits
    from normswap.keep.recover import recover

    original = digits_resnet()
    x, _ = load_digits("test")
    data = normswap.calibration_batches("digits", samples=256, batch=64)
    conv = normswap.rewrite(original, "gn", (x[:2],))
    calibrate(original, conv, data)
    rep = recover(original, conv, data, steps=30, eval_every=10, heldout=x[:60], keep_best=True, progress=False)
    assert rep.heldout_samples == 60 and rep.keep_decision is None or "verdict" in rep.keep_decision
    if rep.best_step != 0:  # the kept weights against the start, paired over the same 60 samples
        assert rep.heldout_change is not None and rep.heldout_change["samples"] == 60
    if rep.best_step != rep.end_step:
        assert rep.keep_decision["verdict"] == "lower"
    json.dumps(rep.to_dict())


# ----------------------------------------------------------------------------------- bad data


def test_nan_and_inf_calibration_tensors_are_exit_2_naming_the_sample_and_nothing_is_written(tmp_path):
    x = torch.rand(64, 1, 8, 8)
    x[17, 0, 3, 3] = float("nan")
    torch.save(x, tmp_path / "nan.pt")
    y = torch.rand(64, 1, 8, 8)
    y[5, 0, 0, 0] = float("inf")
    torch.save(y, tmp_path / "inf.pt")
    for name, sample, what in (("nan.pt", 17, "NaN"), ("inf.pt", 5, "Inf")):
        r = _cli("convert", "--to", "gn", "--calib", str(tmp_path / name), "--save", str(tmp_path / "out"),
                 "--report", str(tmp_path / "r.json"), cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert f"sample {sample} holds {what}" in r.stderr and name in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "out").exists() and not (tmp_path / "r.json").exists()


def test_a_callable_yielding_the_wrong_shape_is_exit_2_with_both_shapes(tmp_path):
    (tmp_path / "bad.py").write_text(
        "import torch\n"
        "def channels():\n    return [torch.rand(16, 3, 8, 8)]\n"
        "def mixed():\n    return [torch.rand(16, 1, 8, 8), torch.rand(16, 1, 6, 6, 2)]\n"
        "def nan():\n    x = torch.rand(32, 1, 8, 8); x[20] = float('nan'); return [x[:16], x[16:]]\n")
    cases = {"channels": ("[3, 8, 8]", "[1, 8, 8]"), "mixed": ("[1, 6, 6, 2]", "[1, 8, 8]"), "nan": ("sample 20 holds NaN", "")}
    for fn, (a, b) in cases.items():
        r = _cli("convert", "--to", "gn", "--calib", f"{tmp_path / 'bad.py'}:{fn}", "--save", str(tmp_path / fn), cwd=tmp_path)
        assert r.returncode == 2, (fn, r.stderr)
        assert a in r.stderr and b in r.stderr and "unexpected" not in r.stderr
        assert not (tmp_path / fn).exists()


def test_a_stage_that_turns_the_model_non_finite_is_named_and_never_written():
    from normswap.keep.recover import check_finite_model

    m = torch.nn.Sequential(torch.nn.Linear(3, 3))
    check_finite_model(m, "calibration")
    with torch.no_grad():
        m[0].weight[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="recovery turned the model non-finite .*0.weight"):
        check_finite_model(m, "recovery")
    assert NonFiniteError.exit_code == 3


# ----------------------------------------------------------------------------------- defaults, end to end


def test_one_set_of_recovery_defaults():
    from normswap import defaults

    assert defaults.DEFAULT_LR == 3e-3 and defaults.DEFAULT_RECOVER_BATCH == 256


@pytest.mark.slow
def test_the_pitch_model_through_the_pipeline_is_measured_in_cents_never_by_label_agreement():
    res = normswap.run_conversion("normswap.models.pitch:pitch_cnn", to="ln", calib="normswap.models.pitch:calib",
                                  calib_samples=512, heldout="normswap.models.pitch:heldout")
    assert res, res.verdict.line
    line = res.verdict.line
    assert "decoded within ±50 cents" in line and "label agreement" not in line and "(n = 1024)" in line
    cal = res.kept.stage("calibrated")
    assert cal.agreement.primary == "decoded_within" and cal.accuracy is not None
    assert res.kept.truth_label == "accuracy within ±50 cents"
    assert res.kept.stage("naive").agreement.quality <= cal.agreement.quality + 1e-9
    assert "%" not in line  # every proportion in the verdict carries its interval, none a bare percentage
    stages = res.kept.to_dict()["stages"]
    assert stages[1]["accuracy_interval"] == pytest.approx(list(kinds.wilson(cal.accuracy, 1024)), abs=1e-6)
    assert math.isfinite(BIN_CENTS[0].item())
    # the calibration summary names the decoder's measure as the user reads it, never an internal key
    summary = res.kept.calibration.summary()
    assert "held-out decoded within ±50 cents" in summary and "decoded_within" not in summary, summary


def test_convert_recovery_that_raises_the_heldout_loss_keeps_the_calibrated_weights_and_says_so():
    # lr 0.05 knocks the calibrated digits model off its fit: `convert --recover-steps` must not keep that
    res = normswap.run_conversion(to="gn", calib="digits", calib_samples=256, recover_steps=20, lr=0.05)
    cal, rec = res.kept.stage("calibrated"), res.kept.stage("recovered")
    assert res.kept.recovery.best_step == 0 and rec.agreement.quality == cal.agreement.quality
    assert rec.agreement["rel_err"] == pytest.approx(cal.agreement["rel_err"])
    assert "recovery raised the held-out loss, so its starting weights were kept" in res.verdict.line
    assert "kept the weights of step 0" in " ".join(res.kept.recovery.notes)
