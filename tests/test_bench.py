"""benchmarks/bench.py keeps working: a fast run of its calibration-cost section (section 5)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


@pytest.mark.usefixtures("single_thread")
def test_calibration_cost_section(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("normswap_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    rc = bench.main(["--models", "none", "--calib-targets", "ln", "--calib-models", "digits", "--calib-repeats", "1",
                     "--threads", "1", "--json", str(out)])
    assert rc == 0
    assert "5. calibration cost" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    (row,) = doc["calibration"]
    (res,) = row["targets"]
    assert row["model"] == "digits" and row["samples"] == 256 and "error" not in res
    # calibration = a teacher and a student forward plus the fits: more than 1 forward, far below 20
    assert 1.0 < res["ratio"] < 20 and res["kd_epoch_ratio"] > 1.0
