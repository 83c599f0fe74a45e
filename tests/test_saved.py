"""Saved conversions are data, not code (normswap.load.saved): no spec is run without trust, the record is
validated, the weights must match its hash, the directory is written atomically with the umask's
permissions, SIGKILL leftovers are cleaned, and recovery resumes only the same conversion."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import normswap
from normswap.atomic import atomic_write_text, default_file_mode, staging_dir
from normswap.keep.recover import STATE_FILE, recover
from normswap.load.saved import CONVERSION_JSON, WEIGHTS_FILE, read_record

from .helpers import rel_err, same_state, snapshot

X = torch.zeros(1, 1, 8, 8)


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, as tests/test_cli.py runs it."""
    exe = shutil.which("normswap")
    cmd = [exe] if exe else [sys.executable, "-m", "cli.main"]
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("NORMSWAP_DEBUG", None)
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def assert_one_line_error(p: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    err = p.stderr.strip()
    assert "Traceback" not in err and err.startswith("error:") and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


def _gn(original, source=None):
    return normswap.rewrite(original, "gn", (X,), source=source if source is not None else {"spec": None, "args": {}})


def _edit(d: Path, **changes) -> None:
    """Rewrite fields of d's record (keeping its weights hash valid); a value of ... deletes the field."""
    rec = json.loads((d / CONVERSION_JSON).read_text())
    for k, v in changes.items():
        if v is ...:
            rec.pop(k, None)
        else:
            rec[k] = v
    (d / CONVERSION_JSON).write_text(json.dumps(rec))


@pytest.fixture
def saved(original, tmp_path):
    """A gn conversion of the bundled model, saved to tmp_path/saved."""
    d = tmp_path / "saved"
    normswap.save_conversion(_gn(original), d)
    return d


# ----------------------------------------------------------------------------------- no code run


def _malicious(saved: Path, spec: str, args: dict) -> None:
    _edit(saved, source={"spec": spec, "args": args, "weights": None})


def test_record_naming_os_system_runs_nothing(saved, tmp_path):
    marker = tmp_path / "pwned"
    _malicious(saved, "os:system", {"command": f"touch {marker}"})
    with pytest.raises(normswap.InputError, match="never runs code it names") as e:
        normswap.load_conversion(saved)
    assert "'os:system'" in str(e.value) and "touch" in str(e.value) and "\n" not in str(e.value)
    p = run("recover", str(saved), "--calib", "digits", "--steps", "1")
    assert_one_line_error(p, 2, "'os:system'", "--trust-spec", "recover DIR MODEL")
    assert not marker.exists()


def test_record_naming_a_python_file_runs_nothing(saved, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').close()\n\ndef build():\n    open({str(marker)!r}, 'w').close()\n")
    _malicious(saved, f"{evil}:build", {})
    with pytest.raises(normswap.InputError, match="evil.py:build"):
        normswap.load_conversion(saved)
    assert not marker.exists()
    p = run("recover", str(saved), "--calib", "digits", "--steps", "1")
    assert_one_line_error(p, 2, "evil.py:build", "--trust-spec")
    assert not marker.exists()


def test_trusted_spec_and_explicit_model(original, tmp_path):
    mod = tmp_path / "mymodel.py"
    mod.write_text("from normswap.models.digits import digits_resnet\n\ndef build(pretrained=True):\n"
                   "    return digits_resnet(pretrained=pretrained)\n")
    spec = f"{mod}:build"
    conv = _gn(original, source={"spec": spec, "args": {"pretrained": True}})
    d = tmp_path / "c"
    normswap.save_conversion(conv, d)
    with pytest.raises(normswap.InputError, match="never runs code"):
        normswap.load_conversion(d)
    x = torch.randn(4, 1, 8, 8)
    trusted = normswap.load_conversion(d, trust_spec=True)
    given = normswap.load_conversion(d, model=original)
    with torch.no_grad():
        ref = conv.model(x)
        assert rel_err(ref, trusted.model(x)) < 1e-6 and rel_err(ref, given.model(x)) < 1e-6
    assert trusted.conversion_id == given.conversion_id == conv.conversion_id
    common = ["--calib", "digits", "--calib-samples", "32", "--steps", "1", "--checkpoint-every", "1", "--json"]
    p = run("recover", str(d), "--trust-spec", *common)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["recovery"]["end_step"] == 1
    p = run("recover", str(d), spec, "--arg", "pretrained=True", *common)  # MODEL given: the record's spec is not used
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["recovery"]["resumed"]  # the same conversion's checkpoint


# ----------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"to": ...}, "'to'"),
        ({"to": "os:system"}, "'to'"),
        ({"skip": "conv1"}, "'skip'"),
        ({"skip": [1, 2]}, "'skip'"),
        ({"options": ["groups"]}, "'options'"),
        ({"options": {"eval": "1"}}, "'options.eval'"),
        ({"options": {"groups": 0}}, "'options.groups'"),
        ({"input_shapes": [[1, -1, 8, 8]]}, "'input_shapes'"),
        ({"input_shapes": [1, 1, 8, 8]}, "'input_shapes'"),
        ({"input_shapes": [[1 << 20, 1 << 20, 8, 8]]}, "'input_shapes'"),
        ({"source": "os:system"}, "'source'"),
        ({"source": {"spec": ["os", "system"], "args": {}}}, "'source.spec'"),
        ({"source": {"spec": "os:system", "args": ["touch x"]}}, "'source.args'"),
        ({"weights_sha256": "nothex"}, "'weights_sha256'"),
        ({"weights_sha256": ...}, "'weights_sha256'"),  # written by this version: the hash must be there
    ],
)
def test_tampered_record_is_an_input_error(saved, changes, field):
    _edit(saved, **changes)
    with pytest.raises(normswap.InputError) as e:
        normswap.load_conversion(saved)
    msg = str(e.value)
    assert field in msg and str(saved / CONVERSION_JSON) in msg and "\n" not in msg, msg


