"""The front of ``--to fold --calib``, measured in latency (``--front-latency``, its table, JSON and PNG), and
``normswap compare``'s fold row on a model trained with per-sample norms."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normswap.errors import InputError

GN = "normswap.models.digits_norms:digits_gn"
REPO = Path(__file__).resolve().parent.parent


def test_the_front_is_timed_folded_and_drawn(tmp_path):
    from PIL import Image
    from rich.console import Console

    from normswap.pipeline import run_conversion

    png = tmp_path / "front.png"
    res = run_conversion(GN, "fold", calib="digits", calib_samples=256, front_plot=png, report=tmp_path / "r.json")
    assert res.exit_code == 0, res.verdict.line
    fitted = res.fitted
    lat = fitted.latency
    n = len(fitted.choices)
    assert lat is not None and len(lat.points_ms) == len(fitted.front) == n
    assert lat.original_ms > 0 and all(ms is not None and ms > 0 for ms in lat.points_ms)
    # every GroupNorm of digits_gn folded is well under the original's latency (measured 0.59×), and the
    # per-site savings add up to it: most steps along the front save time
    assert lat.ratio(lat.points_ms[-1]) < 0.9, lat.to_dict()
    saved = [lat.saved_ms(k) for k in range(1, n + 1)]
    assert sum(saved) == pytest.approx(lat.original_ms - lat.points_ms[-1])
    assert sum(s > 0 for s in saved) >= n // 2, saved
    assert "onnxruntime CPU, batch 1, 1 thread(s)" in lat.runtime
    # the JSON: per site the latency it saves, per front point its latency; the chosen point is auto's prefix
    d = res.to_dict()["fold_norms"]
    k = d["chosen_point"]
    assert k == len(fitted.folded) and k >= 1
    assert set(d["latency_saved_ms"]) == {c.fit.name for c in fitted.choices}
    assert [p["k"] for p in d["front_latency"]] == list(range(1, n + 1))
    assert d["front_latency"][-1]["latency_vs_original"] < 0.9 and d["latency"]["plot"] == str(png)
    assert d["seconds"]["latency"] > 0 and res.outputs["front_plot"] == str(png)
    # the table
    con = Console(width=200, record=True)
    con.print(fitted)
    text = con.export_text()
    assert "latency" in text and "×original" in text and "◀ chosen" in text and "saved ms" in text
    assert f"plot: {png}" in text
    # the PNG: written, readable, the chosen point's green ring drawn
    assert png.stat().st_size > 5000
    img = Image.open(png).convert("RGB")
    assert img.size == (1000, 620)
    assert any(px == (44, 160, 44) for px in img.getdata())


def test_front_latency_needs_fold_with_calib_and_is_off_by_default():
    from normswap.pipeline import run_conversion

    with pytest.raises(InputError, match="--front-latency"):
        run_conversion(GN, "gn", front_latency=True)
    with pytest.raises(InputError, match="--front-latency / --front-plot"):
        run_conversion(GN, "fold", front_plot="/tmp/never-written-normswap.png")
    from normswap.pipeline.fold_norms import FoldNormsReport

    assert FoldNormsReport.__dataclass_fields__["latency"].default is None  # the default convert does not time


def test_compare_folds_a_groupnorm_model_through_fitted_affines():
    from normswap.pipeline import run_comparison

    rep = run_comparison(GN, ["fold", "gn"], calib="digits", calib_samples=160, runs=10)
    fold = next(r for r in rep.rows if r.target == "fold")
    assert fold.status == "ok", fold.note
    assert fold.swapped >= 1 and fold.agreement is not None and fold.agreement > 0.9
    assert fold.calibrated and fold.exact_promised is False and "fitted as affines" in fold.note
    assert fold.latency_vs_fold == pytest.approx(1.0)
    gn = next(r for r in rep.rows if r.target == "gn")
    assert gn.swapped == 0 and gn.latency_vs_fold is not None and gn.latency_vs_fold > 1.05  # the GN model is slower
    assert "no site swapped" in " ".join(rep.notes)


def test_compare_says_a_groupnorm_model_needs_calib_to_fold():
    from normswap.compare import compare_targets
    from normswap.models.digits_norms import digits_gn

    rep = compare_targets(digits_gn(), ["fold"], torch.randn(1, 1, 8, 8), latency=True)
    fold = rep.rows[0]
    assert fold.status == "failed" and "add --calib DATA" in fold.note and "9 per-sample norm site(s)" in fold.note
    assert any("no latency reference" in n for n in rep.notes)


def test_help_documents_the_front():
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "cli.main", "convert", "--help"], capture_output=True, text=True, env=env, check=False,
                       cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "--front-latency" in p.stdout and "--front-plot" in p.stdout and "NAME.front.png" in p.stdout
