"""Tests for normswap.parity: the pass rule, result objects, onnxruntime runs, first divergence."""

from __future__ import annotations

import copy
import json
import math
import os
import time

import numpy as np
import pytest
import torch
import torch.fx as fx
from rich.console import Console
from torch import nn

import normswap
from normswap import parity
from normswap.errors import InputError
from normswap.parity import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    OutputStats,
    ParityResult,
    check_parity,
    compare,
    first_divergence,
    flatten_outputs,
    make_inputs,
    run_onnxruntime,
)


def _stat(passed: bool, **kw) -> OutputStats:
    base = dict(pair="original↔rewritten", output="output", batch=1, shape=(1, 10), max_abs=1e-7, scale=1.0,
                max_rel=1e-7, cosine=1.0, top1=1.0, passed=passed, tolerance=1.1e-4)
    base.update(kw)
    return OutputStats(**base)


class Tiny(nn.Module):
    """conv → bn → relu(inplace) → conv → bn → pool → fc: named children for readable node names."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    m = Tiny()
    with torch.no_grad():  # non-trivial BN statistics so folding and perturbations matter
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m.eval()


# ---------------------------------------------------------------------------------------------
# compare


def test_identical_tensors_pass_with_zero_error():
    t = torch.randn(4, 10)
    (s,) = compare(t, t.clone(), pair="p", batch=4, atol=DEFAULT_ATOL, rtol=DEFAULT_RTOL)
    assert s.passed and s.max_abs == 0.0 and s.cosine == pytest.approx(1.0)
    assert s.output == "output" and s.shape == (4, 10) and s.batch == 4
    assert s.scale == pytest.approx(float(t.abs().max()))


def test_pass_rule_is_atol_plus_rtol_times_output_scale():
    ref = torch.zeros(2, 3, dtype=torch.float64)
    ref[0, 0] = 10.0  # scale = 10
    tol = 1e-5 + 1e-4 * 10.0
    inside, outside = ref.clone(), ref.clone()
    inside[1, 2] += 0.9 * tol
    outside[1, 2] += 1.1 * tol
    (ok,) = compare(ref, inside, pair="p", batch=1, atol=1e-5, rtol=1e-4)
    (bad,) = compare(ref, outside, pair="p", batch=1, atol=1e-5, rtol=1e-4)
    assert ok.passed and not bad.passed
    assert ok.tolerance == pytest.approx(tol)
    assert bad.max_rel == pytest.approx(1.1 * tol / 10.0)
    assert bad.ratio > 1.0 > ok.ratio


def test_top1_on_hand_made_logits():
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 5.0, 1.0], [2.0, 1.0, 0.0]])
    cand = np.array([[1.0, 2.0, 3.5], [1.0, 2.0, 3.0], [0.0, 5.0, 1.0], [2.0, 1.9, 0.0]])
    (s,) = compare(ref, cand, pair="p", batch=4, atol=1e-5, rtol=1e-4)
    assert s.top1 == pytest.approx(0.75)  # row 1's argmax moved from 0 to 2
    assert not s.passed
    (vec,) = compare(ref[:, 0], cand[:, 0], pair="p", batch=4, atol=1e-5, rtol=1e-4)
    (col,) = compare(ref[:, :1], cand[:, :1], pair="p", batch=4, atol=1e-5, rtol=1e-4)
    assert vec.top1 is None and col.top1 is None  # not classifier-shaped


def test_cosine_of_orthogonal_and_opposite_outputs():
    (orth,) = compare(np.array([1.0, 0.0]), np.array([0.0, 1.0]), pair="p", batch=1, atol=0, rtol=0)
    (opp,) = compare(np.array([1.0, 2.0]), np.array([-1.0, -2.0]), pair="p", batch=1, atol=0, rtol=0)
    assert orth.cosine == pytest.approx(0.0) and opp.cosine == pytest.approx(-1.0)


def test_shape_mismatch_and_missing_outputs_are_failed_stats():
    stats = compare((torch.ones(2, 3), torch.ones(2)), [np.ones((3, 2))], pair="p", batch=2, atol=1, rtol=1)
    assert len(stats) == 2 and not any(s.passed for s in stats)
    assert "shape" in stats[0].note and "(3, 2)" in stats[0].note
    assert "missing" in stats[1].note and stats[1].output == "output_1"
    extra = compare(torch.ones(2), [np.ones(2), np.ones(2)], pair="p", batch=2, atol=1, rtol=1)
    assert [s.passed for s in extra] == [True, False] and "extra" in extra[1].note


def test_integer_and_bool_outputs_compare_exactly():
    a = torch.tensor([[1, 2, 1000000]])
    (same,) = compare(a, a.clone(), pair="p", batch=1, atol=1e-5, rtol=1e-4)
    (off,) = compare(a, a + torch.tensor([[0, 0, 1]]), pair="p", batch=1, atol=1e-5, rtol=1e-4)
    assert same.passed and not off.passed  # 1 / 1e6 would pass a relative tolerance
    (b,) = compare(torch.tensor([True, False]), np.array([True, True]), pair="p", batch=1, atol=1, rtol=1)
    assert not b.passed


def test_non_finite_values_fail_even_when_both_sides_match():
    ref = np.array([1.0, np.nan, np.inf])
    (same,) = compare(ref, ref.copy(), pair="original↔rewritten", batch=1, atol=1e-5, rtol=1e-4)
    (nan_in_cand,) = compare(np.array([1.0, 2.0]), np.array([1.0, np.nan]), pair="original↔onnxruntime", batch=1, atol=1, rtol=1)
    assert not same.passed and same.scale == 1.0
    assert "the original model itself outputs NaN and Inf" in same.note
    assert not nan_in_cand.passed and "the onnxruntime outputs NaN" in nan_in_cand.note


def test_all_nan_outputs_are_failed_not_passed():
    nan = torch.full((1, 10), float("nan"))
    res = ParityResult(stats=compare(nan, nan.clone(), pair="original↔rewritten", batch=1), atol=1e-5, rtol=1e-4)
    assert not res and res.verdict == "failed"
    assert "itself outputs NaN" in res.summary()


def test_empty_and_constant_outputs_compare_nothing():
    empty = torch.zeros(0, 4)
    (e,) = compare(empty, empty.clone(), pair="p", batch=1)
    const = torch.full((3, 5), 2.0)
    (c,) = compare(const, const.clone(), pair="p", batch=1)
    one = torch.tensor([[0.3]])  # a single value is informative (a batch-1 regression output)
    (o,) = compare(one, one.clone(), pair="p", batch=1)
    assert e.passed and e.vacuous and c.passed and c.vacuous and o.passed and not o.vacuous
    only_vacuous = ParityResult(stats=[e, c], atol=1e-5, rtol=1e-4)
    assert not only_vacuous and only_vacuous.verdict == "nothing compared"
    assert "NOTHING COMPARED" in only_vacuous.summary() and "--samples" in only_vacuous.summary()
    assert ParityResult(stats=[], atol=1e-5, rtol=1e-4).verdict == "nothing compared"
    mixed = ParityResult(stats=[e, o], atol=1e-5, rtol=1e-4)
    assert mixed and mixed.verdict == "passed" and "compared nothing" in mixed.summary()
    # an empty output the candidate does not reproduce still fails
    (bad,) = compare(empty, torch.zeros(1, 4), pair="p", batch=1)
    assert not bad.passed


def test_noise_floor_rule_passes_only_what_the_original_itself_does():
    ref = torch.arange(4.0)
    (tight,) = compare(ref, ref + 1e-3, pair="p", batch=1, atol=1e-5, rtol=1e-4)
    assert not tight.passed
    (floored,) = compare(ref, ref + 1e-3, pair="p", batch=1, atol=1e-5, rtol=1e-4, floors=[5e-4])
    assert floored.passed and not floored.vacuous and floored.noise_floor == 5e-4
    (worse,) = compare(ref, ref + 1e-2, pair="p", batch=1, atol=1e-5, rtol=1e-4, floors=[5e-4])
    assert not worse.passed  # clearly worse than NOISE_FACTOR x the floor
    (jumpy,) = compare(ref, torch.ones(3), pair="p", batch=1, floors=[math.inf])
    assert jumpy.passed and jumpy.vacuous and "not comparable" in jumpy.note


def test_badly_conditioned_original_is_judged_against_its_own_noise():
    """A BN with running_mean 1e6: float32 rounding of (x - 1e6) alone moves the original by ~0.06·s;
    the exact fold lands within that noise and must pass, with both numbers reported."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    with torch.no_grad():
        m[1].running_mean.fill_(1e6)
        m[1].running_var.fill_(1e-2)
        m[0].bias.fill_(1e6)
    folded = normswap.convert(m, "fold", (torch.randn(1, 3, 8, 8),), verify=False)
    res = check_parity(m, folded, None, input_shape=(1, 3, 8, 8), atol=1e-5, rtol=1e-4)
    assert res, res.summary()
    assert all(s.noise_floor is not None and s.noise_floor > 0 for s in res.stats)
    assert "own float32 noise" in res.summary()
    broken = normswap.convert(m, "fold", (torch.randn(1, 3, 8, 8),), verify=False)
    with torch.no_grad():
        next(p for n, p in broken.named_parameters() if n.endswith("bias")).add_(10.0)  # a real error, far above the noise (0.6)
    assert not check_parity(m, broken, None, input_shape=(1, 3, 8, 8))


