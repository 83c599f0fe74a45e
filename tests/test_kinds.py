"""Output kinds (normswap.keep.kinds), the readout refit through a link, held-out splits and calibration's
held-out never-worse check (issue 12)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normswap
from normswap.keep import kinds
from normswap.keep.calibrate import agreement, calibrate
from normswap.errors import InputError
from normswap.keep.heldout import split_heldout
from normswap.models.digits import load_digits

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


# ----------------------------------------------------------------------------------- detection


@pytest.mark.parametrize("make,want", [
    (lambda g: torch.randn(16, 10, generator=g) * 3, "logits"),
    (lambda g: torch.softmax(torch.randn(16, 10, generator=g), 1), "probabilities"),
    (lambda g: torch.sigmoid(torch.randn(16, 5, generator=g)), "multilabel"),
    (lambda g: torch.sigmoid(torch.randn(16, 1, generator=g)), "multilabel"),
    (lambda g: torch.randn(16, 1, generator=g) * 5 + 3, "regression"),
    (lambda g: torch.randn(16, 8, 4, generator=g), "regression"),
    (lambda g: torch.randn(4, 6, 8, 8, generator=g), "dense"),
    (lambda g: torch.rand(4, 1, 8, 8, generator=g), "regression"),
])
def test_kind_detection(make, want):
    t = make(torch.Generator().manual_seed(0))
    name, why = kinds.detect_kind(t)
    assert name == want, (name, why)


def test_structured_outputs_override_and_model_attribute():
    g = torch.Generator().manual_seed(0)
    out = {"cls": torch.randn(8, 4, generator=g), "box": torch.randn(8, 4, generator=g) * 10, "p": torch.rand(8, 3, generator=g)}
    o = kinds.outputs_for(out)
    assert [k.name for k in o.kinds] == ["logits", "logits", "multilabel"] and o.primary == "top1_agreement"
    assert o.paths == ["['cls']", "['box']", "['p']"]
    o = kinds.outputs_for(out, "regression")
    assert {k.name for k in o.kinds} == {"regression"} and o.source == "given"

    class Declares(nn.Linear):
        normswap_output_kind = "regression"

    assert kinds.outputs_for(torch.randn(4, 3), model=Declares(2, 3)).kind.name == "regression"
    with pytest.raises(InputError, match="not an output kind; choose from: logits"):
        kinds.check_name("softmax")
    # every measure of a structured output: the first keeps its names, the others are prefixed
    m = kinds.Meter(o)
    m.add(out, {k: v + 0.01 for k, v in out.items()})
    r = m.result()
    assert set(r) == {"r2", "['box'].r2", "['p'].r2", "rel_err"} and r.quality == r["r2"] > 0.99


# ----------------------------------------------------------------------------------- losses vs hand computation


def test_losses_against_hand_computation():
    g = torch.Generator().manual_seed(1)
    T = 2.0
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    # logits: T²·KL(softmax(t/T) ‖ softmax(s/T)), summed over classes, mean over samples
    pt, ps = torch.softmax(t / T, 1), torch.softmax(s / T, 1)
    want = float((pt * (pt.log() - ps.log())).sum(1).mean()) * T * T
    assert float(kinds.get("logits").loss(s, t, T)) == pytest.approx(want, rel=1e-5)
    # probabilities: the same KL on log p (softmax is shift invariant: the logits' KL)
    assert float(kinds.get("probabilities").loss(torch.softmax(s, 1), torch.softmax(t, 1), T)) == pytest.approx(want, rel=1e-4)
    # multilabel: T²·Σ binary KL(q_t ‖ q_s) with q = sigmoid(logit(p)/T), mean over samples
    qs, qt = torch.sigmoid(s / T), torch.sigmoid(t / T)
    bkl = qt * (qt.log() - qs.log()) + (1 - qt) * ((1 - qt).log() - (1 - qs).log())
    want_ml = float(bkl.sum(1).mean()) * T * T
    got_ml = float(kinds.get("multilabel").loss(torch.sigmoid(s), torch.sigmoid(t), T))
    assert got_ml == pytest.approx(want_ml, rel=1e-4)
    # ... safe at saturation: a probability of exactly 0 or 1 is clamped, never log(0)
    sat = torch.tensor([[0.0, 1.0, 0.5]])
    assert math.isfinite(float(kinds.get("multilabel").loss(sat, torch.tensor([[1.0, 0.0, 0.5]]), 1.0)))
    # regression: mean squared error over the original's per-output variance (over the batch)
    var = t.var(0, unbiased=False)
    assert float(kinds.get("regression").loss(s, t, T)) == pytest.approx(float(((s - t) ** 2 / var).mean()), rel=1e-5)
    # dense: per-pixel KL over C, mean over pixels
    sd, td = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    ls, lt = F.log_softmax(sd / T, 1), F.log_softmax(td / T, 1)
    want_d = float((lt.exp() * (lt - ls)).sum(1).mean()) * T * T
    assert float(kinds.get("dense").loss(sd, td, T)) == pytest.approx(want_d, rel=1e-5)
    for name in kinds.KIND_NAMES:  # zero at a perfect match
        x = {"logits": t, "probabilities": torch.softmax(t, 1), "multilabel": torch.sigmoid(t), "peaked": torch.sigmoid(t),
                 "regression": t, "dense": td}[name]
        assert abs(float(kinds.get(name).loss(x, x, T))) < 1e-5, name


def _measure(kind: str, ref, out, batches: int = 2):
    m = kinds.Meter(kinds.outputs_for(ref, kind))
    n = ref.shape[0] // batches
    for i in range(batches):  # streamed: the same as all at once
        m.add(ref[i * n:(i + 1) * n], out[i * n:(i + 1) * n])
    return m.result()


def test_measures_against_hand_computation():
    g = torch.Generator().manual_seed(2)
    r, o = torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g)
    rel = float((o - r).norm() / r.norm())
    got = _measure("logits", r, o)
    near = float(((r.argmax(1) - o.argmax(1)).abs() <= 1).double().mean())
    assert got == pytest.approx({"top1_agreement": float((r.argmax(1) == o.argmax(1)).double().mean()), "top1_within": near,
                                 "rel_err": rel})
    assert got.n == 40
    pr, po = torch.sigmoid(r), torch.sigmoid(o + 0.5 * r)
    got = _measure("multilabel", pr, po)
    assert got["label_agreement"] == pytest.approx(float(((pr > 0.5) == (po > 0.5)).double().mean()))
    assert got["mae"] == pytest.approx(float((pr - po).abs().mean()), rel=1e-6) and got.primary == "label_agreement"
    y = r[:, :2] * 3 + 1
    yhat = y + 0.3 * o[:, :2]
    got = _measure("regression", y, yhat)
    sst = float(((y - y.mean(0)) ** 2).sum())
    assert got["r2"] == pytest.approx(1 - float(((yhat - y) ** 2).sum()) / sst, rel=1e-6) and got.quality == got["r2"]
    dr, do = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    got = _measure("dense", dr, do)
    a, b = dr.argmax(1), do.argmax(1)
    ious = [float(((a == c) & (b == c)).sum()) / float(((a == c) | (b == c)).sum()) for c in range(3)]
    assert got["pixel_agreement"] == pytest.approx(float((a == b).double().mean()))
    assert got["miou"] == pytest.approx(sum(ious) / 3, rel=1e-9)


# ----------------------------------------------------------------------------------- held-out split


def test_heldout_split_is_deterministic_disjoint_and_complete():
    x = torch.arange(103.0).reshape(103, 1)
    data = normswap.calibration_batches(x, batch=16)
    a, b = split_heldout(data, 0.2, seed=3), split_heldout(data, 0.2, seed=3)
    cal = torch.cat([t[0] for t in a.calib]).flatten()
    held = torch.cat([t[0] for t in a.heldout]).flatten()
    assert len(held) == a.heldout_samples == 21 and len(cal) == a.calib_samples == 82
    assert set(cal.tolist()).isdisjoint(held.tolist()) and sorted(cal.tolist() + held.tolist()) == list(range(103))
    assert torch.equal(held, torch.cat([t[0] for t in b.heldout]).flatten())  # same seed, same split
    assert torch.equal(held, torch.cat([t[0] for t in a.heldout]).flatten())  # re-iterable
    assert [len(t[0]) for t in a.calib] == [16] * 5 + [2]  # the data's batch size kept
    other = torch.cat([t[0] for t in split_heldout(data, 0.2, seed=4).heldout]).flatten()
    assert not torch.equal(held, other)
    # the split does not depend on the batch boundaries
    again = torch.cat([t[0] for t in split_heldout(normswap.calibration_batches(x, batch=7), 0.2, seed=3).heldout]).flatten()
    assert torch.equal(held, again)
    assert "20% of the calibration data held out (seeded split, seed 3, 21 samples)" == a.describe()
    # unknown size (an iterator of batches): a seeded hash of the sample index, still disjoint
    gen = split_heldout([x[i:i + 10] for i in range(0, 103, 10)], 0.2, seed=0)
    h2 = torch.cat([t[0] for t in gen.heldout]).flatten().tolist()
    c2 = torch.cat([t[0] for t in gen.calib]).flatten().tolist()
    assert set(h2).isdisjoint(c2) and len(h2) + len(c2) == 103
    with pytest.raises(InputError, match="at least 2"):
        split_heldout(normswap.calibration_batches(x[:1]))


# ----------------------------------------------------------------------------------- readout through a link


class _Sigmoid(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = head

    def forward(self, x):
        return torch.sigmoid(self.head(self.features(x)))


def test_readout_refit_through_sigmoid_recovers_a_known_linear():
    """The original's features are the student's (an exact swap); only the head differs. Refit in
    logit space recovers the original's Linear exactly (ridge off)."""
    torch.manual_seed(0)
    teacher = _Sigmoid(nn.Linear(6, 3)).eval()
    with torch.no_grad():
        teacher.head.weight.mul_(3)
    conv = normswap.rewrite(teacher, "frozen", (torch.zeros(2, 1, 8, 8),))  # exact: identical features
    with torch.no_grad():
        conv.model.head.weight.normal_()
        conv.model.head.bias.normal_()
    x = torch.randn(64, 1, 8, 8)
    rep = calibrate(teacher, conv.model, [x[:32], x[32:]], readout=True, readout_ridge=0.0)
    # exact targets have nothing to fit, but a readout refit was asked for: the head is found through sigmoid
    assert rep.readout["link"] == "sigmoid" and rep.readout["module"] == "head" and rep.readout["refit"]
    assert torch.allclose(conv.model.head.weight, teacher.head.weight, atol=1e-4)
    assert torch.allclose(conv.model.head.bias, teacher.head.bias, atol=1e-4)
    assert rep.readout["rel_after"] < 1e-5 < rep.readout["rel_before"]


