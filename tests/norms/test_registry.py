"""The registry: names, refusal reasons, and every target's promises (exact, batch_independent)
checked by measurement on a conv→BN site, plus a short training run per target."""

from __future__ import annotations

import copy
from dataclasses import FrozenInstanceError

import pytest
import torch
from torch import nn

from normswap.norms import (
    TARGETS,
    NormTarget,
    SwapBuild,
    SwapSite,
    bn_state,
    get_target,
    register,
    site_kind,
)
from normswap.norms.frozen import FrozenBatchNorm
from normswap.norms.sync import to_sync_bn

from ._helpers import (
    BN_FOR_RANK,
    CONV_FOR_RANK,
    Head,
    assert_batch_independent,
    assert_fx_traceable,
    make_input,
    onnx_parity,
    rel_err,
    tiny_task,
    train_loss_drops,
    trained_bn,
)

ALL = ["gn-ws", "gn", "ln", "ln-channels", "in", "sn", "bin", "wn", "frozen", "sync", "unsync"]
EXACT = {"bin", "wn", "frozen", "sync", "unsync"}
INDEPENDENT = {"gn-ws", "gn", "ln", "ln-channels", "in", "frozen"}


def test_every_target_is_registered_with_its_promises() -> None:
    assert sorted(TARGETS) == sorted(ALL)
    for name, t in TARGETS.items():
        assert t.name == name and t.summary and "\n" not in t.summary
        assert t.exact == (name in EXACT), name
        assert t.batch_independent == (name in INDEPENDENT), name


def test_get_target_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown norm target 'bogus'; valid: bin, frozen, gn, gn-ws"):
        get_target("bogus")


def test_register_rejects_duplicates_and_unknown_kinds() -> None:
    dup = NormTarget(
        name="gn", summary="x", exact=False, batch_independent=True, build=lambda s: SwapBuild(nn.Identity())
    )
    with pytest.raises(ValueError, match="already registered"):
        register(dup)
    odd = NormTarget(name="odd", summary="x", exact=False, batch_independent=True,
                     build=lambda s: SwapBuild(nn.Identity()), site_kinds=frozenset({"lazy"}))
    with pytest.raises(ValueError, match="unknown site kinds"):
        register(odd)
    assert "odd" not in TARGETS
    with pytest.raises(FrozenInstanceError):
        get_target("gn").exact = True  # type: ignore[misc]


def test_site_kinds() -> None:
    assert site_kind(nn.BatchNorm1d(3)) == "bn" and site_kind(nn.BatchNorm3d(3)) == "bn"
    assert site_kind(nn.SyncBatchNorm(3)) == "sync"
    assert site_kind(FrozenBatchNorm(3)) == "frozen"
    for not_bn in (nn.GroupNorm(1, 3), nn.InstanceNorm2d(3), nn.LayerNorm(3), nn.Conv2d(3, 3, 1)):
        assert site_kind(not_bn) is None
    tv = pytest.importorskip("torchvision.ops.misc")
    assert site_kind(tv.FrozenBatchNorm2d(3)) == "frozen"
    na = pytest.importorskip("timm.layers.norm_act")
    assert site_kind(na.BatchNormAct2d(3)) == "bn"
    assert site_kind(na.FrozenBatchNormAct2d(3)) == "frozen"
    assert site_kind(na.SyncBatchNormAct(3)) == "sync"


def test_bn_state_normalizes_affine_free_and_untracked() -> None:
    s = bn_state(nn.BatchNorm2d(4, affine=False, track_running_stats=False))
    assert torch.equal(s.weight, torch.ones(4)) and torch.equal(s.bias, torch.zeros(4))
    assert s.running_mean is None and not s.track_running_stats
    bn = trained_bn(2, 4)
    s = bn_state(bn)
    assert torch.equal(s.running_var, bn.running_var) and s.running_var is not bn.running_var
    with pytest.raises(ValueError, match="not a BatchNorm"):
        bn_state(nn.GroupNorm(2, 4))


