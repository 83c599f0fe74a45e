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


@pytest.mark.usefixtures("single_thread")
def test_scaling_section(tmp_path, capsys):
    """Section 7 (--scaling) on the digits model: every measurement runs and gives a ratio."""
    spec = importlib.util.spec_from_file_location("normswap_bench_scaling", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "scaling.json"
    rc = bench.main(["--scaling", "--quick", "--device", "cpu", "--threads", "1", "--scaling-steps", "3",
                     "--scaling-rounds", "1", "--scaling-amp", "none", "--folder-images", "8", "--json", str(out)])
    assert rc == 0
    assert "7. scaling on cpu" in capsys.readouterr().out
    res = json.loads(out.read_text())["scaling"]
    (rec,) = res["recovery"]
    assert rec["amp"] == "float32" and rec["normswap_median_s"] > 0 and rec["hand_median_s"] > 0
    assert res["calibration"]["ratio"] > 1.0  # a teacher and a student forward plus the fits
    assert res["workers"]["workers"] == [0, 2] and res["workers"]["data_speedup"] > 0