def test_tolerances_must_be_finite_and_non_negative():
    m = nn.Linear(2, 2)
    for bad in (dict(atol=-1.0), dict(atol=math.nan), dict(rtol=math.inf)):
        with pytest.raises(InputError, match="--(atol|rtol)"):
            check_parity(m, m, None, input_shape=(1, 2), **bad)


def test_nested_outputs_flatten_in_the_same_order_with_names():
    r = {"logits": torch.ones(2, 4), "aux": (torch.zeros(2), torch.full((2,), 3.0)), "none": None}
    assert [n for n, _ in flatten_outputs(r)] == ["logits", "aux_0", "aux_1"]
    assert [n for n, _ in flatten_outputs((torch.ones(1), [torch.ones(1), torch.ones(1)]))] == [
        "output_0", "output_1_0", "output_1_1"]
    stats = compare(r, [np.ones((2, 4)), np.zeros(2), np.full(2, 3.5)], pair="p", batch=2, atol=1e-5, rtol=1e-4)
    assert [(s.output, s.passed) for s in stats] == [("logits", True), ("aux_0", True), ("aux_1", False)]


# ---------------------------------------------------------------------------------------------
# ParityResult


def test_parity_result_truthiness_both_ways():
    assert ParityResult([_stat(True), _stat(True)], 1e-5, 1e-4)
    assert not ParityResult([_stat(True), _stat(False)], 1e-5, 1e-4)
    assert not ParityResult([], 1e-5, 1e-4)  # nothing compared is not a pass


