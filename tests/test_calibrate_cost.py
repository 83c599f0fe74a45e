"""Issue 21: the calibration stage's cost is its wall time, split into parts; the held-out decisions
rest on a paired comparison with its noise and sample count; the advice reuses the fit pass's taps;
rewrite(verify=False) runs the original only where a site needs shapes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import normswap
from normswap.keep.calibrate import calibrate
from normswap.keep.calibrate.advice import AdviceTap
from normswap.keep.calibrate.never_worse import per_sample_loss
from normswap.keep.calibrate.paired import MARGIN, Z, from_sums, paired, paired_sums
from normswap.errors import InputError
from normswap.keep.kinds import outputs_for
from normswap.models.digits import load_digits

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------- the paired comparison


def test_paired_difference_mean_se_and_noise():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([0.5, 1.5, 3.5, 3.0])
    p = paired(a, b)
    d = a.double() - b.double()
    assert p.n == 4 and p.diff == pytest.approx(float(d.mean()))
    assert p.se == pytest.approx(float(d.std(unbiased=True)) / 2)
    assert p.noise == pytest.approx(max(Z * p.se, MARGIN * float(b.double().mean())))
    assert not p.worse and not p.better  # +0.5 ± 2·0.35: within noise
    assert paired(a + 10, a).worse and paired(a, a + 10).better  # a constant shift: zero spread, beyond noise
    assert not paired(a, a).worse and not paired(a, a).better  # identical: no difference at all
    # sums add over shards: the same figure as one comparison over all samples
    s = paired_sums(a[:2], b[:2]) + paired_sums(a[2:], b[2:])
    assert from_sums(s) == p
    with pytest.raises(ValueError):
        paired(a, b[:3])


def test_paired_noise_sees_a_small_shift_that_two_means_would_not():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(200, generator=g) * 10  # a large spread between samples, shared by both
    p = paired(base + 0.05, base + 0.01 * torch.randn(200, generator=g))
    assert p.worse  # 0.05 with a paired se of ~0.0007
    assert p.diff < base.std() / math.sqrt(200)  # smaller than the unpaired standard error


@pytest.mark.parametrize("kind,make", [
    ("logits", lambda g: torch.randn(6, 10, generator=g)),
    ("probabilities", lambda g: torch.randn(6, 10, generator=g).softmax(1)),
    ("multilabel", lambda g: torch.rand(6, 3, generator=g)),
    ("peaked", lambda g: torch.rand(6, 20, generator=g)),
    ("regression", lambda g: torch.randn(6, 4, generator=g)),
    ("dense", lambda g: torch.randn(6, 3, 4, 4, generator=g)),
])
def test_per_sample_losses_average_to_the_kinds_batch_loss(kind, make):
    g = torch.Generator().manual_seed(1)
    s, t = make(g), make(g)
    outputs = outputs_for(t, kind)
    per = per_sample_loss(outputs, s, t)
    assert per.shape == (6,)
    assert float(per.mean()) == pytest.approx(float(outputs.loss(s, t, 1.0)), rel=1e-5)
    if kind != "regression":  # (regression's loss normalizes by the batch's variance)
        assert float(per[2]) == pytest.approx(float(outputs.loss(s[2:3], t[2:3], 1.0)), rel=1e-5, abs=1e-7)


# ----------------------------------------------------------------------------------- the stage's cost


def test_the_reported_cost_is_the_stage_wall_time_split_into_parts(original):
    from normswap.keep.recover import keep_function

    data = normswap.calibration_batches("digits", samples=160, batch=32)
    conv = normswap.rewrite(original, "gn", (torch.zeros(2, 1, 8, 8),))
    rep = keep_function(original, conv, data, progress=False)
    cal = rep.calibration
    assert set(cal.parts) == {"fit pass", "readout", "held-out checks", "advice"}
    assert sum(cal.parts.values()) == pytest.approx(cal.seconds, rel=1e-6)
    assert cal.seconds == pytest.approx(rep.seconds["calibrate"], rel=0.05)  # the stage, as the user runs it
    assert cal.cost_ratio == pytest.approx(cal.seconds / cal.forward_seconds)
    assert sum(cal.part_ratios().values()) == pytest.approx(cal.cost_ratio, rel=1e-6)
    d = cal.to_dict()
    assert set(d["parts"]) == set(cal.parts) and all({"seconds", "ratio"} == set(v) for v in d["parts"].values())
    text = cal.summary()
    assert f"over those {cal.samples} samples" in text and "held-out checks" in text and "advice" in text


def test_each_heldout_decision_carries_its_noise_and_sample_count(original):
    x, y = load_digits("train")
    xt, _ = load_digits("test")
    conv = normswap.rewrite(original, "gn-ws", (x[:2],))
    rep = calibrate(original, conv, [x[y == 3][:4]], heldout=[xt], heldout_name="digits test")
    h = rep.heldout
    assert h["samples"] == len(xt) and h["passes"] in (2, 3)
    for d in h["trace"]:
        assert d["samples"] == len(xt) and d["noise"] >= 2 * d["se"] >= 0
        assert d["diff"] == pytest.approx(d["fitted"] - d["previous"], rel=1e-4, abs=1e-6)
        assert d["beyond_noise"] == (abs(d["diff"]) > d["noise"])
    screened = {s["site"]: s for s in h["screen"]}
    assert set(screened) == {s.site for s in rep.sites if s.calls}
    assert all(s["worse"] == (s["diff"] > s["noise"]) and s["n"] == len(xt) for s in screened.values())
    # a site screened worse is one the revert decision named
    named = [n for d in h["trace"] for n in d.get("sites", [])]
    assert named == [n for n, s in screened.items() if s["worse"]]


def test_check_false_keeps_every_fit_and_still_measures_both(original):
    x, _ = load_digits("train")
    xt, _ = load_digits("test")
    conv = normswap.rewrite(original, "ln", (x[:2],))
    rep = calibrate(original, conv, [x[:64]], heldout=[xt[:100]], check=False)
    h = rep.heldout
    assert h["checked"] is False and h["loss_after"] == h["loss_fitted"] and "trace" not in h
    assert not rep.kept_previous_sites


# ----------------------------------------------------------------------------------- the advice


def test_advice_keeps_few_samples_within_its_memory_budget(monkeypatch):
    import importlib

    advice = importlib.import_module("normswap.keep.calibrate.advice")  # (normswap.calibrate is also a function)

    one = 2 * 8 * 4 * 4 * 4  # x and y of one [8, 4, 4] float32 sample
    monkeypatch.setattr(advice, "ADVICE_BYTES", 3 * one)  # 3 samples over 2 GroupNorm sites: 1 each
    mods = {"a": nn.GroupNorm(2, 8), "b": nn.GroupNorm(4, 8), "c": nn.LayerNorm(8)}
    tap = AdviceTap(mods)
    assert set(tap.mods) == {"a", "b"} and not tap.wants("c")
    x = torch.randn(5, 8, 4, 4)
    tap.add("a", x, x)
    assert sum(len(t) for t in tap.xs["a"]) == 1 and not tap.wants("a") and tap.wants("b")


# ----------------------------------------------------------------------------------- the fold through rewrite


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.body(x)


def test_rewrite_without_verify_does_not_run_the_original():
    m = _Counting().eval()
    x = torch.randn(1, 3, 8, 8)
    conv = normswap.rewrite(m, "fold", (x,), verify=False)
    assert m.calls == 0 and conv.exact and conv.verification is None
    normswap.rewrite(m, "fold", (x,))  # verify: once for the reference
    assert m.calls == 1
    torch.testing.assert_close(conv.model(x), m(x))


def test_bad_example_inputs_are_an_input_error_up_front():
    from normswap.rewriting.convert import check_example_inputs
    from normswap.pipeline.conversion import run_conversion

    m = _Counting().eval()
    with pytest.raises(InputError, match="pass the shape it expects"):
        check_example_inputs(m, (torch.randn(1, 5, 8, 8),))
    with pytest.raises(InputError, match="pass the shape it expects"):
        run_conversion(model=m, to="fold", input_shape=(1, 5, 8, 8))


# ----------------------------------------------------------------------------------- the shared held-out pass


@pytest.mark.parametrize("to", ["gn", "gn-ws"])
def test_the_checks_from_the_naive_measures_record_decide_as_their_own_passes_would(original, to):
    """keep_function hands calibrate its naive measure's pass over the held-out data (the original's outputs,
    its site outputs, the naive swap's outputs): the checks run neither model again for them, and every
    figure and decision is the one calibrate reaches with its own passes."""
    from normswap.keep.calibrate.never_worse import HeldoutRecord
    from normswap.keep.heldout import split_heldout
    from normswap.keep.recover import keep_function

    data = normswap.calibration_batches("digits", samples=160, batch=32)
    conv = normswap.rewrite(original, to, (torch.zeros(2, 1, 8, 8),))
    rep = keep_function(original, conv, data, progress=False)
    shared = rep.calibration.heldout
    assert "shared" in shared and "site outputs" in shared["shared"]
    split = split_heldout(data)
    own = calibrate(original, normswap.rewrite(original, to, (torch.zeros(2, 1, 8, 8),)), split.calib, heldout=split.heldout)
    h = own.heldout
    assert shared["passes"] == h["passes"] - 1  # the naive pass came with the record
    for k in ("samples", "loss_naive", "loss_fitted", "loss_after", "kept_previous"):
        assert shared[k] == pytest.approx(h[k], rel=1e-5, abs=1e-7), k
    assert [d["kept"] for d in shared["trace"]] == [d["kept"] for d in h["trace"]]
    assert [s["worse"] for s in shared["screen"]] == [s["worse"] for s in h["screen"]]
    # over the memory budget: only the model outputs are kept, the original runs again for its site outputs
    rec = HeldoutRecord(budget=0)
    from normswap.keep.calibrate import agreement_and_drift

    conv2 = normswap.rewrite(original, to, (torch.zeros(2, 1, 8, 8),))
    agreement_and_drift(original, conv2.model, split.heldout, conversion=conv2, record=rec)
    assert rec.complete and rec.sites is None and len(rec.refs) == len(rec.batches) > 0
    r2 = calibrate(original, conv2, split.calib, heldout=split.heldout, heldout_record=rec)
    assert r2.heldout["loss_after"] == pytest.approx(h["loss_after"], rel=1e-5, abs=1e-7)
    assert "site outputs" not in r2.heldout["shared"]
