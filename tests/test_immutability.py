"""normswap never mutates the caller's model.

Property: whatever state the caller's model is in — train mode, eval mode, or a *mixed* state where
some submodules train and others do not, with some parameters frozen and forward hooks registered —
``rewrite``/``convert`` (every target), ``inspect``, ``compare_targets`` and
``checks.batch_independence`` leave every observable piece of it as it was:

* every parameter and buffer: object identity, value (bitwise), dtype, ``requires_grad``, ``.grad``
  and the in-place version counter (so a "change and restore" of running statistics shows too);
* every submodule: identity, place in the tree, ``training`` flag, forward hooks and forward
  pre-hooks (count, order and identity), BN ``num_batches_tracked``;
* nothing registered globally (module-level hooks) and the grad mode.

And the result shares no mutable state with the caller's model: training it, editing its weights
in place or registering hooks on it leaves the caller's model as it was.

Families: the bundled digits ResNet, torchvision resnet18 and mobilenet_v2, timm lcnet_035
(BatchNormAct2d), and a hand-built model (shared conv output, BN after an add, frozen BN, a Linear
called twice, Linear -> BatchNorm1d), also with SyncBatchNorm (for ``unsync``); every BN gets random
running statistics and affine parameters. The family × target × mode cases are parametrized (the
frozen parameters, hooks and mixed flags fixed per case); on the cheap families hypothesis also
draws the operation, target, mode, mixed flags, frozen parameters and hook placements.
"""

from __future__ import annotations

import functools
import random
import zlib
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import normswap
from normswap.checks import batch_independence
from normswap.errors import InputError, ParityError, RewriteError
from tests.helpers import randomize_bn

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

MODES = ("train", "eval", "mixed")


# ---- model families -------------------------------------------------------------------------------

class HandBuilt(nn.Module):
    """A conv output used twice (BN path + side branch), a BN after a residual add, a frozen BN,
    a Linear used at two places, and a Linear -> BatchNorm1d head."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops.misc import FrozenBatchNorm2d

        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_stem = nn.BatchNorm2d(8)          # stem output also feeds `side`
        self.side = nn.Conv2d(8, 8, 1)
        self.bn_add = nn.BatchNorm2d(8)           # after the add
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.frozen = FrozenBatchNorm2d(16)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(16, 12)
        self.bn_fc = nn.BatchNorm1d(12)           # Linear -> BatchNorm1d on [N, C]
        self.mix = nn.Linear(12, 12)              # called twice
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = torch.relu(self.bn_stem(s)) + self.side(s)
        y = self.bn_add(y)
        y = self.frozen(torch.relu(self.bn2(self.conv2(y))))
        y = self.bn_fc(self.fc(self.drop(y.mean((2, 3)))))
        y = self.mix(torch.relu(self.mix(y)))
        return self.head(y)


def _handbuilt_sync() -> nn.Module:  # SyncBatchNorm sites (what `unsync` rewrites), on CPU
    return nn.SyncBatchNorm.convert_sync_batchnorm(HandBuilt())


def _digits() -> nn.Module:
    return normswap.load_model(None).model


def _resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def _mobilenet_v2() -> nn.Module:
    return torchvision.models.mobilenet_v2(num_classes=7, width_mult=0.35)


def _timm_lcnet() -> nn.Module:  # timm BatchNormAct2d everywhere
    return timm.create_model("lcnet_035", num_classes=5)


FAMILIES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "digits": (_digits, (2, 1, 8, 8)),
    "resnet18": (_resnet18, (1, 3, 32, 32)),
    "mobilenet_v2": (_mobilenet_v2, (2, 3, 32, 32)),
    "timm_lcnet": (_timm_lcnet, (2, 3, 32, 32)),
    "handbuilt": (HandBuilt, (2, 3, 8, 8)),
    "handbuilt_sync": (_handbuilt_sync, (2, 3, 8, 8)),
}


@functools.lru_cache(maxsize=None)
def _pristine(family: str) -> nn.Module:
    """One built model per family (building resnet18/timm models is the slow part); tests get a
    deep copy, so no test sees another's state."""
    torch.manual_seed(0)
    return randomize_bn(FAMILIES[family][0]().eval(), seed=1)


