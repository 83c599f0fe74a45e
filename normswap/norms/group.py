"""Group Norm (Wu & He 2018, arXiv 1803.08494) targets, plain and with Weight Standardization.

    y[n,c] = γ_c · (x[n,c] − μ[n,g]) / √(σ²[n,g] + ε) + β_c,   μ, σ² (biased) over (C/G, *S) of c's group g

We use ``nn.GroupNorm`` itself, and export it as :class:`GroupNormExport`: Reshape →
InstanceNormalization (unit scale) → Reshape → BatchNormalization(γ, β, mean 0, var 1 − ε), the
fastest form measured in onnxruntime 1.31 CPU at batch 1 (1 thread, interleaved, medians): 0.90× the
time of the exporters' own lowering (… → Reshape → Mul/Add) on a GN mobilenet_v2 and 0.97× on a GN
resnet50; that lowering in turn was ahead of GroupNormalization-21 (~1.2× slower: run as an expanded
function), ReduceMean arithmetic (~1.1–1.2×) and Reshape → LayerNormalization (~1.05–1.2×). The
affine as one BatchNormalization kernel replaces two broadcast passes (Mul, Add) over the activation.

Group count (:func:`choose_groups`):

* ``--groups G`` must divide C. On [N, C] features it must leave ≥ 2 channels per group: with one, every
  statistic covers one value and the output is the constant β.
* Default: the paper's G = 32 when it divides C, else the divisor of C closest to 32; on a tie the smaller
  G (more channels per group, steadier statistics). Candidates must leave
  - ≥ 2 channels per group on spatial features, so GN never silently becomes Instance Norm (G = C);
  - ≥ 8 channels per group on [N, C] features, where a group's statistics cover only its C/G values
    (with 2 values x̂ is ±1: only the sign survives).
  When no divisor qualifies (C < 4 spatial, C < 16 features) G = 1, i.e. Layer Norm over the group;
  C = 1 on [N, C] features is refused (nothing to normalize over).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import ExportForm, NormTarget, SwapBuild, SwapSite, bn_state, copy_affine_, like_bn, register, register_export_form
from .ws import DEFAULT_EPS as WS_EPS
from .ws import ws_conv_from, ws_refusal

PAPER_GROUPS = 32
MIN_CHANNELS_PER_GROUP_SPATIAL = 2
MIN_CHANNELS_PER_GROUP_FEATURES = 8


def _divisors(c: int) -> list[int]:
    return [d for d in range(1, c + 1) if c % d == 0]


def choose_groups(num_channels: int, requested: int | None = None, *, spatial_dims: int | None = None) -> int:
    """The GroupNorm group count for C = ``num_channels`` (see the module docstring for the rule).

    ``spatial_dims`` = 0 marks [N, C] features; None or 1/2/3 spatial features. ValueError with the reason
    when ``requested`` is unusable or C = 1 on [N, C] features."""
    c = num_channels
    if c < 1:
        raise ValueError(f"C must be positive, got {c}")
    features = spatial_dims == 0
    if features and c == 1:
        raise ValueError("group norm on [N, 1] features: a single value per sample, nothing to normalize over")
    if requested is not None:
        if requested < 1 or c % requested != 0:
            raise ValueError(f"--groups {requested} does not divide C={c}")
        if features and c // requested == 1:
            raise ValueError(
                f"--groups {requested} gives one channel per group on [N, C] features (C={c}): "
                "every output would be the constant β"
            )
        return requested
    min_per_group = MIN_CHANNELS_PER_GROUP_FEATURES if features else MIN_CHANNELS_PER_GROUP_SPATIAL
    candidates = [g for g in _divisors(c) if c // g >= min_per_group] or [1]
    return min(candidates, key=lambda g: (abs(g - PAPER_GROUPS), g))


def group_notes(num_channels: int, groups: int, spatial_dims: int) -> list[str]:
    """What a user should know about GroupNorm(groups, num_channels) at this site."""
    c, g = num_channels, groups
    notes = [f"GroupNorm({g}, {c}): {c // g} channel(s) per group"]
    if g == 1:
        notes.append("G=1: statistics over all channels (layer norm)")
    if g == c and spatial_dims > 0 and c > 1:
        notes.append("G=C: one channel per group, this is instance norm (erases per-channel means)")
    if spatial_dims == 0 and c // g == 2:
        notes.append("2 channels per group on [N, C] features: x̂ = ±1, only the sign within a pair survives")
    return notes


def group_norm_from_bn(bn: nn.Module, groups: int) -> nn.GroupNorm:
    """nn.GroupNorm(groups, C, eps=bn.eps) with γ, β copied from ``bn`` (ones/zeros if affine-free)."""
    s = bn_state(bn)
    gn = nn.GroupNorm(groups, s.num_features, eps=s.eps, affine=True)
    copy_affine_(gn, s)
    return like_bn(gn, bn)


def _group_refusal(site: SwapSite) -> str | None:
    try:
        choose_groups(site.num_features, site.groups, spatial_dims=site.spatial_dims)
    except ValueError as err:
        return str(err)
    return None


def _build_gn(site: SwapSite) -> SwapBuild:
    g = choose_groups(site.num_features, site.groups, spatial_dims=site.spatial_dims)
    return SwapBuild(norm=group_norm_from_bn(site.bn, g), notes=group_notes(site.num_features, g, site.spatial_dims))


def _ws_applicable(producer: nn.Module | None, why_none: str | None = None) -> str | None:
    """None if the producer gets WS; else why it keeps its plain weight (a note, not a refusal)."""
    if producer is None:
        return f"no conv feeds only this BN ({why_none or 'none found'}): GN without weight standardization"
    if type(producer) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return (
            f"producer is {type(producer).__name__}, not a plain nn.Conv1d/2d/3d: "
            "GN without weight standardization"
        )
    return None


def _check_gn_ws(site: SwapSite) -> str | None:
    reason = _group_refusal(site)
    if reason is not None:
        return reason
    if _ws_applicable(site.producer) is None:
        return ws_refusal(site.producer)  # a 1-element filter: use 'gn' for this site
    return None


def _build_gn_ws(site: SwapSite) -> SwapBuild:
    build = _build_gn(site)
    why_not = _ws_applicable(site.producer, site.producer_reason)
    if why_not is not None:
        build.notes.append(why_not)
    else:
        build.producer = ws_conv_from(site.producer, eps=WS_EPS)
        build.notes.append(f"producer weight-standardized (biased variance, eps={WS_EPS} inside the root)")
    return build


GN = register(NormTarget(
    name="gn",
    summary="GroupNorm (32 groups by default, per the GN paper), affine γ/β from the BN",
    exact=False,
    batch_independent=True,
    build=_build_gn,
    check=_group_refusal,
))

GN_WS = register(NormTarget(
    name="gn-ws",
    summary="GroupNorm + Weight Standardization of the producing conv (the GN+WS recipe)",
    exact=False,
    batch_independent=True,
    build=_build_gn_ws,
    check=_check_gn_ws,
))


class GroupNormExport(nn.Module):
    """``nn.GroupNorm``'s export form: the same function, lowered to onnxruntime's fastest CPU form.

        x̂ = group_norm(x; G, ε)   (no affine: Reshape → InstanceNormalization(scale 1, bias 0) → Reshape)
        y = γ · (x̂ − 0) / √((1 − ε) + ε) + β   (an eval batch_norm: one BatchNormalization node)

    The exporters emit a Mul by ones and an Add of zeros after the affine-free group norm, which
    onnxruntime's no-op elimination removes when it loads the file."""

    def __init__(self, gn: nn.GroupNorm) -> None:
        super().__init__()
        self.num_groups, self.eps = gn.num_groups, gn.eps
        w, b = gn.weight.detach(), gn.bias.detach()
        self.weight = nn.Parameter(w.clone(), requires_grad=False)
        self.bias = nn.Parameter(b.clone(), requires_grad=False)
        self.register_buffer("zero_mean", torch.zeros_like(w))
        self.register_buffer("unit_var", torch.full_like(w, 1.0 - gn.eps))

    def forward(self, x: Tensor) -> Tensor:
        z = F.group_norm(x, self.num_groups, None, None, self.eps)
        return F.batch_norm(z, self.zero_mean, self.unit_var, self.weight, self.bias, False, 0.0, self.eps)


def _group_norm_export(gn: nn.Module) -> nn.Module | None:
    return GroupNormExport(gn).train(gn.training) if getattr(gn, "affine", False) else None


GROUP_NORM_EXPORT = register_export_form(nn.GroupNorm, ExportForm(
    label="GroupNorm module(s) as InstanceNormalization + BatchNormalization(γ, β)", build=_group_norm_export))
