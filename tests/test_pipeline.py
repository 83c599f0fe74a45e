"""The conversion pipeline in the library (normswap.pipeline): verdict rules, the report a pipeline
user gets (the same the CLI writes), progress only where asked, recovery that keeps the best."""

from __future__ import annotations

import io
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from normswap.parity import ParityResult, compare
from normswap.pipeline import EXIT_CODES, decide, run_conversion, run_recovery
from normswap.progress import NullProgress, RichProgress
from tests.test_cli import run


def _parity(ok: bool = True, empty: bool = False) -> ParityResult:
    ref = torch.zeros(0, 3) if empty else torch.arange(6.0).reshape(2, 3)
    cand = ref.clone() if ok else ref + 1.0
    return ParityResult(stats=compare(ref, cand, pair="original↔rewritten", batch=1), atol=1e-5, rtol=1e-4)


EXACT = SimpleNamespace(exact=True)
SWAP = SimpleNamespace(exact=False)


def test_verdict_rules_are_one_table():
    assert decide(EXACT, _parity(), exported=True).word == "PASSED"
    assert decide(EXACT, _parity(ok=False), exported=True).word == "FAILED"
    assert decide(EXACT, _parity(empty=True), exported=False).word == "NOTHING COMPARED"
    drift = {"max_rel": 0.66, "top1": 1 / 3}
    exported = decide(SWAP, _parity(), exported=True, drift=drift)
    assert exported.word == "EXPORTED" and "function changed: top-1 agreement 33.3%, output rel err 0.66" in exported.detail
    assert "calibrate with --calib" in exported.detail
    assert decide(SWAP, None, exported=False, drift=drift).word == "CONVERTED"
    assert decide(SWAP, _parity(ok=False), exported=True, drift=drift).word == "FAILED"  # a broken export
    assert {w: EXIT_CODES[w] for w in ("PASSED", "EXPORTED", "CONVERTED", "FAILED", "NOTHING COMPARED")} == {
        "PASSED": 0, "EXPORTED": 0, "CONVERTED": 0, "FAILED": 3, "NOTHING COMPARED": 4}


def _comparable(rep: dict) -> dict:
    """A report without what differs from run to run (times, output paths)."""
    rep = json.loads(json.dumps(rep))
    for k in ("seconds", "outputs"):
        rep.pop(k, None)
    for k in ("path", "seconds"):
        rep["onnx"].pop(k, None)
    for a in rep["onnx"]["attempts"]:
        a.pop("seconds", None)
    return rep


def test_library_call_writes_the_report_the_cli_writes(tmp_path):
    result = run_conversion(None, "fold", onnx=tmp_path / "lib.onnx", report=tmp_path / "lib.json")
    assert result and result.verdict.word == "PASSED" and result.exit_code == 0
    p = run("convert", "--onnx", str(tmp_path / "cli.onnx"), "--report", str(tmp_path / "cli.json"))
    assert p.returncode == 0, p.stderr
    lib = json.loads((tmp_path / "lib.json").read_text())
    cli = json.loads((tmp_path / "cli.json").read_text())
    assert lib["verdict"]["word"] == cli["verdict"]["word"] == "PASSED"
    assert set(lib["seconds"]) == set(cli["seconds"]) >= {"load", "rewrite", "export", "parity"}
    assert _comparable(lib) == _comparable(cli)


def test_a_naive_swap_is_never_passed(tmp_path):
    result = run_conversion(None, "gn", onnx=tmp_path / "gn.onnx")
    assert result.verdict.word == "EXPORTED" and "function changed" in result.verdict.detail
    p = run("convert", "--to", "gn")
    assert p.returncode == 0 and "PASSED" not in p.stdout and "CONVERTED — function changed" in p.stdout


def test_calibrate_and_recover_are_timed_apart(tmp_path):
    result = run_conversion(None, "gn", calib="digits", calib_samples=64, recover_steps=3, report=tmp_path / "r.json")
    assert {"calibrate", "recover"} <= set(result.seconds)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert {"calibrate", "recover"} <= set(rep["seconds"])
    # the verdict says what recovery did: its weights, or (3 warm-up steps here) that it kept the calibrated ones
    rec = result.kept.recovery
    kept_start = rec.best_step == rec.start_step
    assert ("recovery raised the held-out loss, so its starting weights were kept" if kept_start
            else "calibrated and recovered") in result.verdict.detail