def _noop_hook(*args: Any) -> None:
    return None


def _pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
    return None


def prepare(family: str, mode: str, rnd: random.Random) -> nn.Module:
    """A fresh copy of the family's model in ``mode`` ("mixed": each submodule's flag drawn),
    with some parameters frozen, some hooks registered and some ``.grad`` set."""
    import copy

    model = copy.deepcopy(_pristine(family))
    model.train(mode == "train")
    mods = list(model.modules())
    if mode == "mixed":
        for m in mods:
            m.training = rnd.random() < 0.5
        if len({m.training for m in mods}) == 1:  # both flags present whatever was drawn
            m = rnd.choice(mods)
            m.training = not m.training
    params = list(model.parameters())
    for p in rnd.sample(params, k=max(1, len(params) // 4)):
        p.requires_grad_(False)
    trainable = [p for p in params if p.requires_grad]
    for p in rnd.sample(trainable, k=min(2, len(trainable))):  # an in-progress backward's grads
        p.grad = torch.randn_like(p)
    for m in rnd.sample(mods, k=min(4, len(mods))):
        m.register_forward_hook(_noop_hook)
        m.register_forward_pre_hook(_pre_hook)
    return model


# ---- the snapshot ---------------------------------------------------------------------------------

def _hooks(d: dict) -> list[tuple[int, int]]:
    return [(k, id(h)) for k, h in d.items()]


_PLAIN = (bool, int, float, str, tuple, type(None))


def _plain_attrs(m: nn.Module) -> tuple[list[str], dict[str, Any]]:
    """Every instance attribute's name (nothing added or removed), and the value of the plain ones
    (``eps``, ``momentum``, ``inplace``, ``stride``...)."""
    return sorted(vars(m)), {k: v for k, v in vars(m).items() if isinstance(v, _PLAIN) and k != "training"}


def snapshot(model: nn.Module) -> dict[str, Any]:
    from torch.nn.modules import module as M

    mods = []
    for name, m in model.named_modules(remove_duplicate=False):
        mods.append((
            name, id(m), type(m), m.training,
            _hooks(m._forward_hooks), _hooks(m._forward_pre_hooks),
            sorted(m._forward_hooks_with_kwargs), sorted(m._forward_pre_hooks_with_kwargs),
            _hooks(m._backward_hooks), _hooks(m._backward_pre_hooks),
            [(k, id(v)) for k, v in m._modules.items()],
            [(k, id(v)) for k, v in m._parameters.items()],
            [(k, id(v)) for k, v in m._buffers.items()],
            sorted(m._non_persistent_buffers_set),
            _plain_attrs(m),
        ))

    def tensors(items):
        return [
            (n, id(t), t.dtype, t.device, t.requires_grad, t._version, t.detach().clone(),
             None if t.grad is None else (id(t.grad), t.grad.detach().clone()))
            for n, t in items
        ]

    return {
        "modules": mods,
        "params": tensors(model.named_parameters(remove_duplicate=False)),
        "buffers": tensors(model.named_buffers(remove_duplicate=False)),
        "nbt": {n: int(b) for n, b in model.named_buffers() if n.endswith("num_batches_tracked")},
        "global_hooks": (len(M._global_forward_hooks), len(M._global_forward_pre_hooks),
                         len(M._global_backward_hooks)),
        "grad_enabled": torch.is_grad_enabled(),
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any], what: str) -> None:
    after = snapshot(model)
    assert after["grad_enabled"] == before["grad_enabled"], f"{what}: grad mode changed"
    assert after["global_hooks"] == before["global_hooks"], f"{what}: left a global hook behind"
    assert after["nbt"] == before["nbt"], f"{what}: num_batches_tracked changed"
    for a, b in zip(after["modules"], before["modules"], strict=True):
        name = a[0] or "<root>"
        assert a[:3] == b[:3], f"{what}: module {name} replaced"
        assert a[3] == b[3], f"{what}: {name}.training flipped {b[3]} -> {a[3]}"
        assert a[4:10] == b[4:10], f"{what}: hooks of {name} changed"
        assert a[10:14] == b[10:14], f"{what}: children/parameters/buffers of {name} re-registered"
        assert a[14] == b[14], f"{what}: attributes of {name} changed"
    for kind in ("params", "buffers"):
        for a, b in zip(after[kind], before[kind], strict=True):
            n = a[0]
            assert a[1] == b[1], f"{what}: {kind[:-1]} {n} replaced by another object"
            assert a[2:4] == b[2:4], f"{what}: dtype/device of {n} changed"
            assert a[4] == b[4], f"{what}: requires_grad of {n} changed"
            assert torch.equal(a[6], b[6]), f"{what}: value of {n} changed"
            assert a[5] == b[5], f"{what}: {n} was modified in place (version {b[5]} -> {a[5]})"
            assert (a[7] is None) == (b[7] is None), f"{what}: .grad of {n} set/cleared"
            if a[7] is not None:
                assert a[7][0] == b[7][0] and torch.equal(a[7][1], b[7][1]), f"{what}: .grad of {n} changed"


def assert_not_aliased(original: nn.Module, before: dict[str, Any], result: nn.Module, what: str) -> None:
    """Using the result — train/eval, hooks, in-place weight edits, freezing — must not reach the
    caller's model (the result may not share modules, tensors or hook tables with it)."""
    own = {id(t) for t in original.parameters()} | {id(t) for t in original.buffers()}
    own_mods = {id(m) for m in original.modules()}
    for name, m in result.named_modules():
        assert id(m) not in own_mods, f"{what}: result module {name} is the caller's module"
    for name, t in [*result.named_parameters(), *result.named_buffers()]:
        assert id(t) not in own, f"{what}: result tensor {name} is the caller's"
    handles = []
    for m in result.modules():
        handles.append(m.register_forward_hook(_noop_hook))
        handles.append(m.register_forward_pre_hook(_pre_hook))
    result.train()
    result.eval()
    with torch.no_grad():
        for t in [*result.parameters(), *result.buffers()]:
            if t.is_floating_point():
                t.add_(1.0)
    for p in result.parameters():
        p.requires_grad_(not p.requires_grad)
    try:
        assert_unchanged(original, before, f"{what} (then using the result)")
    finally:
        for h in handles:
            h.remove()


def _inputs(family: str) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(FAMILIES[family][1], generator=g),)