def test_record_not_an_object(saved):
    (saved / CONVERSION_JSON).write_text("[1, 2]")
    with pytest.raises(normswap.InputError, match="JSON list, not an object"):
        normswap.load_conversion(saved)
    (saved / CONVERSION_JSON).write_text("{not json")
    with pytest.raises(normswap.InputError, match="not valid JSON"):
        normswap.load_conversion(saved)


def test_tampered_record_on_the_command_line(saved):
    _edit(saved, input_shapes=[[1, -1, 8, 8]])
    assert_one_line_error(run("recover", str(saved), "--calib", "digits", "--steps", "1"), 2, "input_shapes")


def test_legacy_record_without_hash_or_id_loads_with_a_warning(saved):
    _edit(saved, weights_sha256=..., conversion_id=...)
    with pytest.warns(UserWarning, match="no weights hash"):
        conv = normswap.load_conversion(saved)
    assert conv.conversion_id is None


# ----------------------------------------------------------------------------------- weights hash, id


def test_weights_of_another_conversion_are_refused(original, saved, tmp_path):
    other = _gn(original)
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)  # same architecture, other weights
    normswap.save_conversion(other, tmp_path / "other")
    shutil.copy(tmp_path / "other" / WEIGHTS_FILE, saved / WEIGHTS_FILE)
    with pytest.raises(normswap.InputError, match="does not belong to .*sha256 differs.*re-save"):
        normswap.load_conversion(saved)
    assert_one_line_error(run("recover", str(saved), "--calib", "digits", "--steps", "1"), 2, "sha256 differs")


def test_conversion_id_made_at_first_save_and_kept(original, tmp_path):
    conv = _gn(original)
    assert conv.conversion_id is None
    normswap.save_conversion(conv, tmp_path / "a")
    rec = read_record(tmp_path / "a")
    assert rec["conversion_id"] == conv.conversion_id and len(rec["weights_sha256"]) == 64
    loaded = normswap.load_conversion(tmp_path / "a")
    assert loaded.conversion_id == conv.conversion_id
    normswap.save_conversion(loaded, tmp_path / "b")
    normswap.save_conversion(loaded, tmp_path / "a")  # again into the same directory
    assert read_record(tmp_path / "b")["conversion_id"] == read_record(tmp_path / "a")["conversion_id"] == conv.conversion_id
    normswap.save_conversion(_gn(original), tmp_path / "a")  # another conversion into the directory: a new id
    assert read_record(tmp_path / "a")["conversion_id"] != conv.conversion_id


# ----------------------------------------------------------------------------------- the directory


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_files_follow_the_umask(original, tmp_path, mask):
    old = os.umask(mask)
    try:
        d = tmp_path / "c"
        normswap.save_conversion(_gn(original), d)
        assert d.stat().st_mode & 0o777 == 0o777 & ~mask
        for name in (CONVERSION_JSON, WEIGHTS_FILE):
            assert (d / name).stat().st_mode & 0o777 == default_file_mode() == 0o666 & ~mask
        normswap.save_conversion(_gn(original), d)  # replacing keeps the modes
        assert (d / WEIGHTS_FILE).stat().st_mode & 0o777 == 0o666 & ~mask
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no staging directory left beside it


