"""The terminal tables fit 80 columns with every value whole: parity, compare, sites, recovery."""

from __future__ import annotations

import io
import json
from contextlib import contextmanager

import numpy as np
import pytest
from rich.cells import cell_len
from rich.console import Console

from normswap.compare import CompareReport, CompareRow, compare_targets
from normswap.parity import (
    PAIR_ORIGINAL_ORT,
    PAIR_ORIGINAL_REWRITTEN,
    PAIR_REWRITTEN_ORT,
    OutputStats,
    ParityResult,
    compare,
)
from normswap.keep.recover import FunctionReport, RecoveryReport, StageMetrics
from normswap.report import sites_table

NAN_NOTE = "the original model itself outputs NaN (4 of 4 values) on these inputs: fix the model or its weights"


def render(obj, width: int = 80) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(obj)
    return console.export_text()


def flat(text: str) -> str:
    """The text with line breaks and runs of spaces as one space (footnotes wrap at the console width)."""
    return " ".join(text.split())


def assert_fits(text: str, width: int = 80) -> None:
    assert "…" not in text, text
    assert all(cell_len(line.rstrip()) <= width for line in text.splitlines()), text


def stat(pair, batch, max_abs, scale, *, cosine=1.0, top1=1.0, shape=(3, 10), passed=True, note=None, vacuous=False):
    return OutputStats(pair=pair, output="logits", batch=batch, shape=shape, max_abs=max_abs, scale=scale,
                       max_rel=max_abs / scale if scale else max_abs, cosine=cosine, top1=top1, passed=passed,
                       tolerance=1e-5 + 1e-4 * scale, note=note, vacuous=vacuous)


def parity_result() -> ParityResult:
    nan = np.full((2, 2), np.nan, np.float32)
    (failing,) = compare(nan, nan, pair=PAIR_ORIGINAL_REWRITTEN, batch="samples", atol=1e-5, rtol=1e-4)
    (empty,) = compare(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32), pair=PAIR_ORIGINAL_ORT,
                       batch="samples", atol=1e-5, rtol=1e-4)
    stats = [
        stat(PAIR_ORIGINAL_REWRITTEN, 1, 2.13e-7, 11.62),
        stat(PAIR_ORIGINAL_ORT, 1, 1.6e-6, 11.62),
        stat(PAIR_REWRITTEN_ORT, 1, 1.55e-6, 11.62),
        stat(PAIR_ORIGINAL_REWRITTEN, 3, 3.8e-7, 12.4, top1=2 / 3),
        failing,
        empty,
    ]
    assert failing.note == NAN_NOTE and empty.vacuous
    return ParityResult(stats, 1e-5, 1e-4)


def test_parity_table_fits_80_columns_whole():
    res = parity_result()
    text = render(res)
    assert_fits(text)
    for value in ("orig↔new", "orig↔ort", "new↔ort", "2.1e-07", "1.6e-06", "1.5e-06", "3.8e-07", "100.0%", "66.7%",
                  "samples", "3×10", "FAIL (1)", "empty (2)", "inf"):
        assert value in text, value
    assert "original↔" not in text.split("parity FAILED")[0]  # the table uses the short names
    assert f"(1) {NAN_NOTE}" in flat(text) and "(2) empty output: nothing compared" in flat(text)
    assert "orig = original model" in flat(text)
    assert "not shown at 80 columns: cosine (1.0000000 everywhere)" in flat(text)
    assert "parity FAILED: 5/6 comparisons" in text
    # the JSON keeps the full pair names
    pairs = {s["pair"] for s in json.loads(res.to_json())["stats"]}
    assert pairs == {PAIR_ORIGINAL_REWRITTEN, PAIR_ORIGINAL_ORT, PAIR_REWRITTEN_ORT}


def test_parity_table_shows_more_when_wide():
    text = render(parity_result(), width=160)
    assert_fits(text, 160)
    assert "cosine" in text and "1.0000000" in text and "scale" in text and "1.2e+01" in text
    assert "not shown" not in text


def test_parity_table_keeps_a_cosine_that_says_something():
    res = parity_result()
    res.stats[3].cosine = 0.9999871
    text = render(res)
    assert_fits(text)
    assert "0.9999871" in text


