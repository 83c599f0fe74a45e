"""Fitting a per-channel affine to each per-sample norm's output, so that ``--to fold`` can fold it.

At every site (a GroupNorm, LayerNorm, InstanceNorm, … of :mod:`normswap.rewriting.norm_sites`), with ``y`` the
original norm's output (before any activation it applies) and ``x`` the norm's input, the per-channel
least-squares fit over every sample and position

    y ≈ s · x + t,   s = cov(x, y) / var(x),   t = ȳ − s · x̄,   R² = 1 − Σ_c SSE_c / Σ_c SST_c

is solved from running float64 sums (Σx, Σx², Σy, Σy², Σxy, n per channel): memory independent of the
data size, one pass, in graph order. Two fits are made in the same pass:

* **open loop** (``x`` = the original's own input at the site): how well *this* norm alone is an affine —
  its R² is the site's intrinsic quality, and the affine to use when only this site is replaced;
* **closed loop** (``x`` = the *student's* input: the model whose earlier sites already run their
  fitted affines, as the swap calibration streams): each fit also absorbs what the earlier ones left.
  The student's hook refits from the running totals at every batch and returns ``s·x + t``, so later
  sites see the calibrated earlier ones.

With them, per site, the **spread of the per-sample statistics** the norm divides by (over its units:
groups, channels or positions, each over the samples): ``σ spread = mean_u std_n(σ_nu) / mean_n(σ_nu)``
and ``μ spread = mean_u std_n(μ_nu) / mean_n(σ_nu)``. Both near 0 mean the norm is nearly a fixed affine on
this data; large values mean per-sample statistics carry signal (InstanceNorm in a style network).

Neither model is changed: the teacher (the original) gets temporary forward hooks, removed afterwards;
the student is a copy.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..load.data import as_batches
from ..errors import InputError
from ..rewriting.layers import FittedAffine, channel_affine
from ..rewriting.norm_sites import inner_norm, norm_family, norm_post_ops, num_channels
from ..parity import eval_mode
from ..rewriting.passes import set_module

__all__ = ["SiteFit", "NormFits", "norm_site_names", "fit_norm_affines", "affine_model", "channel_sums", "solve_affine"]


def norm_site_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's per-sample norm sites (a ``NormAct`` wrapper, not its inner norm)."""
    names: list[str] = []
    for name, m in model.named_modules():
        if norm_family(m) is not None and not any(name.startswith(p + ".") for p in names):
            names.append(name)
    return names


def _channels_last(x: Tensor, axis: int) -> Tensor:
    """``x`` as ``[C, everything else]`` in float64 (C on ``axis``)."""
    x = x.detach().to(torch.float64)
    if axis == -1 or x.dim() == 2:
        return x.reshape(-1, x.shape[-1]).T
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def channel_sums(x: Tensor, y: Tensor, axis: int) -> Tensor:
    """Per-channel ``[Σx, Σx², Σy, Σy², Σxy, n]`` (float64, ``[6, C]``) of the pairs (x, y)."""
    a, b = _channels_last(x, axis), _channels_last(y, axis)
    n = torch.full((a.shape[0],), float(a.shape[1]), dtype=torch.float64, device=a.device)
    return torch.stack([a.sum(1), (a * a).sum(1), b.sum(1), (b * b).sum(1), (a * b).sum(1), n])


def solve_affine(sums: Tensor) -> tuple[Tensor, Tensor, float]:
    """``(s, t, R²)`` of the per-channel least squares ``y ≈ s·x + t`` from :func:`channel_sums` totals.

    A channel whose input is constant (var x = 0) gets ``s = 0, t = ȳ``."""
    sx, sxx, sy, syy, sxy, n = sums
    n = n.clamp_min(1.0)
    mx, my = sx / n, sy / n
    vxx = (sxx / n - mx * mx).clamp_min(0)
    vxy = sxy / n - mx * my
    vyy = (syy / n - my * my).clamp_min(0)
    ok = vxx > 1e-12 * (sxx / n).clamp_min(1e-30)
    s = torch.where(ok, vxy / torch.where(ok, vxx, torch.ones_like(vxx)), torch.zeros_like(vxx))
    t = my - s * mx
    sst = float((vyy * n).sum())
    sse = float(((vyy - s * vxy).clamp_min(0) * n).sum())
    return s, t, (1.0 - sse / sst) if sst > 0 else 1.0