def test_save_refuses_a_directory_with_other_files(original, tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(normswap.InputError, match=r"holds other files \(notes.txt\)"):
        normswap.save_conversion(_gn(original), d)
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(normswap.InputError, match="is not a directory"):
        normswap.save_conversion(_gn(original), f)
    ok = tmp_path / "ok"  # what `convert --calib --save` leaves before saving: the drift plot, checkpoints
    (ok / "recover-checkpoints").mkdir(parents=True)
    (ok / "drift.png").write_bytes(b"png")
    normswap.save_conversion(_gn(original), ok)
    assert normswap.load_conversion(ok).to == "gn"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_sigkill_leftovers_are_cleaned_on_the_next_write(original, tmp_path):
    dead, live = _dead_pid(), os.getppid()
    stale = tmp_path / f".x.json.normswap-{dead}-abc123.tmp"
    stale.write_bytes(b"\0" * 1024)  # e.g. a partial file from a killed run
    alive = tmp_path / f".x.json.normswap-{live}-def456.tmp"  # another running writer's: kept
    alive.write_bytes(b"")
    unrelated = tmp_path / f".y.json.normswap-{dead}-abc123.tmp"  # another destination's: not touched now
    unrelated.write_bytes(b"")
    atomic_write_text(tmp_path / "x.json", "{}")
    assert not stale.exists() and alive.exists() and unrelated.exists()
    stage = tmp_path / f".c.normswap-{dead}-zz9.tmpdir"
    (stage / "sub").mkdir(parents=True)
    (stage / "sub" / WEIGHTS_FILE).write_bytes(b"partial")
    normswap.save_conversion(_gn(original), tmp_path / "c")
    assert not stage.exists()
    with staging_dir(tmp_path / "y.json") as d:  # the running process's own temporaries are recognisable
        assert d.name.startswith(f".y.json.normswap-{os.getpid()}-") and d.name.endswith(".tmpdir")
    assert not unrelated.exists()


# ----------------------------------------------------------------------------------- recovery checkpoints


def test_recovery_resumes_only_the_same_conversion(original, saved):
    from normswap.load.data import calibration_batches

    data = calibration_batches("digits", samples=32, batch=16)
    ck = saved / "recover-checkpoints"
    first = normswap.load_conversion(saved)
    recover(original, first, data, steps=2, progress=False, checkpoint_dir=ck)
    assert json.loads((ck / STATE_FILE).read_text())["conversion_id"] == first.conversion_id
    same = normswap.load_conversion(saved)
    rep = recover(original, same, data, steps=3, progress=False, checkpoint_dir=ck)
    assert rep.resumed and rep.start_step == 2
    assert not any("another conversion" in n for n in rep.notes), rep.notes
    # `convert --to ln --save` into the same directory: a new conversion, whose recovery starts fresh
    normswap.save_conversion(normswap.rewrite(original, "ln", (X,), source={"spec": None, "args": {}}), saved)
    new = normswap.load_conversion(saved)
    before = snapshot(new.model)
    rep = recover(original, new, data, steps=1, progress=False, checkpoint_dir=ck)
    assert not rep.resumed and rep.start_step == 0 and rep.end_step == 1
    assert any("belong to another conversion" in n and "started fresh" in n for n in rep.notes), rep.notes
    assert not same_state(new.model, before)
    assert json.loads((ck / STATE_FILE).read_text())["conversion_id"] == new.conversion_id


def test_corrupt_checkpoint_is_an_input_error(original, saved):
    from normswap.load.data import calibration_batches

    data = calibration_batches("digits", samples=32, batch=16)
    ck = saved / "recover-checkpoints"
    recover(original, normswap.load_conversion(saved), data, steps=1, progress=False, checkpoint_dir=ck)
    state = json.loads((ck / STATE_FILE).read_text())
    optim = ck / state["optimizer"]
    optim.write_bytes(b"garbage, not a torch file")
    with pytest.raises(normswap.InputError, match=f"checkpoint {optim} is corrupt"):
        recover(original, normswap.load_conversion(saved), data, steps=2, progress=False, checkpoint_dir=ck)
    w = ck / state["weights"]
    w.write_bytes(b"\xff" * 64)
    with pytest.raises(normswap.InputError, match=f"checkpoint {w} is corrupt"):
        recover(original, normswap.load_conversion(saved), data, steps=2, progress=False, checkpoint_dir=ck)
    (ck / STATE_FILE).write_text("[]")
    with pytest.raises(normswap.InputError, match="is damaged"):
        recover(original, normswap.load_conversion(saved), data, steps=2, progress=False, checkpoint_dir=ck)