def test_worst_prefers_failures_then_ratio():
    a = _stat(True, output="a", max_abs=1e-5, tolerance=1e-4)
    b = _stat(True, output="b", max_abs=9e-5, tolerance=1e-4)
    c = _stat(False, output="c", max_abs=2e-4, tolerance=1e-4)
    assert ParityResult([a, b], 1e-5, 1e-4).worst() is b
    assert ParityResult([a, c, b], 1e-5, 1e-4).worst() is c
    assert ParityResult([], 1e-5, 1e-4).worst() is None


def test_to_json_round_trips():
    stats = [_stat(True), _stat(False, output="aux", batch="samples", max_abs=math.inf, max_rel=math.inf,
                                cosine=math.nan, top1=None, note="shape (2,) vs reference (3,)")]
    res = ParityResult(stats, 1e-5, 1e-4, divergence="conv2 (call_module conv2): max rel err 1.0e-02",
                       notes=["hello"])
    text = res.to_json()
    data = json.loads(text)  # strict JSON: non-finite numbers are strings
    assert data["passed"] is False and data["stats"][1]["max_abs"] == "inf"
    assert data["divergence"].startswith("conv2") and data["notes"] == ["hello"]
    assert data["worst"]["output"] == "aux"
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    back = ParityResult.from_dict(data)
    assert back.stats[0] == stats[0]
    assert back.stats[1].shape == (1, 10) and math.isinf(back.stats[1].max_abs) and math.isnan(back.stats[1].cosine)
    assert bool(back) is False and back.divergence == res.divergence
    assert json.loads(res.to_json(indent=None)) == data