def _normalized(m: nn.Module, x: Tensor, out: Tensor) -> Tensor:
    """What the site outputs before its activation: ``out`` itself, or the inner norm re-run (NormAct,
    timm's GroupNormAct apply drop + act after normalizing)."""
    if norm_post_ops(m) == (None, None):
        return out
    inner = inner_norm(m)
    if inner is not m:
        return inner(x)
    return F.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)


@dataclass
class SiteFit:
    """One site's fits and statistics (see the module docstring)."""

    name: str
    family: str
    source: str  # the norm's class name
    channels: int
    axis: int
    scale: Tensor  # closed loop (student's inputs); float64
    shift: Tensor
    open_scale: Tensor  # open loop (the original's own inputs)
    open_shift: Tensor
    r2: float  # open loop: how well this norm alone is a per-channel affine
    r2_student: float | None  # closed loop (None when the site was not replaced in the student)
    spread_sigma: float
    spread_mu: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.name, "family": self.family, "type": self.source, "channels": self.channels,
                "axis": self.axis, "r2": self.r2, "r2_student": self.r2_student, "sigma_spread": self.spread_sigma,
                "mu_spread": self.spread_mu, "samples": self.samples}


@dataclass
class NormFits:
    """Every site's fit, in graph (execution) order, and what they rest on."""

    sites: list[SiteFit] = field(default_factory=list)
    samples: int = 0
    batches: int = 0
    seconds: float = 0.0

    def __getitem__(self, name: str) -> SiteFit:
        return next(s for s in self.sites if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "batches": self.batches, "seconds": self.seconds,
                "sites": [s.to_dict() for s in self.sites]}


class _Site:
    """Running totals at one site: both fits' sums and the per-sample statistics' sums."""

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module = name, module
        fam = norm_family(module)
        assert fam is not None
        self.family, self.axis = fam, fam.axis
        self.open: Tensor | None = None
        self.closed: Tensor | None = None
        self.stats: Tensor | None = None  # [5, U]: Σσ, Σσ², Σμ, Σμ², n
        self.queue: deque[Tensor] = deque()
        self.samples = 0
        self.order = -1

    @staticmethod
    def _add(total: Tensor | None, part: Tensor) -> Tensor:
        return part if total is None else total + part

    def teacher(self, x: Tensor, y: Tensor) -> None:
        self.open = self._add(self.open, channel_sums(x, y, self.axis))
        mu, sd = (t.to(torch.float64) for t in self.family.stats(inner_norm(self.module), x))
        part = torch.stack([sd.sum(0), (sd * sd).sum(0), mu.sum(0), (mu * mu).sum(0),
                            torch.full_like(sd[0], float(sd.shape[0]))])
        if self.stats is not None and self.stats.shape != part.shape:  # inputs of another size: units differ
            part = part.mean(1, keepdim=True)
            self.stats = self.stats.mean(1, keepdim=True)
        self.stats = self._add(self.stats, part)
        self.samples += int(x.shape[0])
        self.queue.append(y.detach().clone())

    def spreads(self) -> tuple[float, float]:
        if self.stats is None:
            return float("nan"), float("nan")
        ss, ss2, sm, sm2, n = self.stats
        msd = ss / n
        sd_sd = (ss2 / n - msd * msd).clamp_min(0).sqrt()
        sd_mu = (sm2 / n - (sm / n) ** 2).clamp_min(0).sqrt()
        scale = msd.clamp_min(1e-12)
        return float((sd_sd / scale).mean()), float((sd_mu / scale).mean())


class _Probe(nn.Module):
    """Stands in for a replaced site in the student: adds (its input, the original's output) to the
    closed-loop sums, refits, and returns ``post(s·x + t)``."""

    def __init__(self, site: _Site, post: tuple[nn.Module | None, nn.Module | None]) -> None:
        super().__init__()
        self.site = site
        self.drop, self.act = post

    def forward(self, x: Tensor) -> Tensor:
        site = self.site
        if not site.queue:
            raise InputError(f"site {site.name} ran more often in the copy than in the original; cannot fit it")
        y = site.queue.popleft()
        site.closed = site._add(site.closed, channel_sums(x, y, site.axis))
        s, t, _ = solve_affine(site.closed)
        return channel_affine(x, s.to(x.dtype), t.to(x.dtype), site.axis, self.drop, self.act)


