"""Instance Norm (Ulyanov, Vedaldi & Lempitsky 2016, arXiv 1607.08022).

    y[n,c] = γ_c · (x[n,c] − μ[n,c]) / √(σ²[n,c] + ε) + β_c,   μ, σ² (biased) over the spatial dims S

We use ``nn.InstanceNorm{1,2,3}d(affine=True, track_running_stats=False)``: the same function in train and
eval mode, batch-independent. Not defined for [N, C] features: with no spatial dims each statistic covers
one value and every output would be β (x − μ = 0).

IN erases each sample's per-channel means and contrast: a good prior for style transfer, harmful where a
classifier relies on those means. The swap is never exact.
"""

from __future__ import annotations

from torch import nn

from .registry import NormTarget, SwapBuild, SwapSite, bn_state, copy_affine_, like_bn, register

_IN_FOR_RANK = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
NO_SPATIAL = (
    "instance norm is undefined on [N, C] features: its statistics span the spatial dims, so each covers "
    "one value and the output would be the constant β"
)


def instance_norm(num_features: int, spatial_dims: int, eps: float = 1e-5) -> nn.Module:
    """``nn.InstanceNorm{spatial_dims}d(num_features, eps, affine=True, track_running_stats=False)``."""
    if spatial_dims == 0:
        raise ValueError(NO_SPATIAL)
    if spatial_dims not in _IN_FOR_RANK:
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
    return _IN_FOR_RANK[spatial_dims](num_features, eps=eps, affine=True, track_running_stats=False)


def _check(site: SwapSite) -> str | None:
    if site.spatial_dims == 0:
        return NO_SPATIAL
    if site.spatial_size == 1:
        return "the feature map is 1 position per channel: instance statistics are undefined there"
    return None


def _build(site: SwapSite) -> SwapBuild:
    s = bn_state(site.bn)
    norm = instance_norm(s.num_features, site.spatial_dims, s.eps)
    copy_affine_(norm, s)
    return SwapBuild(
        norm=like_bn(norm, site.bn),
        notes=["instance norm removes per-sample channel means/contrast; expect to fine-tune"],
    )


IN = register(NormTarget(
    name="in",
    summary="InstanceNorm (per-sample, per-channel statistics over space), affine γ/β from the BN",
    exact=False,
    batch_independent=True,
    build=_build,
    check=_check,
))