def test_progress_goes_only_where_asked(tmp_path):
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=80)
    run_conversion(None, "fold", onnx=tmp_path / "a.onnx", progress=RichProgress(console))
    lines = [ln for ln in buf.getvalue().splitlines() if "✓" in ln]
    assert [ln.split()[1] for ln in lines] == ["load", "rewrite", "export", "parity"], buf.getvalue()
    assert all(ln.rstrip().endswith("s") or "s " in ln for ln in lines)
    # the CLI through a pipe and with --json: no progress noise at all
    p = run("convert", "--onnx", str(tmp_path / "b.onnx"))
    assert "✓" not in p.stdout + p.stderr
    p = run("convert", "--json")
    json.loads(p.stdout)
    assert "✓" not in p.stderr


def test_recover_keeps_a_better_saved_conversion(tmp_path, monkeypatch):
    saved = tmp_path / "gn"
    run_conversion(None, "gn", calib="digits", calib_samples=128, save=saved)
    before = (saved / "model.safetensors").read_bytes()
    rec_mod = sys.modules["normswap.keep.recover"]
    real = rec_mod.recover

    def ruinous(teacher, student, batches, **kw):  # a "recovery" that makes the model worse
        rep = real(teacher, student, batches, **{**kw, "steps": 1})
        with torch.no_grad():
            for p in student.model.parameters():
                p.mul_(-1.0)
        return rep

    monkeypatch.setattr(rec_mod, "recover", ruinous)
    res = run_recovery(saved, "digits", calib_samples=64, steps=1, checkpoint_dir=tmp_path / "ck")
    assert res.saved is None and res.after < res.before
    assert "left as it was" in res.notes[0]
    assert (saved / "model.safetensors").read_bytes() == before
    res = run_recovery(saved, "digits", calib_samples=64, steps=1, keep_last=True, checkpoint_dir=tmp_path / "ck2")
    assert res.saved == str(saved) and (saved / "model.safetensors").read_bytes() != before


def test_null_progress_is_silent():
    with NullProgress().stage("x", total=3) as t:
        t.advance(1, loss=0.5)


def test_recovery_ends_on_its_best_held_out_step():
    import normswap
    from normswap.keep.calibrate import agreement
    from normswap.models.digits import load_digits
    from normswap.keep.recover import recover

    original = normswap.load_model(None).model
    conv = normswap.rewrite(original, "gn", (torch.randn(1, 1, 8, 8),))
    data = normswap.calibration_batches("digits", samples=128, batch=32)
    hx = load_digits("test")[0][:200]
    start = agreement(original, conv.model, hx)["top1_agreement"]
    # a learning rate that wrecks the model: the best evaluated weights are the starting ones
    rep = recover(original, conv, data, steps=6, lr=0.5, eval_every=2, heldout=hx, keep_best=True, progress=False)
    assert [s for s, _ in rep.heldout_evals] == [0, 2, 4, 6]
    final = agreement(original, conv.model, hx)["top1_agreement"]
    assert final == max(a for _, a in rep.heldout_evals) >= start
    if rep.best_step != 6:
        assert "kept the weights of step" in rep.notes[-1]


def test_gn_ws_sites_without_a_conv_are_counted_in_the_summary_line():
    result = run_conversion(None, "gn-ws")
    buf = io.StringIO()
    Console(file=buf, width=200).print(result)
    first = buf.getvalue().splitlines()[0]
    # the digits head's BatchNorm1d follows a Linear: GN there, without weight standardization
    assert "1 of them got GN without weight standardization" in first, first


def test_a_stage_that_raises_still_gets_its_line_marked_failed():
    buf = io.StringIO()
    progress = RichProgress(Console(file=buf, force_terminal=True, width=80))
    with pytest.raises(ValueError):
        with progress.stage("export"):
            raise ValueError("boom")
    assert any("✗" in ln and "export" in ln for ln in buf.getvalue().splitlines())