def compare_report(*, with_frozen: bool = True) -> CompareReport:
    R = CompareRow
    rows = [
        R("fold", swapped=20, params=11_689_512, latency_ms=3.1, latency_vs_fold=1.0, agreement=1.0, rel_err=1.9e-7,
          batch_independent=True, batch_rel_diff=0.0, exact_promised=True, naive_rel_err=1.9e-7),
        R("gn", swapped=20, params=11_699_112, latency_ms=5.2, latency_vs_fold=1.68, agreement=0.9844, rel_err=0.118,
          drift_mean=0.052, drift_max=0.301, batch_independent=True, batch_rel_diff=1.2e-7, exact_promised=False,
          naive_rel_err=0.98, calibrated=True),
        R("ln", swapped=20, params=11_699_112, latency_ms=5.0, latency_vs_fold=1.61, agreement=0.9956, rel_err=0.0612,
          drift_mean=0.031, drift_max=0.154, batch_independent=True, batch_rel_diff=9.5e-8, exact_promised=False,
          naive_rel_err=0.87, calibrated=True),
        R("ln-channels", swapped=20, params=11_699_112, latency_ms=7.4, latency_vs_fold=2.39, agreement=0.9981,
          rel_err=0.032, drift_mean=0.021, drift_max=0.098, batch_independent=True, batch_rel_diff=1.1e-7,
          exact_promised=False, naive_rel_err=0.91, calibrated=True),
        R("in", swapped=19, refused=1, params=11_699_112, latency_ms=5.5, latency_vs_fold=1.77, agreement=0.9023,
          rel_err=0.402, drift_mean=0.112, drift_max=0.633, batch_independent=False, batch_rel_diff=0.318,
          exact_promised=False, naive_rel_err=1.12, calibrated=True),
        R("sn", status="failed", note="SwitchNorm needs a 4-D input at 'fc' but the site sees [N, C]; choose another "
                                      "target or skip the site"),
        R("bin", swapped=20, params=11_699_132, latency_ms=6.0, latency_vs_fold=1.94, agreement=1.0, rel_err=3.1e-7,
          drift_mean=0.0, drift_max=0.0, batch_independent=False, batch_rel_diff=0.207, exact_promised=True,
          naive_rel_err=3.1e-7),
    ]
    if with_frozen:
        rows.append(R("frozen", swapped=20, params=11_689_512, latency_ms=4.1, latency_vs_fold=1.32, agreement=1.0,
                      rel_err=2.6e-7, drift_mean=0.0, drift_max=1e-7, batch_independent=True, batch_rel_diff=0.0,
                      exact_promised=True, naive_rel_err=2.6e-7))
    return CompareReport(model="torchvision:resnet18", input_shape=[1, 3, 224, 224],
                         evaluated_on="the imagenette val split (512 images, held out)", rows=rows,
                         notes=["onnxruntime CPU, batch 1, 1 thread(s), best of 5 rounds × 20 runs; fold = 3.104 ms"])


def test_compare_table_fits_80_columns_whole():
    rep = compare_report(with_frozen=False)
    text = render(rep)
    assert_fits(text)
    for value in ("ln-channels", "1.00×", "1.61×", "2.39×", "0.9956*", "0.9023*", "1.0000", "6.1e-02", "1.9e-07",
                  "no 3.2e-01", "19 (1)", "failed (2)"):
        assert value in text, value
    f = flat(text)
    assert "(1) in: 1 site(s) refused" in f
    assert "(2) sn failed: SwitchNorm needs a 4-D input at 'fc' but the site sees [N, C]" in f
    rec = ("recommended: ln — best top-1 agreement 0.9956 (calibrated, held-out) among batch-independent targets "
           "within the 2.0× fold latency budget (1.61×); ln-channels scores higher (0.9981) but costs 2.39× "
           "(over budget: --latency-budget 2.4 admits it)")
    assert rec in f
    assert rep.recommended().target == "ln" and rep.to_dict()["recommendation"] == rec
    wide = render(rep, width=160)
    assert_fits(wide, 160)
    assert "11.69M" in wide and "11.70M" in wide and "0.031/0.154" in wide and "8.7e-01" in wide


def test_compare_recommendation_rules():
    rep = compare_report()
    # frozen is exact and batch-independent (agreement 1.0) but does not renormalise while training:
    # the recommendation is among the function-changing norms
    assert rep.recommended().target == "ln"
    rep = compare_report(with_frozen=False)
    rep.latency_budget = 1.5
    assert rep.recommended() is None
    assert rep.recommendation().startswith("no recommendation: every batch-independent target is over the 1.5×")
    for r in rep.rows:
        r.latency_ms = r.latency_vs_fold = None
    assert rep.recommended().target == "ln-channels"
    assert rep.recommendation().endswith("among batch-independent targets (latency not measured)")
    for r in rep.rows:
        r.agreement = None  # not a classifier: the lowest output relative error decides
        if r.target == "gn":
            r.rel_err = 0.01
    rep.eval_data = "calibration"
    assert rep.recommendation().startswith("recommended: gn — lowest output rel err 0.01 (calibrated, on the calibration data)")
    for r in rep.rows:
        r.batch_independent = r.target == "fold"
    assert rep.recommended() is None and "is batch-independent" in rep.recommendation()
    assert "no recommendation" in render(rep)


