"""Per-site closed-form fits: streaming moments, Gram matrices, least squares, R²."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dist import _all_reduce

#: Switchable Norm: Adam steps on the mixture logits per batch, and their learning rate.
SN_STEPS = 4
SN_LR = 0.2
#: ... taken on the first this many batches of the first pass (bounding their cost); later batches
#: only refine γ, β in closed form.
SN_BATCHES = 1


# ---------------------------------------------------------------------------------------------------
# per-site fits


def _why_lossy(norm: str, conv: Any) -> str | None:
    """What a swap removes that no per-channel affine restores, when known."""
    if "InstanceNorm" in norm:
        return "instance norm erases each sample's per-channel means and contrast"
    if conv is not None and getattr(conv, "to", None) == "gn-ws":
        return "weight standardization removes each filter's mean, i.e. its response to the local input average"
    if norm == "ChannelsLayerNorm":
        return "channels layer norm re-normalizes every position across channels"
    return None


def _per_channel(t: Tensor) -> Tensor:
    """[N, C, *S] or [N, C] → [C, N·S] in float64."""
    return t.detach().movedim(1, 0).reshape(t.shape[1], -1).double()


def _bshape(c: int, dim: int) -> tuple[int, ...]:
    return (1, c) + (1,) * (dim - 2)


def _quality(S: Tensor, coef_before: Tensor, coef_after: Tensor, index: Tensor | None = None,
             sites: int = 1) -> list[dict[str, float | None]]:
    """R² and relative RMS error of y ≈ coef·(f, 1), summed over the channels of each site, from the Gram
    matrix S of (f_1..f_k, 1, y) [C, k+2, k+2]: one dict per site, channel c belonging to site
    ``index[c]`` (default: all channels to one site) — so all the sites of a pass are scored at once."""
    k1 = S.shape[-1] - 1
    G, r, syy = S[:, :k1, :k1], S[:, :k1, k1], S[:, k1, k1]
    n = G[:, -1, -1]
    sy = r[:, -1]
    cols = [n, (syy - sy * sy / n.clamp_min(1)).clamp_min(0), syy]
    for coef in (coef_before, coef_after):
        # per channel: Σy² − 2·coefᵀr + coefᵀG·coef (batched matmul: einsum's path search costs more here)
        quad = (torch.bmm(G, coef.unsqueeze(-1)).squeeze(-1) * coef).sum(1)
        cols.append((syy - 2 * (coef * r).sum(1) + quad).clamp_min(0))
    per = torch.stack(cols, 1)
    agg = per.sum(0, keepdim=True) if index is None else per.new_zeros(sites, per.shape[1]).index_add_(0, index, per)
    out: list[dict[str, float | None]] = []
    for count, sst, total, *sses in agg.tolist():
        q: dict[str, float | None] = {"r2_before": None, "r2_after": None, "rel_before": None, "rel_after": None}
        if count > 0:
            for tag, sse in zip(("before", "after"), sses):
                q[f"r2_{tag}"] = 1.0 - sse / sst if sst > 0 else (1.0 if sse <= 1e-12 * max(total, 1e-30) else 0.0)
                q[f"rel_{tag}"] = math.sqrt(sse / total) if total > 0 else 0.0
        out.append(q)
    return out


def _ridge_solve(G: Tensor, r: Tensor, prior: Tensor, rel: float = 1e-9) -> Tensor:
    """Per channel argmin ‖y − θ·(f, 1)‖² + λ‖θ_f − prior_f‖² (intercept unpenalized), λ = rel · mean
    feature energy: negligible for a healthy channel, but a constant (dead) feature keeps its prior
    coefficient instead of an arbitrary one."""
    k = G.shape[-1]
    diag = torch.diagonal(G, dim1=-2, dim2=-1)[:, :-1]
    lam = rel * diag.mean(1, keepdim=True).clamp_min(1e-30) + 1e-30
    pen = torch.zeros(k, k, dtype=G.dtype, device=G.device)
    pen[: k - 1, : k - 1] = torch.eye(k - 1, dtype=G.dtype, device=G.device)
    A = G + lam[:, :, None] * pen
    rhs = r + lam * torch.cat([prior[:, :-1], torch.zeros_like(prior[:, -1:])], 1)
    return torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1)


def _acc_dtype(t: Tensor) -> torch.dtype:
    """The dtype per-sample sums are taken in: the activation's, but at least float32."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _per_sample(t: Tensor) -> Tensor:
    """Sum over the positions of each (sample, channel): [N, C, *S] → [N, C] (at least float32); [N, C] as is."""
    if t.dim() > 2:
        return t.sum(tuple(range(2, t.dim())), dtype=_acc_dtype(t))
    return t.to(_acc_dtype(t))


