"""When GroupNorm cannot match: what would — from activations the fit pass already tapped.

During the fit pass every GroupNorm site keeps its input ``x`` and the original's output ``y`` for
the first :data:`ADVICE_SAMPLES` calibration samples (fewer when they would exceed
:data:`ADVICE_BYTES` over all sites). After the fits, only at the sites whose fit failed (R² <
LOW_R2, or kept-previous by the held-out check), the R² the best per-channel affine reaches with the statistics of
LayerNorm (G = 1) and of the neighbouring group counts (G/2, 2G) is computed on them:

    R² = 1 − Σ_c (V_y,c − C_c² / V_z,c) / Σ_c V_y,c,   z = GN_G(x),  V, C centered per-channel sums (float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .report import SiteCalibration

#: calibration samples per GroupNorm site the advice keeps from the fit pass
ADVICE_SAMPLES = 16
#: ... and the most memory (bytes, x and y together, all sites) they may take
ADVICE_BYTES = 256 * 2 ** 20


class AdviceTap:
    """Keeps (x, y) of the first samples at each GroupNorm site, fed by the fit pass's hooks."""

    def __init__(self, mods: dict[str, nn.Module]) -> None:
        self.mods = {n: m for n, m in mods.items() if isinstance(m, nn.GroupNorm)}
        self.xs: dict[str, list[Tensor]] = {n: [] for n in self.mods}
        self.ys: dict[str, list[Tensor]] = {n: [] for n in self.mods}
        self.room: dict[str, int] = {}

    def wants(self, name: str) -> bool:
        return name in self.mods and self.room.get(name, 1) > 0

    def add(self, name: str, x: Tensor, y: Tensor) -> None:
        if name not in self.room:  # the first call: how many samples fit the memory budget
            per = max(1, 2 * x[:1].numel() * x.element_size())
            self.room[name] = max(1, min(ADVICE_SAMPLES, ADVICE_BYTES // (per * len(self.mods))))
        k = min(self.room[name], int(x.shape[0]))
        if k <= 0 or x.shape != y.shape:
            return
        self.xs[name].append(x[:k].detach().clone())
        self.ys[name].append(y[:k].detach().clone())
        self.room[name] -= k

    def advise(self, sites: list[SiteCalibration]) -> list[str]:
        """The advice line (or none), and ``alternatives_r2`` on each weak site that has a better option."""
        weak = [s for s in sites if s.site in self.mods and s.r2_after is not None
                and s.status in ("low-r2", "cannot-help", "kept-previous")]
        tally: dict[int, list[float]] = {}
        cur: list[float] = []
        nonneg = samples = 0
        for s in weak:
            if not self.xs[s.site]:
                continue
            x, y = torch.cat(self.xs[s.site]), torch.cat(self.ys[s.site])
            if x.dim() < 3:
                continue
            samples = max(samples, int(x.shape[0]))
            gn = self.mods[s.site]
            c, g_now = int(x.shape[1]), int(gn.num_groups)
            options = sorted({g for g in (1, g_now // 2, g_now * 2) if g >= 1 and c % g == 0} - {g_now})
            r2 = _r2_groups(x, y, [g_now, *options], gn.eps)  # every group count in one set of reductions
            now, scores = r2[0], dict(zip(options, r2[1:]))
            cur.append(now)
            for g, v in scores.items():
                tally.setdefault(g, []).append(v)
            nonneg += bool((x >= 0).all())
            best = max(scores, key=scores.get) if scores else None
            if best is not None and scores[best] > now + 0.02:
                s.extra["alternatives_r2"] = {("ln" if g == 1 else f"groups={g}"): round(v, 4) for g, v in scores.items()}
                s.extra["alternatives_r2"][f"groups={g_now} (this)"] = round(now, 4)
        if not tally or not cur:
            return []
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        best_g = max(tally, key=lambda g: mean(tally[g]))
        if mean(tally[best_g]) <= mean(cur) + 0.02:
            return []
        alt = "--to ln (GroupNorm(1, C))" if best_g == 1 else f"--groups {best_g}"
        why = f"; {nonneg} of them take non-negative (post-ReLU) inputs, whose group means GN removes" if nonneg else ""
        return [f"GroupNorm cannot match the original at {len(cur)} site(s): the best per-channel fit reaches R² "
                f"{mean(cur):.2f} (mean){why}; {alt} reaches R² {mean(tally[best_g]):.2f} at the same sites "
                f"(first {samples} calibration samples): try it"]


def _r2_groups(x: Tensor, y: Tensor, groups: list[int], eps: float) -> list[float]:
    """:func:`_r2` of ``GN_g(x)`` for ``y``, for every ``g`` of ``groups``: the normalized features stacked,
    their per-channel sums taken together (float64), one read-back for all."""
    z = torch.stack([F.group_norm(x, g, eps=eps) for g in groups])  # [K, N, C, *S]
    dims = (1, *range(3, z.dim()))
    m = y.numel() // y.shape[1]
    sz = z.sum(dims, dtype=torch.float64)
    szz = torch.linalg.vector_norm(z, 2, dims, dtype=torch.float64).square()
    szy = (z * y).sum(dims, dtype=torch.float64)
    ydims = (0, *range(2, y.dim()))
    sy = y.sum(ydims, dtype=torch.float64)
    syy = torch.linalg.vector_norm(y, 2, ydims, dtype=torch.float64).square()
    vz, vy, cov = szz - sz * sz / m, (syy - sy * sy / m).clamp_min(0), szy - sz * sy / m
    sse = vy - torch.where(vz > 0, cov * cov / vz.clamp_min(1e-300), torch.zeros_like(vz))
    return (1 - sse.sum(1) / vy.sum().clamp_min(1e-300)).tolist()


def _sums(a: Tensor, y: Tensor) -> Tensor:
    """Per-channel float64 [Σa, Σa², Σa·y, M] over every sample and position of [N, C, *S] tensors."""
    dims = (0, *range(2, a.dim()))
    m = a.numel() // a.shape[1]
    sq = torch.linalg.vector_norm(a, 2, dims, dtype=torch.float64).square()
    cross = sq if a is y else (a * y).sum(dims, dtype=torch.float64)
    return torch.stack([a.sum(dims, dtype=torch.float64), sq, cross, torch.full_like(sq, float(m))])


def _r2(z: Tensor, y: Tensor, ys: Tensor) -> float:
    """R² of the best per-channel affine a·z + b for ``y`` (``ys`` = :func:`_sums` of y): from centered
    sums V_z = Σz² − (Σz)²/M, C = Σzy − Σz·Σy/M, V_y likewise."""
    sz, szz, szy, m = _sums(z, y)
    sy, syy = ys[0], ys[1]
    vz, vy, cov = szz - sz * sz / m, (syy - sy * sy / m).clamp_min(0), szy - sz * sy / m
    sse = vy - torch.where(vz > 0, cov * cov / vz.clamp_min(1e-300), torch.zeros_like(vz))
    return float(1 - sse.sum() / vy.sum().clamp_min(1e-300))
