"""The norm registry: CLI name -> how to replace one BatchNorm site.

The swap pass (``normswap/rewriting/swap.py``) finds BatchNorm sites, describes each one as a :class:`SwapSite`,
asks ``target.can_swap(site)`` (``None`` = OK, else the one-line reason it refuses) and then
``target.build(site)``, which returns a :class:`SwapBuild`: the module that replaces the BN and, for
targets that also reparameterize the producing conv/linear (``gn-ws``, ``wn``), its replacement.

Builders never mutate ``site.bn`` or ``site.producer``: they read them and build new modules on the
same device/dtype, in the same train/eval mode as the BN.

Adding a norm = one family file that calls :func:`register` at import + its test file; the family
module is imported by ``normswap/norms/__init__.py`` so that :data:`TARGETS` is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# ---------------------------------------------------------------------------------------------------
# BN sites


#: Site kinds: ``"bn"`` nn.BatchNorm1d/2d/3d (incl. timm's BatchNormAct2d), ``"sync"`` nn.SyncBatchNorm
#: (incl. timm's SyncBatchNormAct), ``"frozen"`` a buffers-only frozen BN (torchvision's / timm's
#: FrozenBatchNorm2d, timm's FrozenBatchNormAct2d, normswap's FrozenBatchNorm).
SITE_KINDS = ("bn", "sync", "frozen")
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def site_kind(bn: nn.Module) -> str | None:
    """The kind of BN module ``bn`` is (see :data:`SITE_KINDS`), or None if it is not a BN."""
    if isinstance(bn, nn.SyncBatchNorm):
        return "sync"
    if isinstance(bn, _BatchNorm):
        # _BatchNorm also covers nn.BatchNorm{1,2,3}d subclasses (timm BatchNormAct2d) and LazyBatchNorm;
        # the instance norms are _NormBase but not _BatchNorm.
        return "bn"
    # Frozen BNs are not _BatchNorm subclasses; recognise them by name + buffers rather than importing
    # torchvision/timm (optional dependencies, slow to import).
    if type(bn).__name__.startswith("FrozenBatchNorm") and all(
        isinstance(getattr(bn, k, None), torch.Tensor) for k in _FROZEN_BUFFERS
    ):
        return "frozen"
    return None


@dataclass(frozen=True)
class BNState:
    """Everything a builder needs from a BN-like module, normalized across BN kinds.

    ``weight``/``bias`` are detached copies (ones/zeros for ``affine=False``); ``running_mean``/
    ``running_var`` are None when the BN does not track running statistics."""

    num_features: int
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype


def bn_state(bn: nn.Module) -> BNState:
    """Read γ, β, running statistics and hyper-parameters from any BN kind (``site_kind(bn)`` not None)."""
    kind = site_kind(bn)
    if kind is None:
        raise ValueError(f"{type(bn).__name__} is not a BatchNorm module")
    if kind == "frozen":
        w, b = bn.weight.detach().clone(), bn.bias.detach().clone()
        return BNState(
            num_features=w.numel(), weight=w, bias=b,
            running_mean=bn.running_mean.detach().clone(), running_var=bn.running_var.detach().clone(),
            num_batches_tracked=None, eps=float(bn.eps), momentum=0.1, affine=True,
            track_running_stats=True,
        )
    ref = bn.running_mean if bn.running_mean is not None else bn.weight
    if ref is None:  # affine=False and no running stats: nothing tells us the device; use the default
        ref = torch.empty(0)
    dd = {"device": ref.device, "dtype": ref.dtype if ref.dtype.is_floating_point else torch.float32}
    c = bn.num_features
    w = bn.weight.detach().clone() if bn.affine else torch.ones(c, **dd)
    b = bn.bias.detach().clone() if bn.affine else torch.zeros(c, **dd)
    tracked = bn.track_running_stats and bn.running_mean is not None
    return BNState(
        num_features=c, weight=w, bias=b,
        running_mean=bn.running_mean.detach().clone() if tracked else None,
        running_var=bn.running_var.detach().clone() if tracked else None,
        num_batches_tracked=(
            bn.num_batches_tracked.detach().clone()
            if tracked and bn.num_batches_tracked is not None else None
        ),
        eps=float(bn.eps), momentum=bn.momentum, affine=bool(bn.affine), track_running_stats=tracked,
    )


def bn_num_features(bn: nn.Module) -> int | None:
    """Channel count of a BN-like module, None if it cannot be read."""
    n = getattr(bn, "num_features", None)
    if isinstance(n, int):
        return n
    w = getattr(bn, "weight", None)
    return int(w.numel()) if isinstance(w, torch.Tensor) else None


@dataclass(frozen=True)
class SwapSite:
    """What the swap pass tells a builder about one BN site."""

    #: nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm, torchvision/timm FrozenBatchNorm2d, or timm BatchNormAct2d
    #: (treated as BN: its act/drop are kept by the swap pass, not by the builder).
    bn: nn.Module
    num_features: int
    #: 0 for [N, C] features, else 1/2/3 (known from shape propagation).
    spatial_dims: int
    #: the Conv/Linear whose output feeds ONLY this BN (None if there is none or it is shared).
    producer: nn.Module | None = None
    #: why ``producer`` is None (e.g. the conv's output also feeds other nodes), for builders' notes.
    producer_reason: str | None = None
    #: the user's --groups.
    groups: int | None = None
    #: number of spatial positions per channel (H·W…) seen on the example input; None if unknown.
    spatial_size: int | None = None

    @property
    def kind(self) -> str | None:
        return site_kind(self.bn)


@dataclass
class SwapBuild:
    """What a builder returns for one site."""

    norm: nn.Module  #: replaces the BN
    producer: nn.Module | None = None  #: replaces the producer (gn-ws: WS conv, wn: WN conv); None = keep it
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# targets


def _generic_refusal(target: NormTarget, site: SwapSite) -> str | None:
    """Checks every target shares: a known BN kind this target accepts, consistent shapes."""
    kind = site.kind
    if kind is None:
        return f"{type(site.bn).__name__} is not a BatchNorm module"
    if kind not in target.site_kinds:
        accepted = ", ".join(sorted(target.site_kinds))
        return f"'{target.name}' applies to {accepted} sites, not to a {kind} site ({type(site.bn).__name__})"
    if site.spatial_dims not in (0, 1, 2, 3):
        return f"spatial_dims must be 0 ([N, C]) or 1/2/3, got {site.spatial_dims}"
    n = bn_num_features(site.bn)
    if n is not None and n != site.num_features:
        return f"site says C={site.num_features} but the BN has {n} features"
    return None


@dataclass(frozen=True)
class NormTarget:
    """One swap target: a CLI name, what it promises, how to build it and when it refuses."""

    name: str  #: CLI name
    summary: str  #: one line for --help/report
    exact: bool  #: reproduces the original eval function before any training
    batch_independent: bool  #: a sample's output does not depend on the rest of the batch, in training too
    build: Callable[[SwapSite], SwapBuild]
    #: the BN kinds it applies to (subset of SITE_KINDS)
    site_kinds: frozenset[str] = frozenset(SITE_KINDS)
    #: the target's own refusal reasons (all of them, in one function); None = no extra conditions
    check: Callable[[SwapSite], str | None] | None = None

    def can_swap(self, site: SwapSite) -> str | None:
        """The reason this target refuses ``site``, or None if it can replace it."""
        reason = _generic_refusal(self, site)
        if reason is None and self.check is not None:
            reason = self.check(site)
        return reason

    def swap(self, site: SwapSite) -> SwapBuild:
        """``build(site)`` after ``can_swap``; raises ValueError with the refusal reason."""
        reason = self.can_swap(site)
        if reason is not None:
            raise ValueError(f"cannot swap {type(site.bn).__name__} to '{self.name}': {reason}")
        return self.build(site)


TARGETS: dict[str, NormTarget] = {}


def register(target: NormTarget) -> NormTarget:
    """Add ``target`` to :data:`TARGETS` (a name may be registered once)."""
    if target.name in TARGETS and TARGETS[target.name] is not target:
        raise ValueError(f"norm target '{target.name}' is already registered")
    bad = set(target.site_kinds) - set(SITE_KINDS)
    if bad:
        raise ValueError(f"unknown site kinds {sorted(bad)}; valid: {', '.join(SITE_KINDS)}")
    TARGETS[target.name] = target
    return target


def get_target(name: str) -> NormTarget:
    """The target registered as ``name``; ValueError listing the valid names otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        valid = ", ".join(sorted(TARGETS))
        raise ValueError(f"unknown norm target '{name}'; valid: {valid}") from None