def test_readout_through_softmax_and_pointwise_conv_and_the_reason_when_none():
    from normswap.keep.calibrate.readout import LINKS, _ReadoutProbe

    class Seg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(2, 4, 3, padding=1)
            self.cls = nn.Conv2d(4, 3, 1)

        def forward(self, x):
            return torch.softmax(self.cls(torch.relu(self.body(x))), 1)

    m = Seg().eval()
    probe = _ReadoutProbe(m)
    with torch.no_grad():
        name, x, link = probe.find(m(torch.randn(2, 2, 5, 5)))
    probe.remove()
    assert name == "cls" and link is LINKS["softmax"] and x.shape == (2, 4, 5, 5)

    class NoHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x).cumsum(1)

    m2 = NoHead()
    probe = _ReadoutProbe(m2)
    with torch.no_grad():
        assert probe.find(m2(torch.randn(3, 4))) == (None, None, None)
    probe.remove()
    assert probe.why.startswith("no readout to refit: the output [3, 4] is not a Linear / 1×1 conv followed by a fixed link")


# ----------------------------------------------------------------------------------- never worse on held-out data


def test_calibration_never_increases_the_heldout_loss_at_any_site(original):
    """Four calibration samples of one digit: per-site fits that hurt elsewhere. Every decision of the
    check keeps the lower held-out loss, so it never rises — at any site, or overall vs the naive swap."""
    x, y = load_digits("train")
    xt, _ = load_digits("test")
    cal = x[y == 3][:4]
    conv = normswap.rewrite(original, "gn-ws", (x[:2],))
    rep = calibrate(original, conv, [cal], heldout=[xt], heldout_name="digits test")
    h = rep.heldout
    assert h["checked"] and h["loss_fitted"] > h["loss_naive"]  # the naive fit hurts here
    assert h["loss_after"] <= h["loss_naive"] and h["loss_after"] <= h["loss_fitted"]
    losses = [h["loss_fitted"]]
    for step in h["trace"]:
        assert step["kept"] == ("previous" if step["previous"] < step["fitted"] else "fitted")
        losses.append(min(step["previous"], step["fitted"]))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:]))  # never up, at any site
    kept = rep.kept_previous_sites
    assert kept and all(s.note and "kept the previous ones" in s.note for s in rep.sites if s.site in kept)
    # the reported held-out measures are those of the model as it was left
    assert agreement(original, conv.model, xt)["top1_agreement"] == pytest.approx(h["after"]["top1_agreement"])
    assert any("kept their previous parameters" in w for w in rep.warnings)
    json.dumps(rep.to_dict())