def test_generic_refusals() -> None:
    for name in ALL:
        t = get_target(name)
        bn = nn.SyncBatchNorm(8) if name == "unsync" else trained_bn(2, 8)
        assert "not a BatchNorm" in t.can_swap(SwapSite(bn=nn.GroupNorm(2, 8), num_features=8, spatial_dims=2))
        assert "C=6" in t.can_swap(SwapSite(bn=bn, num_features=6, spatial_dims=2))
        assert "spatial_dims" in t.can_swap(SwapSite(bn=bn, num_features=8, spatial_dims=4))


def test_refusal_table() -> None:
    """Each target's own reasons, one line each."""
    conv = nn.Conv2d(4, 16, 3)
    bn2, bn0 = trained_bn(2, 16), trained_bn(0, 16)
    cases = {
        ("in", 0): "undefined",
        ("bin", 0): "spatial",
        ("gn", 5): "does not divide",
        ("gn-ws", "dw1x1"): "1-element filter",
        ("wn", None): "none",
        ("frozen", "nostats"): "running statistics",
        ("frozen", "frozen"): "not to a frozen site",
        ("unsync", "bn"): "sync site",
        ("sync", "sync"): "bn site",
    }
    for (name, what), needle in cases.items():
        t = get_target(name)
        if what == 0:
            site = SwapSite(bn=bn0, num_features=16, spatial_dims=0, producer=nn.Linear(3, 16))
        elif what == 5:
            site = SwapSite(bn=bn2, num_features=16, spatial_dims=2, groups=5)
        elif what == "dw1x1":
            site = SwapSite(bn=bn2, num_features=16, spatial_dims=2, producer=nn.Conv2d(16, 16, 1, groups=16))
        elif what == "nostats":
            site = SwapSite(bn=nn.BatchNorm2d(16, track_running_stats=False), num_features=16, spatial_dims=2)
        elif what == "frozen":
            site = SwapSite(bn=FrozenBatchNorm(16), num_features=16, spatial_dims=2)
        elif what == "sync":
            site = SwapSite(bn=nn.SyncBatchNorm(16), num_features=16, spatial_dims=2)
        else:
            site = SwapSite(bn=bn2, num_features=16, spatial_dims=2, producer=None if name == "wn" else conv)
        reason = t.can_swap(site)
        assert reason is not None and needle in reason, (name, what, reason)
        assert "\n" not in reason
        with pytest.raises(ValueError, match=f"to '{name}'"):
            t.swap(site)


def _site(name: str, spatial_dims: int, c: int = 16, c_in: int = 3):
    torch.manual_seed(0)
    producer = nn.Linear(c_in, c) if spatial_dims == 0 else CONV_FOR_RANK[spatial_dims](c_in, c, 3, padding=1)
    bn = BN_FOR_RANK[spatial_dims](c)
    # a briefly trained BN: running statistics that match the data, γ/β not at their init
    x, _ = tiny_task(spatial_dims, c_in)
    bn.train()
    with torch.no_grad():
        for _ in range(20):
            bn(producer(x))
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    bn.eval()
    if name == "unsync":
        bn = to_sync_bn(bn).eval()
    return SwapSite(bn=bn, num_features=c, spatial_dims=spatial_dims, producer=producer), producer, bn