# ---------------------------------------------------------------------------------------------------
# export forms of modules torch owns


@dataclass(frozen=True)
class ExportForm:
    """How :func:`normswap.export.prepare_for_export` replaces a module class it cannot give an
    ``export_form()`` method (a torch class): ``build(module)`` returns the equivalent to export, or None
    to export the module as it is; ``label`` names the form in the export result."""

    label: str
    build: Callable[[nn.Module], nn.Module | None]


#: exact module class -> its export form (subclasses are not matched: they may compute something else)
EXPORT_FORMS: dict[type, ExportForm] = {}


def register_export_form(cls: type, form: ExportForm) -> ExportForm:
    """Export every module of exactly class ``cls`` in ``form`` (one form per class)."""
    if cls in EXPORT_FORMS and EXPORT_FORMS[cls] is not form:
        raise ValueError(f"an export form for {cls.__name__} is already registered")
    EXPORT_FORMS[cls] = form
    return form


# ---------------------------------------------------------------------------------------------------
# helpers for builders


def like_bn(module: nn.Module, bn: nn.Module) -> nn.Module:
    """Move ``module`` to ``bn``'s device/dtype and train/eval mode."""
    ref = next((t for t in list(bn.parameters()) + list(bn.buffers()) if t.is_floating_point()), None)
    if ref is not None:
        module = module.to(device=ref.device, dtype=ref.dtype)
    return module.train(bn.training)