def _per_sample_sq(t: Tensor) -> Tensor:
    """Σ t² over the positions of each (sample, channel), [N, C]. Taken as a norm reduction, so t² is
    never written out: on this machine an activation-sized write costs several times a read."""
    if t.dim() > 2:
        return torch.linalg.vector_norm(t, 2, tuple(range(2, t.dim())), dtype=_acc_dtype(t)).square_()
    t = t.to(_acc_dtype(t))
    return t * t


def _self_moments(y: Tensor, scratch: _Scratch | None = None) -> Tensor:
    """Per-sample (Σ y², Σ y) of one [N, C, *S] / [N, C] tensor, stacked [2, N, C] (see :func:`_moments`)."""
    return torch.stack([_per_sample_sq(y), _per_sample(y)])


class _Scratch:
    """One reusable buffer per (shape, dtype) for the element-wise products of :func:`_moments`: the
    sites run one after another, so one buffer per activation shape serves all of them, and the
    allocator does not hand out (and the OS fault in) fresh activation-sized memory several times per
    site and batch."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[Any, ...], Tensor] = {}

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        if a.dim() <= 2 or a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return a * b  # [N, C]: the product itself is the per-sample sum kept by the caller
        key = (tuple(a.shape), a.dtype, a.device)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = torch.empty_like(a, memory_format=torch.contiguous_format)
        return torch.mul(a, b, out=buf)


def _moments(cols: list[Tensor], last: Tensor | None = None, scratch: _Scratch | None = None) -> Tensor:
    """Per-channel sums of every product c_i·c_j (i ≤ j) and every c_i of the [N, C, *S] / [N, C]
    tensors ``cols``, stacked [P, C] in float64. ``last``: :func:`_self_moments` of the last column,
    already taken (its Σ y², Σ y are then not recomputed).

    Each sample's sums over its own positions are taken in the tensors' dtype, at least float32 (torch
    reduces with cascaded partial sums, so even a 512×512 map keeps ~1e-7 relative error), and the
    per-sample sums are then added in float64. Both steps are per sample, so a batch split across ranks
    gives exactly the same per-sample sums and, summed over ranks, the whole batch's totals to ~1e-16 —
    while the full-size float64 copies of every activation that a float64-only version needs (≈2×
    slower) are avoided."""
    k = len(cols)
    parts = []
    for i, a in enumerate(cols):
        for j in range(i, k):
            if last is not None and i == j == k - 1:
                parts.append(last[0])
            elif i == j:
                parts.append(_per_sample_sq(a))
            else:
                parts.append(_per_sample(scratch.mul(a, cols[j]) if scratch is not None else a * cols[j]))
    parts += [last[1] if last is not None and i == k - 1 else _per_sample(c) for i, c in enumerate(cols)]
    return torch.stack(parts).sum(1, dtype=torch.float64)


_GRAM_INDEX: dict[int, Tensor] = {}


def _gram_index(k: int) -> Tensor:
    """For (f_1..f_k, 1, y): the row of [moments; n] holding each Gram entry."""
    if k not in _GRAM_INDEX:
        cols = k + 1  # features + y
        pos, idx = {}, 0
        for i in range(cols):
            for j in range(i, cols):
                pos[(i, j)] = idx
                idx += 1
        lin, n_row = idx, idx + cols
        full = [*range(k), None, k]  # Gram order: features, the constant 1, y
        rows = [[n_row if ia is None and ib is None
                 else lin + (ib if ia is None else ia) if ia is None or ib is None
                 else pos[(min(ia, ib), max(ia, ib))] for ib in full] for ia in full]
        _GRAM_INDEX[k] = torch.tensor(rows, dtype=torch.long)
    return _GRAM_INDEX[k]


def _gram(m: Tensor, k: int, n: float | Tensor) -> Tensor:
    """The Gram matrix [C, k+2, k+2] of (f_1..f_k, 1, y) from :func:`_moments` of (f_1..f_k, y); ``n``:
    values per channel (a number, or one per channel)."""
    n_row = n.reshape(1, -1).to(m) if isinstance(n, Tensor) else m.new_full((1, m.shape[1]), n)
    ext = torch.cat([m, n_row])
    idx = _gram_index(k).to(m.device)
    return ext[idx.reshape(-1)].reshape(k + 2, k + 2, -1).permute(2, 0, 1)


def _affine_solve(m: Tensor, n: float, prior: Tensor) -> Tensor:
    """θ = (a, b) [C, 2] of the per-channel least squares y ≈ a·z + b from the sums ``m`` = (Σz², Σzy,
    Σy², Σz, Σy) [5, C] over ``n`` values per channel: a = (cov + λ·γ_prior) / (var + λ),
    b = (Σy − a·Σz) / n, with λ = 1e-9 × the site's largest variance — negligible for a live channel,
    while a dead one keeps its prior γ. Fused ops: this runs per site per batch."""
    szz, szy, _syy, sz, sy = m.unbind(0)
    mz = sz / n
    vz = torch.addcmul(szz, sz, mz, value=-1.0).clamp_min_(0)
    cov = torch.addcmul(szy, sy, mz, value=-1.0)
    lam = vz.max() * 1e-9 + 1e-30
    a = torch.addcmul(cov, lam, prior).div_(vz.add_(lam))
    b = torch.addcmul(sy, a, sz, value=-1.0).div_(n)
    return torch.stack([a, b], 1)


class _Fit:
    """Running per-channel least squares y ≈ Σ_k θ_k f_k + β for one site.

    During the pass the module's own parameters are set to the identity (γ = 1, β = 0), so its output
    *is* the normalized feature z; the fitted parameters live in ``self.theta`` and are written back
    to the module by :meth:`exit` (always, also when the pass fails)."""

    features = 1

    def __init__(self, name: str, norm: nn.Module, kind: str, active: bool, group: Any) -> None:
        self.name, self.norm, self.kind = name, norm, kind
        self.active, self.group = active, group
        self.c = int(norm.weight.numel())
        k = self.features + 1
        self.m = torch.zeros(k * (k + 1) // 2 + k, self.c, dtype=torch.float64, device=norm.weight.device)
        self.n = 0.0  # values per channel so far
        self.theta = self._read()
        self.theta0 = self.theta.clone()
        self.calls = 0
        self.busy = False
        self._cast: tuple[Tensor, ...] | None = None
        self.scratch: _Scratch | None = None

    # parameters: θ = (γ, β) in model space; coefficients = θ in regression space
    def _read(self) -> Tensor:
        return torch.stack([self.norm.weight.detach().double(), self.norm.bias.detach().double()], 1)

    def _write(self, th: Tensor) -> None:
        with torch.no_grad():
            self.norm.weight.copy_(th[:, 0].to(self.norm.weight.dtype))
            self.norm.bias.copy_(th[:, 1].to(self.norm.bias.dtype))

    def coef(self, th: Tensor) -> Tensor:
        return th

    def enter(self) -> None:
        ident = self.theta.clone()
        ident[:, 0] = 1.0
        ident[:, -1] = 0.0
        self._write(ident)

    def exit(self) -> None:
        self._write(self.theta)

    # features and output
    def feats(self, x: Tensor, out: Tensor) -> list[Tensor]:
        return [out]

    def _params(self, dtype: torch.dtype, dim: int) -> tuple[Tensor, ...]:
        if self._cast is None or self._cast[0].dim() != dim or self._cast[0].dtype != dtype:
            shape = _bshape(self.c, dim)
            rows = self.theta.t().to(dtype, memory_format=torch.contiguous_format).unbind(0)
            self._cast = tuple(r.view(shape) for r in rows)
        return self._cast

    def output(self, fs: list[Tensor], x: Tensor | None = None) -> Tensor:
        """γ·z + β; written into z when z is the norm's own fresh output (no grad, not sharing memory
        with the input ``x``), which saves an activation-sized allocation per site and batch."""
        a, b = self._params(fs[0].dtype, fs[0].dim())
        z = fs[0]
        if (torch.is_grad_enabled() or z.requires_grad or z._base is not None
                or x is None or z.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()):
            return torch.addcmul(b, z, a)
        return z.mul_(a).add_(b)

    def before_batch(self, x: Tensor, y: Tensor) -> None:
        """Gradient steps on this batch before the closed form (Switchable Norm's mixture)."""

    # sums and solve
    def add(self, fs: list[Tensor], y: Tensor, y_stats: Tensor | None = None) -> None:
        m = _moments([*fs, y], y_stats, self.scratch)
        n = float(y.numel() // self.c)
        if self.active:
            packed = _all_reduce(torch.cat([m.reshape(-1), m.new_tensor([n])]), True, self.group)
            m, n = packed[:-1].reshape(m.shape), float(packed[-1])
        self.m += m
        self.n += n

    def gram(self) -> Tensor:
        return _gram(self.m, self.features, self.n)

    def solve(self) -> None:
        if self.n <= 0:
            return
        self.theta = _affine_solve(self.m, self.n, self.theta[:, 0])
        self._cast = None

    def reset_sums(self) -> None:
        self.m.zero_()
        self.n = 0.0

    def describe(self) -> dict[str, Any]:
        return {}


class _BinFit(_Fit):
    """Batch-Instance Norm: y ≈ p·x̂_BN + q·x̂_IN + β, then γ = p + q, ρ = p/γ (clipped to [0, 1], γ and β
    re-fitted with ρ fixed where it was clipped)."""

    features = 2

    def _read(self) -> Tensor:
        m = self.norm
        return torch.stack([m.weight.detach().double(), m.rho.detach().double().clamp(0, 1), m.bias.detach().double()], 1)

    def _write(self, th: Tensor) -> None:
        m = self.norm
        with torch.no_grad():
            m.weight.copy_(th[:, 0].to(m.weight.dtype))
            m.rho.copy_(th[:, 1].to(m.rho.dtype))
            m.bias.copy_(th[:, 2].to(m.bias.dtype))

    def enter(self) -> None:
        ident = self.theta.clone()
        ident[:, 0], ident[:, 1], ident[:, 2] = 1.0, 1.0, 0.0  # the module then outputs x̂_BN
        self._write(ident)

    def coef(self, th: Tensor) -> Tensor:
        g, rho, b = th[:, 0], th[:, 1], th[:, 2]
        return torch.stack([g * rho, g * (1 - rho), b], 1)

    def feats(self, x: Tensor, out: Tensor) -> list[Tensor]:
        return [out, F.instance_norm(x, eps=self.norm.eps)]

    def output(self, fs: list[Tensor], x: Tensor | None = None) -> Tensor:
        g, rho, b = self._params(fs[0].dtype, fs[0].dim())
        return g * (rho * fs[0] + (1 - rho) * fs[1]) + b

    def solve(self) -> None:
        if self.n <= 0:
            return
        S = self.gram()
        G, r = S[:, :3, :3], S[:, :3, 3]
        p, q, b = _ridge_solve(G, r, self.coef(self.theta)).unbind(1)
        g = p + q
        ok = g.abs() > 1e-8 * (p.abs() + q.abs()).clamp_min(1e-30)
        rho = torch.where(ok, p / torch.where(ok, g, torch.ones_like(g)), self.theta[:, 1])
        clipped = (rho < 0) | (rho > 1) | ~ok
        th = torch.stack([g, rho.clamp(0, 1), b], 1)
        if clipped.any():
            # ρ fixed at its clipped value: one feature z = ρ·x̂_BN + (1 − ρ)·x̂_IN
            rc = th[clipped, 1]
            U = torch.zeros(int(clipped.sum()), 2, 3, dtype=S.dtype, device=S.device)
            U[:, 0, 0], U[:, 0, 1], U[:, 1, 2] = rc, 1 - rc, 1.0
            G1 = U @ G[clipped] @ U.transpose(1, 2)
            r1 = (U @ r[clipped].unsqueeze(-1)).squeeze(-1)
            prior = torch.stack([self.theta[clipped, 0], self.theta[clipped, 2]], 1)
            sol = _ridge_solve(G1, r1, prior)
            th[clipped, 0], th[clipped, 2] = sol[:, 0], sol[:, 1]
        self.theta = th
        self._cast = None

    def describe(self) -> dict[str, Any]:
        rho = self.theta[:, 1]
        return {"rho_mean": round(float(rho.mean()), 4), "rho_min": round(float(rho.min()), 4)}


class _SNFit(_Fit):
    """Switchable Norm: Adam steps on both mixture-logit vectors per batch (input detached, loss = the
    site's squared error with the current γ, β), then the closed-form γ, β on the new z."""

    def __init__(self, *a: Any, steps: int = SN_STEPS, lr: float = SN_LR, batches: int = SN_BATCHES, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.steps = steps
        self.step_batches = batches
        self.moved = False
        self.opt = torch.optim.Adam([self.norm.mean_logits, self.norm.var_logits], lr=lr)

    def _z(self, x: Tensor) -> Tensor:
        self.busy = True  # the module's own hook passes its output through untouched
        try:
            return self.norm(x)
        finally:
            self.busy = False

    def before_batch(self, x: Tensor, y: Tensor) -> None:
        self.moved = False
        if self.steps <= 0 or self.calls > self.step_batches:
            return
        self.moved = True
        m = self.norm
        x, y = x.detach(), y.detach()
        count = _all_reduce(torch.tensor([float(y.numel())], dtype=torch.float64, device=y.device), self.active, self.group)
        a, b = (t.detach() for t in self._params(x.dtype, x.dim()))
        with torch.enable_grad():
            for _ in range(self.steps):
                loss = ((torch.addcmul(b, self._z(x), a) - y) ** 2).sum() / float(count)
                grads = torch.autograd.grad(loss, [m.mean_logits, m.var_logits])
                flat = _all_reduce(torch.cat([g.reshape(-1) for g in grads]).double(), self.active, self.group)
                k = m.mean_logits.numel()
                m.mean_logits.grad = flat[:k].to(m.mean_logits.dtype).reshape(m.mean_logits.shape)
                m.var_logits.grad = flat[k:].to(m.var_logits.dtype).reshape(m.var_logits.shape)
                self.opt.step()
        m.mean_logits.grad = None
        m.var_logits.grad = None

    def feats(self, x: Tensor, out: Tensor) -> list[Tensor]:
        return [self._z(x)] if self.moved else [out]  # the mixture moved since `out` was computed

    def describe(self) -> dict[str, Any]:
        with torch.no_grad():
            w, wv = self.norm.mixture_weights()
        br = self.norm.branches
        return {"mean_weights": {k: round(float(v), 4) for k, v in zip(br, w)},
                "var_weights": {k: round(float(v), 4) for k, v in zip(br, wv)}}


def _fit_quality(fits: Sequence[_Fit]) -> dict[str, dict[str, float | None]]:
    """The R² and relative error of every fit that ran (by site name): one :func:`_quality` call per
    number of features, each site's channels summed apart."""
    groups: dict[int, list[_Fit]] = {}
    for f in fits:
        if f.calls > 0:
            groups.setdefault(f.features, []).append(f)
    out: dict[str, dict[str, float | None]] = {}
    for k, group in groups.items():
        m = torch.cat([f.m for f in group], 1)
        counts = torch.tensor([f.c for f in group], device=m.device)
        index = torch.repeat_interleave(torch.arange(len(group), device=m.device), counts)
        n = torch.tensor([f.n for f in group], dtype=torch.float64, device=m.device)[index]
        q = _quality(_gram(m, k, n), torch.cat([f.coef(f.theta0) for f in group]),
                     torch.cat([f.coef(f.theta) for f in group]), index, len(group))
        out.update({f.name: qi for f, qi in zip(group, q)})
    return out
