"""--to fold for per-sample norms: the site search, the fitted affines, their fold, the choice, the verdict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normswap.rewriting.capture import capture
from normswap.errors import InputError, RewriteError
from normswap.rewriting.fold import fold
from normswap.rewriting.layers import FittedAffine, NormAct
from normswap.keep.norm_fit import affine_model, fit_norm_affines, norm_site_names
from normswap.rewriting.norm_sites import norm_family
from normswap.rewriting.sites import NEEDS_CALIBRATION, find_sites

from .helpers import check_fold, same_state, snapshot


def _all_norms() -> nn.Module:
    import timm.layers
    import torchvision.models.convnext as tv_convnext

    from normswap.norms import BatchInstanceNorm, SwitchableNorm
    from normswap.norms.layer import ChannelsLayerNorm

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3, padding=1)
            self.gn = nn.GroupNorm(2, 8)
            self.gna = timm.layers.GroupNormAct(8, 2)
            self.ln2d = timm.layers.LayerNorm2d(8)
            self.tvln = tv_convnext.LayerNorm2d(8)
            self.inorm = nn.InstanceNorm2d(8, affine=True)
            self.lnc = ChannelsLayerNorm(8, spatial_dims=2)
            self.sn = SwitchableNorm(8, spatial_dims=2).eval()
            self.bin = BatchInstanceNorm(8).eval()
            self.wrapped = NormAct(nn.GroupNorm(4, 8), None, nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.ln = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.c(x)
            for m in (self.gn, self.gna, self.ln2d, self.tvln, self.inorm, self.lnc, self.sn, self.bin, self.wrapped):
                x = m(x)
            return self.fc(self.ln(self.pool(x).flatten(1)))

    return M().eval()


def test_site_search_finds_every_norm_family_and_inspect_says_it_needs_data():
    from normswap.rewriting.convert import inspect

    m = _all_norms()
    sites = find_sites(capture(m), every_norm=True)
    assert [s.name for s in sites] == ["gn", "gna", "ln2d", "tvln", "inorm", "lnc", "sn", "bin", "wrapped", "ln"]
    fams = [norm_family(s.module).name for s in sites]
    assert fams == ["group", "group", "layer-channels", "layer-channels", "instance", "layer-channels", "switchable",
                    "batch-instance", "group", "layer"]
    assert find_sites(capture(m)) == []  # the swap pass's BN-only search is unchanged
    rows = inspect(m, (torch.randn(2, 3, 8, 8),), to="fold")
    assert len(rows) == 10 and all(r["action"] == "refuse" and r["reason"] == NEEDS_CALIBRATION for r in rows)
    assert norm_site_names(m) == [s.name for s in sites]


def test_without_calibration_a_norm_only_model_is_refused_not_passed():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU()).eval()
    from normswap.rewriting.convert import rewrite

    with pytest.raises(RewriteError, match="needs calibration data"):
        rewrite(m, "fold", (torch.randn(2, 3, 6, 6),))


class _Mix(nn.Module):
    """Fitted affines at every place a fold can put them: after a conv (into it), after a Linear on
    [N, T, C] (last axis, into it), before a Linear (forward into it), after cat (slice-wise), and one
    between two ReLUs (stays a scale-and-shift)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        r = lambda c: (torch.rand(c, generator=g) * 2 - 1.2, torch.randn(c, generator=g))  # some negative scales
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1, groups=3)
        self.a_cat = FittedAffine(*r(10), source="GroupNorm")
        self.a_conv = FittedAffine(*r(10), source="GroupNorm", act=nn.ReLU())
        self.mid = nn.Conv2d(10, 10, 3, padding=1, groups=2)
        self.a_mid = FittedAffine(*r(10), source="InstanceNorm2d")
        self.lin = nn.Linear(10, 12)
        self.a_last = FittedAffine(*r(12), axis=-1, source="LayerNorm")
        self.a_in = FittedAffine(*r(12), axis=-1, source="LayerNorm")
        self.fc = nn.Linear(12, 5)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a_cat(torch.cat([self.c1(x), self.c2(x)], 1))
        y = self.relu(self.a_mid(self.relu(self.a_conv(self.mid(y)))))
        t = y.flatten(2).transpose(1, 2)  # [N, T, C]
        t = self.relu(self.a_last(self.lin(t)))
        return self.fc(self.a_in(t))


def test_fitted_affines_fold_exactly_wherever_they_sit_sign_axis_and_group_included():
    x = torch.randn(3, 3, 5, 5)
    res = check_fold(_Mix(), x, tol=1e-5)  # fails on a wrong sign, axis or group in the fold arithmetic
    acts = {a.site: a.action for a in res.actions}
    assert acts == {"a_cat": "into-producers", "a_conv": "into-producer", "a_mid": "affine", "a_last": "into-producer",
                    "a_in": "into-consumer"}
    assert sum(isinstance(m, FittedAffine) for m in res.model.modules()) == 1