def _groups(family: str, to: str) -> int | None:
    # GroupNorm's default 32 groups do not divide the small models' channel counts
    return 4 if to in ("gn", "gn-ws") and family != "digits" else None


FAMILY_IDS = list(FAMILIES)
TARGETS = list(normswap.targets())
SMALL = ("digits", "handbuilt", "handbuilt_sync")  # cheap: every target in every mode
# the bigger families (per-module Python overhead: deepcopy, tracing, snapshots) get every target
# in the mixed state, and every mode for the fold (the only pass that shares the caller's layers
# with its work copy) and for swaps with different builders (a producer reparameterization, an
# exact BN-path target, a plain norm)
BIG_ALL_MODES = ("fold", "gn-ws", "wn", "bin", "ln")


def _rewrite_cases() -> list[tuple[str, str, str]]:
    cases = []
    for family in FAMILY_IDS:
        for to in TARGETS:
            for mode in MODES:
                if family in SMALL or mode == "mixed" or to in BIG_ALL_MODES:
                    cases.append((family, to, mode))
    return cases


def _rnd(*case: str) -> random.Random:
    """The parametrized cases' draws (mixed flags, frozen parameters, hooked modules): fixed per
    case, different between cases."""
    return random.Random(zlib.crc32("-".join(case).encode()))


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


# ---- rewrite / convert ----------------------------------------------------------------------------

@pytest.mark.parametrize(("family", "to", "mode"), _rewrite_cases())
def test_rewrite_leaves_the_model_alone(family: str, to: str, mode: str) -> None:
    model = prepare(family, mode, _rnd(family, to, mode))
    before = snapshot(model)
    try:
        conv = normswap.rewrite(model, to, _inputs(family), groups=_groups(family, to))
    except (InputError, RewriteError):
        assert_unchanged(model, before, f"rewrite(to={to!r}) that raised")
        return
    except ParityError:  # an exact rewrite must verify; still, raising must not mutate either
        assert_unchanged(model, before, f"rewrite(to={to!r}) that raised")
        raise
    assert_unchanged(model, before, f"rewrite(to={to!r})")
    assert_not_aliased(model, before, conv.model, f"rewrite(to={to!r})")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["resnet18", "handbuilt"])