def fit_norm_affines(original: nn.Module, data: Any, *, names: Iterable[str] | None = None,
                     replace: Iterable[str] | None = None, on_batch: Any = None) -> NormFits:
    """Fit every per-sample norm site of ``original`` (or those in ``names``) on ``data`` (batches, or
    anything :func:`normswap.load.data.as_batches` takes); the closed-loop fits replace the sites in
    ``replace`` (default: all of them) in the student. ``original`` is not changed."""
    mods = dict(original.named_modules())
    names = list(norm_site_names(original) if names is None else names)
    unknown = [n for n in names if n not in mods or norm_family(mods[n]) is None]
    if unknown:
        raise InputError(f"{unknown[0]} is not a norm site of the model; its norm sites: {', '.join(norm_site_names(original)[:12])}")
    replace = set(names if replace is None else replace)
    sites = {n: _Site(n, mods[n]) for n in names}
    student = copy.deepcopy(original).eval()
    for n in names:
        if n in replace:
            set_module(student, n, _Probe(sites[n], norm_post_ops(student.get_submodule(n))))
    counter = [0]

    def hook(site: _Site):
        def fn(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if site.order < 0:
                site.order = counter[0]
                counter[0] += 1
            x = args[0]
            site.teacher(x, _normalized(m, x, out))
        return fn

    handles = [mods[n].register_forward_hook(hook(sites[n])) for n in names]
    fits = NormFits()
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), eval_mode(original):
            for batch in as_batches(data):
                original(*batch)
                for n in names:  # a site the student does not run (not replaced) keeps no queue
                    if n not in replace:
                        sites[n].queue.clear()
                student(*batch)
                fits.samples += int(batch[0].shape[0])
                fits.batches += 1
                if on_batch is not None:
                    on_batch()
    finally:
        for h in handles:
            h.remove()
    if fits.batches == 0:
        raise InputError("the calibration data yielded no batches: nothing to fit the norms' affines on")
    for site in sorted(sites.values(), key=lambda s: s.order if s.order >= 0 else 1 << 30):
        if site.open is None:
            raise InputError(f"norm site {site.name} never ran on the calibration data; cannot fit it")
        s0, t0_, r2 = solve_affine(site.open)
        s1, t1, r2s = solve_affine(site.closed) if site.closed is not None else (s0, t0_, None)
        sig, mu = site.spreads()
        fits.sites.append(SiteFit(site.name, site.family.name, type(inner_norm(site.module)).__name__,
                                  int(num_channels(site.module) or s0.numel()), site.axis, s1, t1, s0, t0_, r2, r2s,
                                  sig, mu, site.samples))
    fits.seconds = time.perf_counter() - t0
    return fits


def _dtype(m: nn.Module) -> torch.dtype:
    t = next((p for p in m.parameters() if p.is_floating_point()), None)
    return t.dtype if t is not None else torch.float32


def affine_model(original: nn.Module, fits: NormFits, names: Iterable[str], *, loop: str = "closed") -> nn.Module:
    """A copy of ``original`` with each site in ``names`` replaced by its fitted :class:`FittedAffine`
    (``loop``: ``"closed"`` — the student-input fit — or ``"open"``), keeping the site's activation."""
    if loop not in ("closed", "open"):
        raise ValueError(f"loop must be 'closed' or 'open', got {loop!r}")
    model = copy.deepcopy(original).eval()
    for name in names:
        f = fits[name]
        m = model.get_submodule(name)
        s, t = (f.scale, f.shift) if loop == "closed" else (f.open_scale, f.open_shift)
        dt = _dtype(m) if any(True for _ in m.parameters()) else _dtype(original)
        set_module(model, name, FittedAffine(s.to(dt), t.to(dt), f.axis, f.source, *norm_post_ops(m)).eval())
    return model
