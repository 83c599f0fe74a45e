"""--to fold --calib on models trained with per-sample norms, beyond classifiers: the sigmoid multi-label and
the regression CNNs trained with GroupNorm (every site folds, the ONNX is the BN-folded architecture's, the
kind's own measure holds), and an InstanceNorm network whose per-sample statistics are the signal (auto keeps
those sites, each with its reason and measured cost, and folds the rest)."""

from __future__ import annotations

import pytest

from normswap.errors import RewriteError
from normswap.export import NORM_OP_TYPES

pytestmark = pytest.mark.usefixtures("single_thread")

#: model module → (GN builder, BN builder, the calibrated bar on the kind's primary measure, every site
#: folded, 256 calibration samples). The regression bar is lower: its head GroupNorm(8, 64) normalizes
#: groups of 8 features per sample, which no affine reproduces (R² alone ≈ 0.9); recovery closes the rest.
GN_MODELS = {
    "multilabel": ("multilabel_gn", "multilabel_cnn", 0.99),
    "regression": ("regression_gn", "regression_cnn", 0.97),
}


def _spec(module: str, name: str) -> str:
    return f"normswap.models.{module}:{name}"


@pytest.mark.parametrize("module", sorted(GN_MODELS))
def test_a_gn_trained_model_of_another_output_kind_folds_every_site_into_the_bn_folded_op_set(module, tmp_path):
    from normswap.pipeline import run_conversion

    gn, bn, bar = GN_MODELS[module]
    res = run_conversion(_spec(module, gn), "fold", calib=_spec(module, "calib"), calib_samples=256,
                         heldout=_spec(module, "heldout"), fold_norms="all", onnx=tmp_path / "gn.onnx")
    assert res.exit_code == 0 and res.verdict.word == "EXPORTED", res.verdict.line
    ops = res.export.op_counts
    assert not any(ops.get(op) for op in NORM_OP_TYPES), ops
    ref = run_conversion(_spec(module, bn), "fold", onnx=tmp_path / "bn.onnx")
    assert set(ops) == set(ref.export.op_counts), (ops, ref.export.op_counts)
    fn = res.to_dict()["fold_norms"]
    assert f"output kind {module}" in fn["output_kind"] and all(s["folded"] for s in fn["sites"])
    calibrated = next(s for s in fn["stages"] if s["stage"] == "calibrated")
    primary = {"multilabel": "label_agreement", "regression": "r2"}[module]
    assert calibrated["agreement"][primary] >= bar, calibrated
    assert fn["readout"]["module"] == {"multilabel": "head", "regression": "head.3"}[module]
    # the verdict quotes the kind's measure, and no argmax of independent labels
    assert fn["measure"] in res.verdict.line and (module != "multilabel" or "top-1" not in res.verdict.line)


def test_auto_keeps_the_instance_norms_of_a_contrast_invariant_net_and_folds_its_groupnorm(tmp_path):
    from normswap.pipeline import run_conversion

    spec = "normswap.models.contrast"
    res = run_conversion(f"{spec}:contrast_in", "fold", calib=f"{spec}:calib", calib_samples=256,
                         heldout=f"{spec}:heldout", onnx=tmp_path / "in.onnx")
    assert res.exit_code == 0 and res.verdict.word == "EXPORTED", res.verdict.line
    by = {s["site"]: s for s in res.to_dict()["fold_norms"]["sites"]}
    assert [n for n, s in by.items() if s["folded"]] == ["c3.1"]
    acts = {a.site: a for a in res.conversion.actions}
    trial = res.to_dict()["fold_norms"]["auto_all"]
    kept_refits = (f"{trial['producers_refit']} producer(s) refit" if trial["producers_refit"] else "no producer refit kept")
    for site in ("stem.1", "c2.1"):
        assert acts[site].action == "kept" and acts[site].reason.startswith("kept as InstanceNorm2d: auto:")
        assert "> --max-drop 0.01" in acts[site].reason and f"(alone: {by[site]['cost']:.4f})" in acts[site].reason
        # auto's second look, naming the refits that model kept
        assert f"; all 3 folded ({kept_refits}, " in acts[site].reason and f") cost {trial['drop']:.4f}" in acts[site].reason
    assert by["stem.1"]["cost"] > 0.2 and by["stem.1"]["sigma_spread"] > 0.5  # the gain and offset it removes
    assert by["c3.1"]["cost"] <= 0.01
    assert trial["affines_alone"] == 1 and not trial["accepted"] and trial["drop"] > 0.2, trial
    assert res.export.op_counts.get("InstanceNormalization") == 2 and not res.export.op_counts.get("GroupNormalization")
    # a bar nothing meets: refused in one line that gives the cheapest site's measured cost and the way out
    with pytest.raises(RewriteError, match=r"nothing was folded: the cheapest site, c3\.1, alone costs 0\.\d{4} "
                                           r"in held-out top-1 agreement > --max-drop 0; to fold it anyway pass --max-drop 0\.\d{4} or --fold-norms c3\.1"):
        run_conversion(f"{spec}:contrast_in", "fold", calib=f"{spec}:calib", calib_samples=256,
                       heldout=f"{spec}:heldout", max_drop=0.0)


def _bundled():
    from normswap.models import contrast, multilabel, regression

    return {"multilabel_gn": (multilabel.multilabel_gn, multilabel.GN_WEIGHTS_PATH, "GroupNorm"),
            "regression_gn": (regression.regression_gn, regression.GN_WEIGHTS_PATH, "GroupNorm"),
            "contrast_in": (contrast.contrast_in, contrast.WEIGHTS_PATH, "InstanceNorm2d")}


@pytest.mark.parametrize("name", ["multilabel_gn", "regression_gn", "contrast_in"])
def test_the_bundled_per_sample_norm_models_are_small_trained_and_match_their_metadata(name):
    import hashlib
    import json

    import torch
    from torch import nn

    build, path, norm = _bundled()[name]
    meta = json.loads(path.with_suffix(".json").read_text())
    assert path.stat().st_size < 500_000 and meta["weights"] == path.name
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    model, fresh = build(), build(pretrained=False)
    assert meta["param_count"] == sum(p.numel() for p in model.parameters())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())  # trained without BN
    assert any(type(m).__name__ == norm for m in model.modules())
    assert not torch.equal(fresh.stem[0].weight, model.stem[0].weight)


def test_the_contrast_nets_instance_norms_are_what_makes_it_work():
    """The jitter is what the InstanceNorms undo: the accuracy is the same with and without it."""
    import torch

    from normswap.models.contrast import contrast_in, load_jittered
    from normswap.models.digits import load_digits

    model = contrast_in()
    xj, y = load_jittered("test")
    x, _ = load_digits("test")
    with torch.no_grad():
        acc = lambda inp: float((model(inp).argmax(1) == y).float().mean())
        assert acc(xj) > 0.98 and acc(x) > 0.98
        assert float(xj.std(dim=(1, 2, 3)).max() / xj.std(dim=(1, 2, 3)).min()) > 8  # a wide range of contrasts