def copy_affine_(norm: nn.Module, state: BNState) -> None:
    """Copy the BN's γ, β (ones/zeros for an affine-free BN) into ``norm.weight``/``norm.bias``."""
    with torch.no_grad():
        norm.weight.copy_(state.weight)
        norm.bias.copy_(state.bias)



def register_running_stats_(norm: nn.Module, num_features: int, track: bool) -> None:
    """BatchNorm's buffers on ``norm``: running_mean 0, running_var 1, num_batches_tracked 0 — or all
    three None when it does not track running statistics (as nn.BatchNorm registers them)."""
    norm.register_buffer("running_mean", torch.zeros(num_features) if track else None)
    norm.register_buffer("running_var", torch.ones(num_features) if track else None)
    norm.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long) if track else None)


def running_factor_(num_batches_tracked: torch.Tensor, momentum: float | None) -> float:
    """Count one training step and return nn.BatchNorm's update factor for it: ``momentum``, or
    1/steps (a cumulative average) when ``momentum`` is None."""
    num_batches_tracked.add_(1)
    return 1.0 / float(num_batches_tracked) if momentum is None else momentum


def copy_running_stats_(norm: nn.Module, state: BNState) -> None:
    """Copy running mean/var (and the step count when both track it) into ``norm``'s buffers;
    nothing when the BN tracks no running statistics."""
    if state.running_mean is None:
        return
    with torch.no_grad():
        norm.running_mean.copy_(state.running_mean)
        norm.running_var.copy_(state.running_var)
        if state.num_batches_tracked is not None and getattr(norm, "num_batches_tracked", None) is not None:
            norm.num_batches_tracked.copy_(state.num_batches_tracked)