CASES = [(n, sd) for n in ALL for sd in (0, 1, 2, 3) if not (sd == 0 and n in {"in", "bin"})]


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_build_keeps_promises(name: str, spatial_dims: int) -> None:
    t = get_target(name)
    site, producer, bn = _site(name, spatial_dims)
    before = {k: v.clone() for k, v in {**bn.state_dict(), **producer.state_dict()}.items()}
    assert t.can_swap(site) is None
    build = t.swap(site)
    # nothing of the caller's is mutated or shared
    for k, v in {**bn.state_dict(), **producer.state_dict()}.items():
        assert torch.equal(v, before[k]), k
    new_producer = build.producer if build.producer is not None else copy.deepcopy(producer)
    own = set(map(id, list(bn.parameters()) + list(producer.parameters())))
    assert not own & set(map(id, list(build.norm.parameters()) + list(new_producer.parameters())))
    assert build.norm.training == bn.training
    pair = nn.Sequential(new_producer, build.norm).eval()
    x, _ = tiny_task(spatial_dims)
    with torch.no_grad():
        ref = bn(producer(x))
        out = pair(x)
    assert out.shape == ref.shape
    if t.exact:
        assert rel_err(out, ref) <= 1e-5, name
    # batch independence in training mode, as declared (measured on a batch of 8)
    assert_batch_independent(copy.deepcopy(pair), make_input(8, 3, spatial_dims), independent=t.batch_independent)


@pytest.mark.parametrize("name", ALL)
def test_a_few_steps_lower_the_loss(name: str) -> None:
    spatial_dims = 0 if name in {"wn", "frozen", "sync", "unsync", "ln"} else 2
    site, _, _ = _site(name, spatial_dims)
    build = get_target(name).swap(site)
    producer = build.producer if build.producer is not None else copy.deepcopy(site.producer)
    torch.manual_seed(1)
    model = Head(producer, build.norm, 16)
    x, y = tiny_task(spatial_dims)
    first, last = train_loss_drops(model, x, y)
    assert last < 0.8 * first, (name, first, last)


@pytest.mark.parametrize("name", ALL)
def test_onnx_parity_of_each_built_pair(name: str) -> None:
    site, _, _ = _site(name, 2)
    build = get_target(name).swap(site)
    producer = build.producer if build.producer is not None else copy.deepcopy(site.producer)
    mods = [m.export_form() if hasattr(m, "export_form") else m for m in (producer, build.norm)]
    onnx_parity(nn.Sequential(*mods).eval(), tiny_task(2)[0][:2])


def test_timm_and_torchvision_sites() -> None:
    na = pytest.importorskip("timm.layers.norm_act")
    tv = pytest.importorskip("torchvision.ops.misc")
    ref = trained_bn(2, 32)
    sd = {k: v for k, v in ref.state_dict().items() if k != "num_batches_tracked"}
    bna = na.BatchNormAct2d(32, act_layer=nn.ReLU).eval()
    bna.load_state_dict(ref.state_dict())
    tvf = tv.FrozenBatchNorm2d(32)
    tvf.load_state_dict(sd)
    x = make_input(2, 32, 2)
    for bn in (bna, tvf):
        for name in ("gn", "sn", "bin", "frozen"):
            site = SwapSite(bn=bn, num_features=32, spatial_dims=2)
            if get_target(name).can_swap(site) is not None:
                assert name == "frozen" and bn is tvf
                continue
            norm = get_target(name).swap(site).norm
            assert not hasattr(norm, "act")  # the act is the swap pass's to keep
            assert torch.equal(norm.weight, ref.weight) and torch.equal(norm.bias, ref.bias)
            if name in ("bin", "frozen"):
                with torch.no_grad():
                    assert rel_err(norm.eval()(x), ref(x)) <= 1e-5


@pytest.mark.parametrize(("name", "spatial_dims"), [c for c in CASES if c[1] in (0, 2)])
def test_built_modules_copy_reload_and_fx_trace(name: str, spatial_dims: int) -> None:
    site, _, _ = _site(name, spatial_dims)
    build = get_target(name).swap(site)
    producer = build.producer if build.producer is not None else copy.deepcopy(site.producer)
    pair = nn.Sequential(producer, build.norm).eval()
    x = tiny_task(spatial_dims)[0][:4]
    with torch.no_grad():
        ref = pair(x)
        clone = copy.deepcopy(pair)
        assert torch.equal(clone(x), ref)
        fresh = copy.deepcopy(pair)
        for p in fresh.parameters():
            p.add_(1.0)
        fresh.load_state_dict(pair.state_dict())
        assert torch.equal(fresh(x), ref)
        assert_fx_traceable(pair, x, ref)