def test_rich_rendering_shows_rows_verdicts_and_summary():
    res = ParityResult([_stat(True, output="logits"), _stat(False, output="aux", max_abs=1.0, max_rel=1.0)],
                       1e-5, 1e-4, divergence="layer1.0.conv2 (call_module layer1_0_conv2): max rel err 3.2e-02")
    console = Console(record=True, width=220, color_system=None)
    console.print(res)
    text = console.export_text()
    assert "logits" in text and "aux" in text and "original↔rewritten" in text
    assert "pass" in text and "FAIL" in text
    assert "parity FAILED: 1/2 comparisons" in text
    assert "first divergence: layer1.0.conv2" in text
    console2 = Console(record=True, width=220, color_system=None)
    console2.print(ParityResult([_stat(True)], 1e-5, 1e-4))
    assert "parity PASSED: 1/1" in console2.export_text()


# ---------------------------------------------------------------------------------------------
# inputs


def test_make_inputs_is_seeded_and_sets_the_batch():
    a = make_inputs((1, 3, 8, 8), batch_sizes=(1, 3), seed=0)
    b = make_inputs((7, 3, 8, 8), batch_sizes=(1, 3), seed=0)
    c = make_inputs((1, 3, 8, 8), batch_sizes=(1, 3), seed=1)
    assert [bs for bs, _ in a] == [1, 3] and a[1][1][0].shape == (3, 3, 8, 8)
    assert torch.equal(a[1][1][0], b[1][1][0]) and not torch.equal(a[1][1][0], c[1][1][0])
    multi = make_inputs([(1, 4), (1, 2, 5)], batch_sizes=(2,))
    assert [t.shape for t in multi[0][1]] == [(2, 4), (2, 2, 5)]
    ints = make_inputs((1, 6), dtype=torch.int64)
    assert ints[0][1][0].dtype == torch.int64
    with pytest.raises(InputError):
        make_inputs(("a", 3))


# ---------------------------------------------------------------------------------------------
# check_parity


def test_check_parity_passes_on_a_copy_and_fails_on_a_perturbed_model():
    m = _tiny().train()  # check_parity must not leave it in eval mode
    good = check_parity(m, copy.deepcopy(m), input_shape=(1, 3, 8, 8))
    assert good and [s.batch for s in good.stats] == [1, 3]
    assert m.training and m.bn1.training  # flags restored

    bad_model = copy.deepcopy(m)
    with torch.no_grad():
        bad_model.conv2.weight[0] += 0.05
    bad = check_parity(m, bad_model, input_shape=(1, 3, 8, 8))
    assert not bad
    assert bad.worst().pair == "original↔rewritten" and bad.worst().max_rel > DEFAULT_RTOL
    assert "FAILED" in bad.summary()


def test_check_parity_eval_mode_and_samples():
    m = _tiny()
    m.train()
    x = torch.randn(5, 3, 8, 8)
    res = check_parity(m, copy.deepcopy(m), samples=x)
    assert res and [s.batch for s in res.stats] == ["samples"] and res.stats[0].shape == (5, 5)
    with pytest.raises(InputError):
        check_parity(m, copy.deepcopy(m))  # no inputs at all
    assert not check_parity(m, input_shape=(1, 3, 8, 8))  # nothing to compare is not a pass


def test_check_parity_records_a_crashing_rewritten_model():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("kaboom")

    res = check_parity(_tiny(), Boom(), input_shape=(1, 3, 8, 8), batch_sizes=(2,))
    assert not res and "kaboom" in res.stats[0].note


def test_check_parity_with_onnxruntime(tmp_path):
    from normswap.export import export_onnx

    m = _tiny()
    r = export_onnx(m, (torch.randn(1, 3, 8, 8),), tmp_path / "tiny.onnx", exporter="torchscript")
    res = check_parity(m, copy.deepcopy(m), r.path, input_shape=(1, 3, 8, 8), samples=torch.randn(4, 3, 8, 8))
    assert res, res.summary()
    assert res.pairs() == ["original↔rewritten", "original↔onnxruntime", "rewritten↔onnxruntime"]
    assert {s.batch for s in res.stats} == {1, 3, "samples"} and len(res.stats) == 9

    # an ONNX model of a perturbed network fails against the original
    bad = copy.deepcopy(m)
    with torch.no_grad():
        bad.fc.bias += 0.1
    r_bad = export_onnx(bad, (torch.randn(1, 3, 8, 8),), tmp_path / "bad.onnx", exporter="torchscript")
    res_bad = check_parity(m, None, r_bad.path, input_shape=(1, 3, 8, 8))
    assert not res_bad and {s.pair for s in res_bad.failed} == {"original↔onnxruntime"}