def test_convert_fold_keeps_unfolded_layers_training_flag(family: str, mode: str) -> None:
    """The reported bug: fold's final ``.eval()`` ran while the caller's unfolded layers (resnet18's
    ``fc``) were still shared, flipping their ``training`` flag."""
    model = prepare(family, mode, _rnd("convert", family, mode))
    before = snapshot(model)
    out = normswap.convert(model, "fold", example_inputs=_inputs(family))
    assert_unchanged(model, before, "convert(to='fold')")
    assert not any(m.training for m in out.modules()), "a fold result is an eval-mode model"


# ---- any state, drawn by hypothesis (the cheap families) ------------------------------------------

@pytest.mark.parametrize("family", SMALL)
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(op=st.sampled_from(("rewrite", "inspect", "batch_independence")), to=st.sampled_from(TARGETS),
       mode=st.sampled_from(MODES), rnd=st.randoms(use_true_random=False))
def test_any_model_state_is_left_alone(family: str, op: str, to: str, mode: str, rnd: random.Random) -> None:
    """Hypothesis draws which submodules train (mixed), which parameters are frozen, where hooks
    sit and which ``.grad`` exist, and the operation."""
    model = prepare(family, mode, rnd)
    before = snapshot(model)
    x = _inputs(family)
    try:
        if op == "rewrite":
            conv = normswap.rewrite(model, to, x, groups=_groups(family, to))
            assert_unchanged(model, before, f"rewrite(to={to!r})")
            assert_not_aliased(model, before, conv.model, f"rewrite(to={to!r})")
        elif op == "inspect":
            normswap.inspect(model, x, to=to, groups=_groups(family, to))
        else:
            batch_independence(model, list(x[0].shape), batch=3)
    except (InputError, RewriteError):
        pass
    assert_unchanged(model, before, f"{op}(to={to!r})")


# ---- inspect -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("to", "mode"), [("fold", "train"), ("fold", "eval"), ("fold", "mixed"),
                                          ("wn", "train"), ("gn-ws", "mixed"), ("frozen", "eval")])
@pytest.mark.parametrize("family", FAMILY_IDS)
def test_inspect_leaves_the_model_alone(family: str, to: str, mode: str) -> None:
    model = prepare(family, mode, _rnd("inspect", family, to, mode))
    before = snapshot(model)
    try:
        normswap.inspect(model, _inputs(family), to=to, groups=_groups(family, to))
    except (InputError, RewriteError):
        pass
    assert_unchanged(model, before, f"inspect(to={to!r})")


# ---- batch_independence ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILY_IDS)
def test_batch_independence_leaves_the_model_alone(family: str, mode: str) -> None:
    model = prepare(family, mode, _rnd("batch_independence", family, mode))
    before = snapshot(model)
    batch_independence(model, list(_inputs(family)[0].shape), batch=3)
    assert_unchanged(model, before, "batch_independence")


# ---- compare_targets ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["digits", "handbuilt"])
def test_compare_targets_leaves_the_model_alone(family: str, mode: str) -> None:
    model = prepare(family, mode, _rnd("compare", family, mode))
    before = snapshot(model)
    (x,) = _inputs(family)
    g = torch.Generator().manual_seed(5)
    calib = [torch.randn((4, *x.shape[1:]), generator=g)]  # calibration runs the original as teacher
    rep = normswap.compare_targets(model, ["fold", "bin", "ln"], (x,), calib=calib, heldout=calib,
                                   groups=_groups(family, "gn"), latency=False)
    assert {r.target for r in rep.rows} == {"fold", "bin", "ln"}
    assert_unchanged(model, before, "compare_targets")


def test_compare_targets_with_latency_leaves_the_model_alone() -> None:
    """With latency on, every rewritten model is exported to ONNX too."""
    model = prepare("handbuilt", "mixed", _rnd("compare-latency"))
    before = snapshot(model)
    normswap.compare_targets(model, ["fold", "gn"], _inputs("handbuilt"), groups=4, runs=1, rounds=1)
    assert_unchanged(model, before, "compare_targets(latency=True)")