def test_sites_table_fits_80_columns_whole():
    reason = ("called with inputs of different ranks [2, 4]: a shared BatchNorm module cannot be swapped for one "
              "target at every call")
    rows = [
        {"site": "layer4.1.downsample.1", "type": "BatchNorm2d", "producer": "layer4.1.downsample.0 (Conv2d)",
         "action": "into-producer", "target": "layer4.1.downsample.0", "reason": None, "exact": True},
        {"site": "layer3.0.downsample.1", "type": "BatchNorm2d", "producer": "layer3.0.downsample.0 (Conv2d)",
         "action": "into-producer-copy", "target": "layer3.0.downsample.0", "reason": None, "exact": True,
         "notes": ["the producer feeds two norms: folded into a copy"]},
        {"site": "neck.fpn.4.bn", "type": "BatchNorm1d", "producer": "", "action": "refuse",
         "target": None, "reason": reason, "exact": None},
        {"site": "head.bn", "type": "BatchNorm1d", "producer": "head.fc (Linear)", "action": "affine",
         "target": "head.bn", "reason": "no producer", "exact": True},
    ]
    text = render(sites_table(rows, title="resnet: 4 norm site(s), --to fold"))
    assert_fits(text)
    for value in ("layer4.1.downsample.1", "layer4.1.downsample.0", "neck.fpn.4.bn",
                  "into-producer-copy", "refuse", "no producer", "(1)", "(2)"):
        assert value in text, value
    f = flat(text)
    assert "(1) the producer feeds two norms: folded into a copy" in f and f"(2) {reason}" in f
    assert "not shown at 80 columns: type, producer;" in f
    wide = render(sites_table(rows), width=200)
    assert_fits(wide, 200)
    assert "layer4.1.downsample.0 (Conv2d)" in wide and "BatchNorm2d" in wide


def test_function_report_fits_80_columns_whole():
    stages = [StageMetrics("naive", {"top1_agreement": 0.1523, "rel_err": 0.9871}, accuracy=0.1402,
                           drift={"layer1.0.bn1": 0.8123, "layer4.1.downsample.1": 1.2345}),
              StageMetrics("calibrated", {"top1_agreement": 0.9912, "rel_err": 0.0734}, accuracy=0.9733,
                           drift={"layer1.0.bn1": 0.0312, "layer4.1.downsample.1": 0.0911}),
              StageMetrics("recovered", {"top1_agreement": 0.9978, "rel_err": 0.0311}, accuracy=0.9811,
                           drift={"layer1.0.bn1": 0.0101, "layer4.1.downsample.1": 0.0457})]
    rec = RecoveryReport(steps=200, end_step=200, seconds=12.3, history=[(200, 0.0123)],
                         agreement_before={"top1_agreement": 0.9912}, agreement_after={"top1_agreement": 0.9978})
    rep = FunctionReport(target="ln-channels", evaluated_on="the digits test split (held out)", original_accuracy=0.9833,
                         stages=stages, recovery=rec)
    text = render(rep)
    assert_fits(text)
    for value in ("calibrated", "recovered", "0.9978", "0.0311", "0.9811", "1.0234", "1.2345", "0.0457"):
        assert value in text, value
    assert "0.9912 → 0.9978" in flat(text)


class RecordingProgress:
    def __init__(self) -> None:
        self.stages: list[str] = []
        self.advanced: dict[str, int] = {}

    @contextmanager
    def stage(self, name, *, total=None, detail=""):
        self.stages.append(name)
        me = self

        class Task:
            def advance(self, n=1, **fields):
                me.advanced[name] = me.advanced.get(name, 0) + n

        yield Task()

    def note(self, text):
        pass


@pytest.mark.usefixtures("single_thread")
def test_compare_targets_reports_one_stage_per_target(original):
    import torch

    progress = RecordingProgress()
    # a budget no timing can miss: this test is about the stages, not about ln's latency on a busy machine
    rep = compare_targets(original, ["ln", "frozen"], (torch.zeros(1, 1, 8, 8),), runs=1, rounds=2, progress=progress,
                          latency_budget=1e9)
    assert progress.stages == ["fold", "ln", "frozen", "export", "latency"]  # fold: the latency reference
    assert progress.advanced["latency"] == 2 and progress.advanced["export"] == 3
    assert [r.target for r in rep.rows] == ["ln", "frozen"]
    assert rep.eval_data == "random" and "on random inputs" in rep.recommendation()