def _constant_stats_data(n: int = 24) -> list[tuple[torch.Tensor]]:
    """Samples that are spatial permutations of one image: every per-sample statistic of a GroupNorm
    (over C/G and space) is the same in each, so GN is exactly a per-channel affine on them."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, 5, 5, generator=g) * torch.linspace(0.5, 3, 8)[:, None, None] + torch.arange(8.0)[:, None, None]
    xs = torch.stack([base.flatten(1)[:, torch.randperm(25, generator=g)].reshape(8, 5, 5) for _ in range(n)])
    return [(xs[i:i + 8],) for i in range(0, n, 8)]


def test_the_fit_recovers_groupnorms_exact_affine_per_channel_and_group():
    gn = nn.GroupNorm(2, 8)
    with torch.no_grad():
        gn.weight.copy_(torch.linspace(-1.5, 2.0, 8))
        gn.bias.copy_(torch.linspace(0.3, -0.4, 8))
    model = nn.Sequential(gn).eval()
    snap = snapshot(model)
    data = _constant_stats_data()
    fits = fit_norm_affines(model, data)
    assert same_state(model, snap)
    f = fits["0"]
    x = data[0][0][0].double()  # [8, 5, 5]
    groups = x.reshape(2, -1)
    mu, sd = groups.mean(1), (groups.var(1, unbiased=False) + gn.eps).sqrt()
    s = gn.weight.double() / sd.repeat_interleave(4)
    t = gn.bias.double() - mu.repeat_interleave(4) * s
    assert torch.allclose(f.scale, s, rtol=1e-6, atol=1e-7) and torch.allclose(f.shift, t, rtol=1e-6, atol=1e-6)
    assert f.r2 > 1 - 1e-9 and f.spread_sigma < 1e-6 and f.samples == 24
    folded = fold(affine_model(model, fits, ["0"]), (data[0][0],)).model
    assert torch.allclose(folded(data[1][0]), model(data[1][0]), atol=1e-5)


def _style_net() -> nn.Module:
    """Conv → InstanceNorm (its per-sample contrast carries the input's scale away) → GN → head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6)).eval()


def _scaled_data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    return x * torch.exp(torch.randn(n, 1, 1, 1, generator=g) * 1.5) + torch.randn(n, 1, 1, 1, generator=g) * 3


def test_auto_keeps_an_instance_norm_whose_per_sample_statistics_carry_the_signal():
    from normswap.pipeline.fold_norms import fit_and_choose

    m = _style_net()
    # the affines-alone rule (refit=False: no second look with the refits, which on this untrained net's
    # near-constant argmax win everything back through the readout's bias)
    rep = fit_and_choose(m, _scaled_data(256, 0), heldout=_scaled_data(200, 1), max_drop=0.005, refit=False)
    by = {c.fit.name: c for c in rep.choices}
    assert not by["1"].folded and "--max-drop 0.005" in by["1"].reason and by["1"].cost > 0.05
    assert rep.auto_all is None
    assert by["1"].fit.spread_sigma > 0.5  # the per-sample contrast varies a lot
    assert rep.front and len(rep.front) == 2
    assert rep.heldout_samples == 200


def test_fold_norms_names_and_option_rules():
    from normswap.pipeline import run_conversion
    from normswap.pipeline.fold_norms import parse_fold_norms

    assert parse_fold_norms(None) == "auto" and parse_fold_norms("all") == "all"
    assert parse_fold_norms("a, b") == ["a", "b"]
    with pytest.raises(InputError, match="--fold-norms"):
        run_conversion(_style_net(), "fold", fold_norms="all", input_shape=(1, 1, 6, 6))
    with pytest.raises(InputError, match="--save cannot record"):
        run_conversion(_style_net(), "fold", calib=_scaled_data(64, 0), save="/tmp/never-written-normswap",
                       input_shape=(1, 1, 6, 6))
    with pytest.raises(InputError, match="not a per-sample norm site"):
        run_conversion(_style_net(), "fold", calib=_scaled_data(64, 0), fold_norms="nope", input_shape=(1, 1, 6, 6))
    res = run_conversion(_style_net(), "fold", calib=_scaled_data(256, 0), heldout=_scaled_data(100, 1), fold_norms="4",
                         input_shape=(1, 1, 6, 6))
    acts = {a.site: a for a in res.conversion.actions}
    assert acts["4"].action == "into-producer"
    assert acts["1"].action == "kept" and "not named in --fold-norms" in acts["1"].reason
    assert res.verdict.word == "CONVERTED" and "function changed" in res.verdict.line and res.exit_code == 0
    assert isinstance(res.model.get_submodule("1"), nn.InstanceNorm2d)
    assert res.to_dict()["fold_norms"]["sites"][1]["folded"] is True


def test_the_stage_line_gives_the_held_out_count_once():
    """Without --heldout the 20% split is named with its count; the stage line does not repeat it."""
    from rich.console import Console

    from normswap.pipeline import run_conversion

    res = run_conversion(_style_net(), "fold", calib=_scaled_data(200, 0), fold_norms="4", input_shape=(1, 1, 6, 6))
    console = Console(width=400, record=True)
    console.print(res.fitted)
    line = next(ln for ln in console.export_text().splitlines() if ln.startswith("naive "))
    assert "seeded split" in line and line.count(f"{res.fitted.heldout_samples} samples") == 1, line


def test_a_saved_gn_ws_conversion_is_a_model_convert_folds_into_an_onnx_without_norms(tmp_path):
    """The round trip's last step: `normswap convert SAVED_DIR --to fold --calib digits --fold-norms all`."""
    import normswap
    from normswap.export import NORM_OP_TYPES

    from .test_cli import assert_one_line_error, run
    from normswap.pipeline import run_conversion

    saved = tmp_path / "gnws"
    assert run_conversion(to="gn-ws", calib="digits", calib_samples=256, save=saved).exit_code == 0
    conv = normswap.load_conversion(saved)
    res = run_conversion(str(saved), "fold", calib="digits", calib_samples=256, fold_norms="all", onnx=tmp_path / "f.onnx")
    assert res.exit_code == 0 and res.verdict.word == "EXPORTED", res.verdict.line
    assert not any(res.export.op_counts.get(op) for op in NORM_OP_TYPES), res.export.op_counts
    assert set(res.export.op_counts) <= {"Add", "Conv", "Flatten", "Gemm", "GlobalAveragePool", "Relu"}
    # what was folded is the saved model, not the BN original: its held-out agreement is with the GN+WS model
    x = torch.randn(5, 1, 8, 8)
    from normswap.models.digits import digits_resnet

    with torch.no_grad():
        assert not torch.allclose(res.model(x), digits_resnet()(x), atol=1e-3)
    # the fold reproduces the saved GN+WS model's affine-replaced form, not the BN original
    with torch.no_grad():
        assert res.to_dict()["fold_norms"]["sites"] and not torch.equal(res.model(x), conv.model.eval()(x))

    # through the CLI: the note names the saved conversion; refusals are one line, before any work
    p = run("convert", str(saved), "--to", "fold")
    assert p.returncode == 0 and "a saved 'gn-ws' conversion of the bundled digits ResNet" in p.stdout + p.stderr
    assert_one_line_error(run("convert", str(saved), "--to", "gn", "--save", str(tmp_path / "s2")), 2,
                          "cannot record a conversion of the saved conversion")
    assert not (tmp_path / "s2").exists()
    assert_one_line_error(run("convert", str(saved), "--to", "fold", "--arg", "x=1"), 2, "saved conversion that holds its weights")


def test_a_saved_conversion_of_another_model_is_not_built_from_its_record(tmp_path):
    import json

    from normswap.errors import InputError
    from normswap.pipeline import run_conversion
    from normswap.load.saved import CONVERSION_JSON

    saved = tmp_path / "gnws"
    assert run_conversion(to="gn-ws", calib="digits", calib_samples=128, save=saved).exit_code == 0
    rec = json.loads((saved / CONVERSION_JSON).read_text())
    rec["source"] = {"spec": "evil_module:build", "args": {}, "weights": None}
    (saved / CONVERSION_JSON).write_text(json.dumps(rec))
    with pytest.raises(InputError, match="never runs the code it names"):
        run_conversion(str(saved), "fold", calib="digits")


def test_fold_norms_recovery_regroups_into_the_default_recovery_batch(monkeypatch):
    """--recover-steps on --to fold uses recovery's documented default batch (256 samples a step), as
    `convert --recover-steps` does for swaps, unless --recover-batch is given (it used the calibration
    batches as given)."""
    from normswap.defaults import DEFAULT_RECOVER_BATCH
    from normswap.keep import recover as R
    from normswap.pipeline.fold_norms import fit_and_choose

    seen = []

    def fake(teacher, student, batches, **kw):
        seen.append(kw["batch_size"])
        return None

    monkeypatch.setattr(R, "recover", fake)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    data = [(torch.randn(8, 1, 8, 8),) for _ in range(3)]
    held = [(torch.randn(8, 1, 8, 8),)]
    fit_and_choose(m, data, heldout=held, fold_norms="all", recover_steps=1, refit=False)
    fit_and_choose(m, data, heldout=held, fold_norms="all", recover_steps=1, recover_batch=16, refit=False)
    assert seen == [DEFAULT_RECOVER_BATCH, 16]