def test_gn_advice_names_a_better_alternative_with_numbers(original):
    """Where GroupNorm cannot match (low R²), the report computes what LayerNorm / other group counts
    reach at the same sites and names the better one."""
    conv = normswap.rewrite(original, "gn", (torch.zeros(2, 1, 8, 8),))
    rep = calibrate(original, conv, normswap.calibration_batches("digits", samples=128, batch=64))
    advice = [w for w in rep.warnings if w.startswith("GroupNorm cannot match")]
    assert advice and "reaches R²" in advice[0] and ("--to ln" in advice[0] or "--groups" in advice[0])
    assert any("alternatives_r2" in s.extra for s in rep.sites)


# ----------------------------------------------------------------------------------- a sigmoid model end to end


@pytest.fixture(scope="module")
def multilabel_model():
    """A tiny BN CNN with a sigmoid head on digits attributes (even, ≥ 5), trained for a moment."""
    torch.manual_seed(0)
    x, y = load_digits("train")
    t = torch.stack([(y % 2 == 0), (y >= 5)], 1).float()
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(8),
                      nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(16, 2), nn.Sigmoid())
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for step in range(40):
        i = torch.randint(0, len(x), (32,))
        loss = F.binary_cross_entropy(m(x[i]), t[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def test_keep_function_on_a_sigmoid_model_holds_out_and_measures_its_kind(multilabel_model):
    from normswap.keep.recover import keep_function

    m = multilabel_model
    data = normswap.calibration_batches(load_digits("train")[0][:320], batch=64)
    conv = normswap.rewrite(m, "ln", (torch.zeros(2, 1, 8, 8),))
    rep = keep_function(m, conv, data, progress=False)  # no held-out set: 20% of the data held out
    assert rep.evaluated_on == "20% of the calibration data held out (seeded split, seed 0, 64 samples)"
    assert rep.output_kind.startswith("output kind multilabel, detected")
    naive, cal = rep.stage("naive").agreement, rep.stage("calibrated").agreement
    assert set(cal) == {"label_agreement", "mae", "top1_agreement", "top1_within", "rel_err"} and cal.quality == cal["label_agreement"]
    assert cal["mae"] < naive["mae"] and cal["label_agreement"] >= naive["label_agreement"]
    assert rep.calibration.readout["link"] == "sigmoid" and rep.calibration.samples == 256
    assert rep.calibration.heldout["after"]["label_agreement"] == pytest.approx(cal["label_agreement"])
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(rep)
    text = console.export_text()
    assert "label agreement" in text and "held-out" in text
    json.dumps(rep.to_dict())


def test_cli_output_kind_is_checked_before_work(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    r = CliRunner().invoke(app, ["convert", "--to", "gn", "--calib", "digits", "--output-kind", "softmax"])
    assert r.exit_code == 2 and "--output-kind 'softmax' is not an output kind" in r.output
    r = CliRunner().invoke(app, ["compare", "--targets", "gn", "--heldout", "digits", "--no-latency"])
    assert r.exit_code == 2 and "--heldout measures calibration" in r.output
    r = CliRunner().invoke(app, ["compare", "--targets", "gn", "--calib", "normswap.models.digits:nothing",
                                 "--heldout", "normswap.models.digits:nothing", "--no-latency"])
    assert r.exit_code == 2 and "is the --calib data itself" in r.output