def test_run_onnxruntime_caches_sessions_per_file_version(tmp_path):
    from normswap.export import export_onnx

    parity.clear_session_cache()
    m = _tiny()
    path = tmp_path / "m.onnx"
    export_onnx(m, (torch.randn(2, 3, 8, 8),), path, exporter="torchscript", verify=False)
    x = torch.randn(2, 3, 8, 8)
    out1 = run_onnxruntime(path, (x,))
    assert len(parity._SESSION_CACHE) == 1
    (sess,) = parity._SESSION_CACHE.values()
    out2 = run_onnxruntime(path, (x,))
    assert len(parity._SESSION_CACHE) == 1 and next(iter(parity._SESSION_CACHE.values())) is sess
    np.testing.assert_array_equal(out1[0], out2[0])
    run_onnxruntime(path, (x,), optimization="disable")
    assert len(parity._SESSION_CACHE) == 2  # different settings, different session

    # rewriting the file invalidates the cache entry (mtime/size are part of the key)
    bad = copy.deepcopy(m)
    with torch.no_grad():
        bad.fc.bias += 1.0
    time.sleep(0.01)
    export_onnx(bad, (torch.randn(2, 3, 8, 8),), path, exporter="torchscript", verify=False)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    out3 = run_onnxruntime(path, (x,))
    assert not np.allclose(out1[0], out3[0])
    with pytest.raises(InputError):
        run_onnxruntime(path, (x, x))  # wrong number of inputs
    with pytest.raises(InputError):
        run_onnxruntime(path, (x,), optimization="fastest")


# ---------------------------------------------------------------------------------------------
# first_divergence


def test_first_divergence_names_the_perturbed_node():
    m = _tiny()
    x = torch.randn(2, 3, 8, 8)
    gm = fx.symbolic_trace(m)
    assert first_divergence(gm, fx.symbolic_trace(copy.deepcopy(m)), {}, (x,), atol=1e-5, rtol=1e-4) is None

    bad = copy.deepcopy(m)
    with torch.no_grad():
        bad.conv2.weight[3] *= 1.05
    msg = first_divergence(gm, fx.symbolic_trace(bad), {}, (x,), atol=1e-5, rtol=1e-4)
    assert msg is not None and msg.startswith("conv2 (call_module conv2): max rel err"), msg
    assert "\n" not in msg


def test_first_divergence_follows_the_node_map_through_a_fold():
    m = _tiny()
    x = torch.randn(2, 3, 8, 8)
    folded = copy.deepcopy(m)
    folded.conv1 = torch.nn.utils.fusion.fuse_conv_bn_eval(folded.conv1, folded.bn1)
    folded.bn1 = nn.Identity()
    gm_o, gm_r = fx.symbolic_trace(m), fx.symbolic_trace(folded)
    # without the map, the folded conv1 "diverges" from the original conv1 (it now includes the BN)
    naive = first_divergence(gm_o, gm_r, {}, (x,), atol=1e-5, rtol=1e-4)
    assert naive is not None and naive.startswith("conv1 (call_module conv1)")
    # with it, conv1 is compared with bn1's output — recorded before the in-place ReLU overwrote it
    assert first_divergence(gm_o, gm_r, {"conv1": "bn1"}, (x,), atol=1e-5, rtol=1e-4) is None
    # a perturbed fold is then caught at conv1, reported against the original bn1
    with torch.no_grad():
        folded.conv1.bias[0] += 0.5
    msg = first_divergence(gm_o, fx.symbolic_trace(folded), {"conv1": "bn1"}, (x,), atol=1e-5, rtol=1e-4)
    assert msg is not None and msg.startswith("conv1 (call_module conv1 ↔ original bn1): max rel err"), msg
    # mapping a node to None skips it; the divergence then shows up at the next compared node
    msg2 = first_divergence(gm_o, fx.symbolic_trace(folded), {"conv1": None}, (x,), atol=1e-5, rtol=1e-4)
    assert msg2 is not None and msg2.startswith("bn1 (call_module bn1)"), msg2
