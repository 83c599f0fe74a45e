"""Calibration: re-fit the swapped norms' affine parameters so the new model keeps the trained function.

A swap replaces each BatchNorm by a norm whose statistics differ (per sample instead of per dataset),
so copying γ, β leaves every layer's output off by a per-channel scale and shift — and the errors
compound through the network. :func:`calibrate` fixes that on unlabeled data, without training.

**What is fitted.** At every swapped site, with ``z`` the new norm's *normalized* output (its forward
with γ = 1, β = 0) and ``y`` the original BatchNorm's output at the same site (before any activation a
timm ``BatchNormAct2d`` applies), the per-channel least-squares fit

    y ≈ a · z + b            →   γ := a,  β := b

from the running per-channel sums Σz, Σz², Σy, Σzy, Σy², n (float64). Batch-Instance Norm has two
normalized features, x̂_BN and x̂_IN: the same least squares with two regressors gives
``y ≈ p·x̂_BN + q·x̂_IN + b``, i.e. γ = p + q, ρ = p / γ — a closed form; when ρ falls outside [0, 1] it is
clipped and γ, β re-fitted with ρ fixed. Switchable Norm's importance weights enter non-linearly: for
each batch, a few Adam steps (:data:`SN_STEPS`, lr :data:`SN_LR`) on the site's squared error with
the input detached move both softmax logit vectors, then γ, β get the closed form on the new ``z``.
Sites whose swap is exact (frozen, sync, wn, BN left in place) have nothing to fit and are skipped.

**The readout.** Per-channel fits cannot undo everything (a per-sample statistic is not a per-channel
constant), and the residual reaches the classifier. When the outputs still differ after the pass
(relative error > :data:`READOUT_MIN_REL`) the model's final ``nn.Linear`` — the one whose output *is*
the model's output — is refit in closed form to the original's outputs on the same data: ridge
regression toward its trained weights (λ = :data:`READOUT_RIDGE` × the mean feature energy), from
running sums FᵀF, Fᵀt (memory independent of the data size). On the digits ResNet this lifts held-out
top-1 agreement after calibration from 0.98 / 0.94 / 0.91 to 0.996 / 0.98 / 0.97 for ln / gn / gn-ws
(256 digits in batches of 32; 0.993 / 0.978 / 0.969 in batches of 64).
``readout=False`` turns it off (and it is off when ``sites`` is given).

**How it streams.** Teacher (the original, eval, with temporary forward hooks that are removed and
its train/eval flags restored afterwards; it is never modified) and student (the swapped model, eval)
run side by side on each batch. The teacher's site outputs for the current batch are copied into
buffers reused from batch to batch (memory bounded by one batch). In the student each fitted norm runs
with γ = 1, β = 0 during the pass, so its own output is ``z``; its hook adds this batch's sums to the
running totals, solves the fit from the totals and returns ``γ·z + β`` with the new γ, β — so every
later site in the same forward already sees the calibrated earlier ones (graph order = execution
order). The fitted γ, β are written into the module at the end (also when the pass fails). On the
first batch this is exactly layer-by-layer greedy calibration; later batches refine it. (Solving all
sites together once per batch after the first, with each batch's outputs from the previous fit, was
measured: no faster at batches of 64 on the digits model, 5% at 32, and 1–4 held-out digits worse for
gn / gn-ws.) ``passes=2`` repeats the pass with fresh sums (the first pass's early batches saw less
calibrated upstream layers).

**Cost.** One pass = one teacher forward + one student forward per batch, plus per site a few
reductions (each sample's sums over its positions in the activation dtype, at least float32, added up
in float64; Σz² as a norm, so no squared copy is written) and a closed-form solve; the product z·y goes
through one reused buffer per activation shape, the fitted output is written into the norm's own
output, and the teacher's outputs into reused buffers (holding on to them instead made every later
allocation of the forward fault in fresh memory), so the pass allocates little beyond the two
forwards. The report gives the call's wall time as a ratio to the teacher's forward time inside the
call; ``benchmarks/bench.py`` (section 5) measures it against separate plain forwards (see the README
for the numbers: about 2–2.6× on a ResNet-18 at 112², about 3× on the tiny 8×8 digits ResNet, whose
convolutions are so small that the per-site element-wise passes and Python hooks cost nearly as much
as they do; Switchable Norm's gradient steps cost more).

**Distributed.** When ``torch.distributed`` is initialized with more than one process, each rank
takes its contiguous shard of every batch (``shard_batches=True``; pass False if your batches already
are this rank's) and the per-site sums (and Switchable Norm's gradients) are all-reduced before every
solve, so all ranks hold the same parameters as one process on the whole data (up to float rounding of
the sums).

**When it cannot help.** A per-channel affine cannot restore information the new norm removed:
Instance Norm erases each sample's per-channel means, which a classifier may depend on; weight
standardization removes each filter's mean. The report marks a site ``low-r2`` when the fit explains
less than :data:`LOW_R2` of the original's output variance, and ``cannot-help`` when in addition the
fit barely improved on the naive γ, β (R² gain < :data:`MIN_R2_GAIN`) — on the digits ResNet that is
every deep ``in`` site and most ``gn-ws`` sites — with a warning to recover by training
(:func:`normswap.recover.recover`).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .data import as_batches, local_batch
from .errors import InputError, NormswapError
from .norms.ws import standardized_once
from .parity import eval_mode

__all__ = [
    "LOW_R2",
    "MIN_R2_GAIN",
    "READOUT_RIDGE",
    "SN_BATCHES",
    "SN_LR",
    "SN_STEPS",
    "CalibrationReport",
    "SiteCalibration",
    "accuracy",
    "agreement",
    "agreement_and_drift",
    "calibrate",
    "layer_drift",
    "swapped_sites",
]

#: A site whose best per-channel affine fit explains less than this share of the original's output
#: variance is reported as one calibration cannot fix.
LOW_R2 = 0.9
#: ... and one whose R² rose by less than this over the naive (copied) γ, β is one calibration cannot help.
MIN_R2_GAIN = 0.1
#: Switchable Norm: Adam steps on the mixture logits per batch, and their learning rate.
SN_STEPS = 4
SN_LR = 0.2
#: ... taken on the first this many batches of the first pass (bounding their cost); later batches
#: only refine γ, β in closed form.
SN_BATCHES = 1
#: The readout refit: ridge strength toward the trained readout, relative to the mean feature energy;
#: and the output relative error (during the pass) below which the readout is left alone.
READOUT_RIDGE = 1e-3
READOUT_MIN_REL = 1e-3


# ---------------------------------------------------------------------------------------------------
# distributed helpers


def _dist_group(dist: Any) -> tuple[bool, Any, int, int]:
    """(active, group, rank, world) from the ``dist`` argument (None = auto, False = off, a group)."""
    if dist is False:
        return False, None, 0, 1
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        if dist not in (None, True):
            raise InputError("a process group was given but torch.distributed is not initialized")
        return False, None, 0, 1
    group = None if dist in (None, True) else dist
    world = tdist.get_world_size(group)
    rank = tdist.get_rank(group)
    return world > 1, group, rank, world


def _all_reduce(t: Tensor, active: bool, group: Any) -> Tensor:
    if active:
        import torch.distributed as tdist

        tdist.all_reduce(t, group=group)
    return t


# ---------------------------------------------------------------------------------------------------
# sites


_EXACT_TYPES = ("FrozenBatchNorm", "MeanOnlyBatchNorm", "PerChannelShift", "ChannelAffine")


def _inner(module: nn.Module) -> nn.Module:
    from .layers import NormAct

    return module.norm if isinstance(module, NormAct) else module


def _kind(norm: nn.Module) -> str:
    """How a swapped-in norm is calibrated: affine, bin, sn, exact or unsupported."""
    from .norms import BatchInstanceNorm, SwitchableNorm

    if isinstance(norm, SwitchableNorm):
        return "sn"
    if isinstance(norm, BatchInstanceNorm):
        return "bin"
    if isinstance(norm, nn.modules.batchnorm._BatchNorm) or type(norm).__name__ in _EXACT_TYPES:
        return "exact"
    w, b = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if isinstance(w, nn.Parameter) and isinstance(b, nn.Parameter) and w.dim() == 1 and w.shape == b.shape:
        return "affine"
    return "unsupported"


def swapped_sites(original: nn.Module, model: nn.Module, conversion: Any = None, sites: Iterable[str] | None = None) -> list[str]:
    """Qualified names of the BN sites that were swapped (from the conversion's actions, else every BN of
    ``original`` whose module in ``model`` has another type), optionally restricted to ``sites``."""
    from .norms.registry import site_kind

    if conversion is not None:
        names = list(dict.fromkeys(a.site for a in conversion.actions if a.action == "swapped"))
    else:
        mods = dict(model.named_modules())
        names = [n for n, m in original.named_modules()
                 if n and site_kind(m) is not None and n in mods and type(mods[n]) is not type(m)]
    if sites is not None:
        wanted = list(dict.fromkeys(sites))
        unknown = [s for s in wanted if s not in names]
        if unknown:
            raise InputError(
                f"calibration sites {', '.join(unknown[:5])} are not swapped sites; choose from: {', '.join(names[:12])}"
            )
        names = [n for n in names if n in set(wanted)]
    return names


class _TeacherTap:
    """Forward hooks on the teacher's BN modules recording each call's BN output (before any act).

    The recorded tensor is the module's own output, which a later in-place op of the teacher (a
    torchvision ``ReLU(inplace=True)`` right after the BN) overwrites before anyone reads it. So the
    first call at each site records a copy and watches the original's version counter; a site whose
    output was changed in place keeps being copied, the others are recorded as is — and still checked
    when read (:meth:`pop`), so a stale value is never used silently. With ``reuse`` (calibration, which
    reads each value before the next forward) every output is copied into a buffer reused from forward
    to forward instead."""

    def __init__(self, teacher: nn.Module, names: Sequence[str], stats: bool = False, scratch: _Scratch | None = None,
                 reuse: bool = False) -> None:
        from .sites import bn_post_ops

        #: per call: (value, the module's output tensor when watched, its version when recorded)
        self.outputs: dict[str, deque[tuple[Tensor, Tensor | None, int]]] = {n: deque() for n in names}
        #: per site: does its output get changed in place later in the forward? (None: not known yet)
        self.copy: dict[str, bool | None] = {n: None for n in names}
        #: with ``stats``: per call, the per-sample sums (Σ y², Σ y) of the output, taken in the hook
        #: while the output is still in cache (the student's hook needs them much later)
        self.stats: dict[str, deque[Tensor]] | None = {n: deque() for n in names} if stats else None
        self.scratch = scratch
        #: with ``reuse``: every output is copied into a buffer kept per (site, call of the forward) and
        #: overwritten by the next forward — so a value is valid until then. Holding on to the teacher's
        #: own outputs instead keeps its allocator from reusing their memory: every later activation of
        #: the forward is fresh memory the OS has to fault in (≈0.45 of a forward on the digits model at
        #: 2 threads; the copies cost ≈0.1).
        self.reuse = reuse
        self.buffers: dict[tuple[str, int], Tensor] = {}
        self.calls: dict[str, int] = {n: 0 for n in names}
        self.seconds = 0.0  # time spent in the hooks (calibration work, not the teacher's forward)
        self.enabled = True
        self.handles = []
        mods = dict(teacher.named_modules())
        missing = [n for n in names if n not in mods]
        if missing:  # checked before any hook goes onto the caller's teacher, so none is left behind
            raise InputError(f"site {missing[0]} is not a module of the original model")
        for n in names:
            m = mods[n]
            drop, act = bn_post_ops(m)
            plain = drop is None and act is None
            self.handles.append(m.register_forward_hook(self._hook(n, m, plain)))

    def _hook(self, name: str, m: nn.Module, plain: bool):
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if self.enabled:
                t0 = time.perf_counter()
                # plain: the module's own output, which the rest of the forward may overwrite in place;
                # otherwise (a BN-act module) the normalization before the act, a fresh tensor
                y = out.detach() if plain else _bn_eval(mod, args[0]).detach()
                if self.reuse:
                    key = (name, self.calls[name])
                    self.calls[name] += 1
                    buf = self.buffers.get(key)
                    if buf is None or buf.shape != y.shape or buf.dtype != y.dtype or buf.device != y.device:
                        buf = self.buffers[key] = torch.empty_like(y, memory_format=torch.contiguous_format)
                    y = buf.copy_(y)
                    entry = (y, None, 0)
                elif not plain:  # a fresh tensor nobody else holds
                    entry = (y, None, 0)
                elif y.is_inference():  # no version counter to watch
                    entry = (y.clone(), None, 0)
                elif self.copy[name] is False:
                    entry = (y, y, y._version)
                else:
                    entry = (y.clone(), y, y._version)
                self.outputs[name].append(entry)
                if self.stats is not None:
                    self.stats[name].append(_self_moments(y, self.scratch))
                self.seconds += time.perf_counter() - t0
        return hook

    def pop(self, name: str) -> Tensor | None:
        """The oldest recorded output at ``name`` (None when there is none); call after the teacher's forward."""
        q = self.outputs[name]
        if not q:
            return None
        value, watched, version = q.popleft()
        if watched is not None:
            changed = watched._version != version
            if value is watched and changed:
                raise NormswapError(
                    f"site {name}: the original's BatchNorm output was changed in place later in its forward, "
                    "though it was not on the first batch (data-dependent in-place ops?); cannot read the BN's output"
                )
            if value is not watched:
                self.copy[name] = bool(changed) or bool(self.copy[name])
        return value

    def clear(self) -> None:
        for q in self.outputs.values():
            q.clear()
        for n in self.calls:
            self.calls[n] = 0
        for q in (self.stats or {}).values():
            q.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _bn_eval(m: nn.Module, x: Tensor) -> Tensor:
    """The normalization a BN(-Act) module applies (eval mode), without its activation."""
    from .norms.registry import bn_state

    s = bn_state(m)
    use_batch = s.running_mean is None
    return F.batch_norm(x, s.running_mean, s.running_var, s.weight, s.bias, use_batch, 0.0, s.eps)


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


@dataclass
class SiteCalibration:
    """The fit at one site: R² and relative RMS error of the site's output against the original's,
    with the naive (copied) parameters (``*_before``) and the fitted ones (``*_after``), both on the
    inputs the site saw during calibration (its upstream already calibrated)."""

    site: str
    norm: str
    kind: str
    channels: int = 0
    calls: int = 0
    r2_before: float | None = None
    r2_after: float | None = None
    rel_before: float | None = None
    rel_after: float | None = None
    status: str = "fitted"  # fitted | low-r2 | cannot-help | exact | unsupported | not-run
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("site", "norm", "kind", "channels", "calls", "r2_before", "r2_after",
                                            "rel_before", "rel_after", "status", "note")}
        for k in ("r2_before", "r2_after", "rel_before", "rel_after"):
            if d[k] is not None:
                d[k] = round(float(d[k]), 6)
        if self.extra:
            d.update(self.extra)
        return d


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


class _Readout:
    """Closed-form refit of the model's final Linear (the readout) to the original's outputs:
    W = argmin ‖[f, 1]·W − t‖² + λ‖W − W₀‖² (bias unpenalized), λ = READOUT_RIDGE · mean feature energy,
    from running sums FᵀF, Fᵀt (memory O(D² + D·K), independent of the data size)."""

    def __init__(self, name: str, linear: nn.Linear, active: bool, group: Any) -> None:
        self.name, self.linear, self.active, self.group = name, linear, active, group
        d, k = linear.in_features, linear.out_features
        dev = linear.weight.device
        self.S = torch.zeros(d + 1 + k, d + 1 + k, dtype=torch.float64, device=dev)
        w0 = linear.weight.detach().double()
        b0 = linear.bias.detach().double() if linear.bias is not None else torch.zeros(k, dtype=torch.float64, device=dev)
        self.W0 = torch.cat([w0.t(), b0[None]], 0)  # [D+1, K]
        self.W = self.W0.clone()

    def add(self, f: Tensor, t: Tensor) -> None:
        f = f.detach().reshape(-1, f.shape[-1]).double()
        t = t.detach().reshape(-1, t.shape[-1]).double()
        F_ = torch.cat([f, torch.ones(f.shape[0], 1, dtype=f.dtype, device=f.device), t], 1)
        self.S += _all_reduce(F_.t() @ F_, self.active, self.group)

    def solve(self) -> None:
        d1 = self.W0.shape[0]
        G, R = self.S[:d1, :d1], self.S[:d1, d1:]
        lam = READOUT_RIDGE * float(torch.diagonal(G)[:-1].mean().clamp_min(1e-30))
        pen = torch.eye(d1, dtype=G.dtype, device=G.device)
        pen[-1, -1] = 0.0
        self.W = torch.linalg.solve(G + lam * pen, R + lam * pen @ self.W0)

    def quality(self) -> dict[str, float]:
        d1 = self.W0.shape[0]
        G, R, tt = self.S[:d1, :d1], self.S[:d1, d1:], float(torch.diagonal(self.S[d1:, d1:]).sum())

        def rel(W: Tensor) -> float:
            sse = tt - 2 * float((W * R).sum()) + float((W * (G @ W)).sum())
            return math.sqrt(max(sse, 0.0) / tt) if tt > 0 else 0.0

        return {"rel_before": rel(self.W0), "rel_after": rel(self.W), "samples": round(float(G[-1, -1]))}

    def write(self) -> None:
        with torch.no_grad():
            self.linear.weight.copy_(self.W[:-1].t().to(self.linear.weight.dtype))
            if self.linear.bias is not None:
                self.linear.bias.copy_(self.W[-1].to(self.linear.bias.dtype))


# ---------------------------------------------------------------------------------------------------
# report


@dataclass
class CalibrationReport:
    """What :func:`calibrate` did: per-site fits, the readout refit, agreement during the last pass, cost.

    ``agreement`` is measured on the calibration data *during* the last pass (each batch with the
    parameters fitted so far, before the readout refit); measure held-out agreement with
    :func:`agreement`. ``cost_ratio`` = wall time of the whole call / time of one forward of the
    original over the same data (the teacher's forwards, timed inside the call minus the time spent in
    calibration's own hooks on it). ``benchmarks/bench.py`` measures the same ratio against separate
    plain forward passes."""

    sites: list[SiteCalibration]
    samples: int = 0
    batches: int = 0
    passes: int = 1
    seconds: float = 0.0
    teacher_seconds: float = 0.0
    world_size: int = 1
    agreement: dict[str, float | None] = field(default_factory=dict)
    readout: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def cost_ratio(self) -> float | None:
        if self.teacher_seconds <= 0:
            return None
        return self.seconds / (self.teacher_seconds / max(self.passes, 1))

    @property
    def low_r2_sites(self) -> list[str]:
        """Sites whose fit explains less than LOW_R2 of the original's output (both kinds)."""
        return [s.site for s in self.sites if s.status in ("low-r2", "cannot-help")]

    @property
    def cannot_help_sites(self) -> list[str]:
        """Low-R² sites where calibration barely improved on the naive γ, β."""
        return [s.site for s in self.sites if s.status == "cannot-help"]

    def to_dict(self) -> dict[str, Any]:
        cr = self.cost_ratio
        return {
            "samples": self.samples,
            "batches": self.batches,
            "passes": self.passes,
            "world_size": self.world_size,
            "seconds": round(self.seconds, 4),
            "original_forward_seconds": round(self.teacher_seconds / max(self.passes, 1), 4),
            "cost_ratio": None if cr is None else round(cr, 3),
            "agreement_during_pass": {k: (None if v is None else round(float(v), 6)) for k, v in self.agreement.items()},
            "readout": self.readout,
            "low_r2_sites": self.low_r2_sites,
            "cannot_help_sites": self.cannot_help_sites,
            "warnings": list(self.warnings),
            "sites": [s.to_dict() for s in self.sites],
        }

    def summary(self) -> str:
        fitted = sum(s.status in ("fitted", "low-r2", "cannot-help") for s in self.sites)
        cr = self.cost_ratio
        agr = self.agreement.get("top1_agreement")
        parts = [f"calibrated {fitted}/{len(self.sites)} site(s) on {self.samples} samples"
                 f" ({self.passes} pass{'es' if self.passes > 1 else ''}, {self.seconds:.2f}s"
                 + (f", {cr:.2f}× one forward of the original" if cr is not None else "") + ")"]
        if agr is not None:
            parts.append(f"top-1 agreement during the pass {agr:.4f}")
        if self.readout and self.readout.get("refit"):
            parts.append(f"readout {self.readout['module']} refit (output rel err {self.readout['rel_before']:.3f} → {self.readout['rel_after']:.3f})")
        if self.low_r2_sites:
            parts.append(f"{len(self.low_r2_sites)} site(s) with R² < {LOW_R2}"
                         + (f", {len(self.cannot_help_sites)} of them beyond calibration's reach" if self.cannot_help_sites else ""))
        return "; ".join(parts)

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        t = Table(title="calibration (per site: the original BN's output vs the new norm's)", title_justify="left")
        for col in ("site", "norm", "R² before", "R² after", "rel err before", "rel err after", "status"):
            t.add_column(col, overflow="fold")

        def f(v: float | None, digits: int = 4) -> str:
            return "—" if v is None else f"{v:.{digits}f}"

        for s in self.sites:
            style = {"fitted": "green", "low-r2": "yellow", "cannot-help": "red", "exact": "cyan"}.get(s.status, "yellow")
            t.add_row(s.site, s.norm, f(s.r2_before), f(s.r2_after), f(s.rel_before), f(s.rel_after),
                      f"[{style}]{s.status}[/]" + (f" {s.note}" if s.note else ""))
        lines: list[Any] = [t, Text(self.summary())]
        lines += [Text(w, style="yellow") for w in self.warnings]
        return Group(*lines)


# ---------------------------------------------------------------------------------------------------
# the pass


def _leaves(out: Any) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]


class _Agreement:
    """Running top-1 agreement (first output, when it is [N, K]) and relative error of all outputs
    (float64 tensors, read once at the end: no device sync per batch)."""

    def __init__(self) -> None:
        self.acc: Tensor | None = None  # [match, count, err², ref²]

    def add(self, ref: Any, out: Any) -> None:
        for i, (r, o) in enumerate(zip(_leaves(ref), _leaves(out))):
            if r.shape != o.shape or not r.is_floating_point():
                continue
            r64, o64 = r.detach().double(), o.detach().double()
            parts = [torch.zeros((), dtype=torch.float64, device=r.device)] * 2
            if i == 0 and r64.dim() == 2 and r64.shape[1] > 1:
                parts = [(r64.argmax(1) == o64.argmax(1)).sum().double(),
                         torch.tensor(float(r64.shape[0]), dtype=torch.float64, device=r.device)]
            v = torch.stack([*parts, ((o64 - r64) ** 2).sum(), (r64 * r64).sum()])
            self.acc = v if self.acc is None else self.acc + v

    def reduce(self, active: bool, group: Any, device: torch.device) -> None:
        if self.acc is None:
            self.acc = torch.zeros(4, dtype=torch.float64, device=device)
        self.acc = _all_reduce(self.acc.to(device), active, group)

    def result(self) -> dict[str, float | None]:
        match, count, err, ref = (float(v) for v in (self.acc if self.acc is not None else torch.zeros(4)))
        return {
            "top1_agreement": match / count if count else None,
            "rel_err": math.sqrt(err / ref) if ref > 0 else None,
        }


def _model_device(m: nn.Module) -> torch.device:
    t = next(iter(m.parameters()), None)
    if t is None:
        t = next(iter(m.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def _to(batch: tuple[Tensor, ...], device: torch.device) -> tuple[Tensor, ...]:
    return tuple(t.to(device) for t in batch)


class _ReadoutProbe:
    """On the first batch: hooks on every nn.Linear find the one whose output *is* the model's
    output (the readout) and keep its input for the sums."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: dict[str, tuple[Tensor, Tensor]] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in model.named_modules()
                        if type(m) is nn.Linear]

    def _hook(self, name: str):
        def h(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if args and isinstance(args[0], Tensor):
                self.seen[name] = (args[0], out)
        return h

    def find(self, out: Any) -> tuple[str | None, Tensor | None]:
        leaves = _leaves(out)
        first = leaves[0] if leaves else None
        for name, (x, o) in self.seen.items():
            if first is not None and o is first:
                return name, x
        return None, None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.seen = {}


def calibrate(
    original: nn.Module,
    conversion_or_model: Any,
    batches: Any,
    *,
    sites: Iterable[str] | None = None,
    dist: Any = None,
    passes: int = 1,
    readout: bool | None = None,
    shard_batches: bool = True,
    sn_steps: int = SN_STEPS,
    sn_lr: float = SN_LR,
    sn_batches: int = SN_BATCHES,
    on_batch: Any = None,
) -> CalibrationReport:
    """Fit the swapped norms' γ, β (Switchable Norm: also its mixture; Batch-Instance Norm: also ρ) so
    each site's output matches the original BatchNorm's on ``batches`` (see the module docstring).

    ``conversion_or_model``: a :class:`~normswap.Conversion` (its ``.model`` is calibrated *in place*)
    or the swapped ``nn.Module`` itself. ``original`` is not modified (it runs as the teacher with temporary hooks; its flags are restored).
    ``batches``: :func:`normswap.data.calibration_batches` output, a tensor, or an iterable of
    tensors / tuples of input tensors (re-iterable when ``passes`` > 1). ``sites``: calibrate only
    these site names. ``readout``: refit the final Linear to the original's outputs (None = when the
    outputs still differ, rel err > READOUT_MIN_REL, and ``sites`` is not given). ``dist``: None (use
    torch.distributed when initialized with > 1 process), False (never), or a process group.
    ``on_batch``: called with no argument after each calibration batch (progress).
    """
    from .convert import Conversion

    if passes < 1:
        raise InputError(f"passes must be at least 1, got {passes}")
    conv = conversion_or_model if isinstance(conversion_or_model, Conversion) else None
    student = conv.model if conv is not None else conversion_or_model
    if not isinstance(student, nn.Module) or not isinstance(original, nn.Module):
        raise InputError("calibrate(original, conversion_or_model, batches): give the original nn.Module and a Conversion or nn.Module")
    if readout is None:
        readout_mode = "auto" if sites is None else "off"
    else:
        readout_mode = "on" if readout else "off"
    names = swapped_sites(original, student, conv, sites)
    active, group, rank, world = _dist_group(dist)
    data = as_batches(batches)

    if student is original:
        raise InputError("calibrate needs the original model and a swapped copy, not the same module twice")
    t_start = time.perf_counter()
    teacher = original  # forward hooks only, removed after; its training flags are restored
    smods = dict(student.named_modules())
    report_sites: list[SiteCalibration] = []
    fits: dict[str, _Fit] = {}
    for n in names:
        if n not in smods:
            raise InputError(f"site {n} is not a module of the swapped model")
        norm = _inner(smods[n])
        kind = _kind(norm)
        rs = SiteCalibration(site=n, norm=type(norm).__name__, kind=kind)
        if kind == "exact":
            rs.status, rs.note = "exact", "the swap keeps the eval function: nothing to fit"
        elif kind == "unsupported":
            rs.status, rs.note = "unsupported", f"{type(norm).__name__} has no per-channel weight and bias to fit"
        else:
            cls = {"affine": _Fit, "bin": _BinFit, "sn": _SNFit}[kind]
            kw = {"steps": sn_steps, "lr": sn_lr, "batches": sn_batches} if kind == "sn" else {}
            fits[n] = cls(n, norm, kind, active, group, **kw)
            rs.channels = fits[n].c
        report_sites.append(rs)

    scratch = _Scratch()
    for f in fits.values():
        f.scratch = scratch
    tap = _TeacherTap(teacher, list(fits), stats=True, scratch=scratch, reuse=True)
    order: list[str] = []

    def student_hook(name: str, fit: _Fit):
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            if fit.busy:
                return None
            y = tap.pop(name)
            if y is None:
                raise NormswapError(
                    f"site {name} ran more often in the swapped model than in the original; calibration needs "
                    "the same call sequence (data-dependent control flow?)"
                )
            y_stats = tap.stats[name].popleft() if tap.stats is not None else None
            x = args[0]
            if out.shape != y.shape:
                raise NormswapError(f"site {name}: the new norm's output {list(out.shape)} and the original's {list(y.shape)} differ")
            if fit.calls == 0:
                order.append(name)
            fit.calls += 1
            fit.before_batch(x, y)
            fs = fit.feats(x, out)
            fit.add(fs, y, y_stats)
            fit.solve()
            return fit.output(fs, x)
        return hook

    device = _model_device(student)
    samples = nbatches = 0
    teacher_seconds = 0.0
    agree = _Agreement()
    head: _Readout | None = None
    probe: _ReadoutProbe | None = _ReadoutProbe(student) if readout_mode != "off" and fits else None
    handles = []
    entered: list[_Fit] = []
    try:
        for f in fits.values():
            f.enter()
            entered.append(f)
        handles = [_inner(smods[n]).register_forward_hook(student_hook(n, f)) for n, f in fits.items()]
        with eval_mode(teacher, student), standardized_once(student), torch.no_grad():
            for p in range(passes):
                if p > 0:
                    for f in fits.values():
                        f.reset_sums()
                    if head is not None:
                        head.S.zero_()
                agree = _Agreement()
                samples = nbatches = 0
                for batch in data:
                    if active and shard_batches:
                        batch = local_batch(batch, rank, world)
                        if batch is None:
                            continue
                    batch = _to(batch, device)
                    t0, hooks0 = time.perf_counter(), tap.seconds
                    ref = teacher(*batch)
                    teacher_seconds += time.perf_counter() - t0 - (tap.seconds - hooks0)
                    out = student(*batch)
                    agree.add(ref, out)
                    if on_batch is not None:
                        on_batch()
                    if probe is not None:
                        name, feats = probe.find(out)
                        probe.remove()
                        probe = None
                        lin = smods.get(name) if name is not None else None
                        if isinstance(lin, nn.Linear):
                            head = _Readout(name, lin, active, group)
                            head_h = lin.register_forward_hook(lambda m, a, o, h=head: setattr(h, "_last", a[0]))
                            handles.append(head_h)
                            head._last = feats  # type: ignore[attr-defined]
                    if head is not None:
                        head.add(head._last, _leaves(ref)[0])  # type: ignore[attr-defined]
                        head._last = None  # type: ignore[attr-defined]
                    tap.clear()
                    samples += int(batch[0].shape[0])
                    nbatches += 1
                if nbatches == 0:
                    if p > 0:
                        raise InputError(f"passes={passes} needs re-iterable calibration data (a list or calibration_batches(...)); "
                                         "the iterator was used up by the first pass")
                    raise InputError("calibration data yielded no batches; give at least one sample")
            agree.reduce(active, group, device)
            if active:
                t = _all_reduce(torch.tensor([float(samples)], dtype=torch.float64, device=device), active, group)
                samples = int(t.item())
    finally:
        if probe is not None:
            probe.remove()
        for h in handles:
            h.remove()
        tap.remove()
        for f in entered:
            f.exit()

    readout_info: dict[str, Any] | None = None
    if head is not None:
        rel_now = agree.result()["rel_err"] or 0.0
        do = readout_mode == "on" or (readout_mode == "auto" and rel_now > READOUT_MIN_REL)
        if do:
            head.solve()
            head.write()
        q = head.quality()
        readout_info = {"module": head.name, "refit": do, "ridge": READOUT_RIDGE,
                        "rel_before": round(q["rel_before"], 6), "rel_after": round(q["rel_after"], 6)}
        if not do:
            readout_info["note"] = f"outputs already match (rel err {rel_now:.1e} ≤ {READOUT_MIN_REL})"
    seconds = time.perf_counter() - t_start

    warnings: list[str] = []
    qualities = _fit_quality(list(fits.values()))
    for rs in report_sites:
        f = fits.get(rs.site)
        if f is None:
            continue
        rs.calls = f.calls
        if f.calls == 0:
            rs.status, rs.note = "not-run", "the site never ran on the calibration data"
            continue
        q = qualities[rs.site]
        rs.r2_before, rs.r2_after, rs.rel_before, rs.rel_after = q["r2_before"], q["r2_after"], q["rel_before"], q["rel_after"]
        rs.extra = f.describe()
        if rs.r2_after is not None and rs.r2_after < LOW_R2:
            gain = rs.r2_after - (rs.r2_before if rs.r2_before is not None else rs.r2_after)
            if gain < MIN_R2_GAIN:
                rs.status = "cannot-help"
                rs.note = (f"R² {rs.r2_after:.2f}, and the naive γ/β already had {rs.r2_before:.2f}: no per-channel "
                           f"scale/shift restores what {rs.norm} removes here")
            else:
                rs.status = "low-r2"
                rs.note = f"calibration raised R² {rs.r2_before:.2f} → {rs.r2_after:.2f}, still below {LOW_R2}"
            why = _why_lossy(rs.norm, conv)
            if why:
                rs.note += f" ({why})"

    def names(sites: list[SiteCalibration]) -> str:
        return ", ".join(s.site for s in sites[:4]) + (", ..." if len(sites) > 4 else "")

    stuck = [s for s in report_sites if s.status == "cannot-help"]
    partial = [s for s in report_sites if s.status == "low-r2"]
    if stuck:
        why = _why_lossy(stuck[0].norm, conv)
        warnings.append(f"calibration cannot help at {len(stuck)} site(s) ({names(stuck)}): R² stays below {LOW_R2} and "
                        f"barely moves{f' — {why}' if why else ''}; recover by training (normswap recover)")
    if partial:
        warnings.append(f"{len(partial)} site(s) ({names(partial)}) stay below R² {LOW_R2} after calibration; "
                        "a short recovery (normswap recover) usually closes the gap")
    rank_of = {n: i for i, n in enumerate(order)}
    report_sites.sort(key=lambda s: rank_of.get(s.site, len(order)))
    return CalibrationReport(
        sites=report_sites, samples=samples, batches=nbatches, passes=passes, seconds=seconds,
        teacher_seconds=teacher_seconds, world_size=world, agreement=agree.result(), readout=readout_info,
        warnings=warnings,
    )


# ---------------------------------------------------------------------------------------------------
# metrics


def agreement(original: nn.Module, model: nn.Module, inputs: Any, *, dist: Any = False,
              shard_batches: bool = True) -> dict[str, float | None]:
    """Top-1 agreement (first output, when it is [N, K]) and relative error ‖out − ref‖/‖ref‖ of
    ``model`` against ``original`` on ``inputs`` (a tensor or an iterable of batches), both in eval mode;
    neither model is changed (training flags are restored). Under ``dist`` each rank evaluates its
    shard of every batch (``shard_batches=False``: the batches already are this rank's) and the counts
    are all-reduced."""
    return _evaluate(original, model, inputs, [], dist=dist, shard_batches=shard_batches)[0]


def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch: int = 256) -> float:
    """Top-1 accuracy of ``model`` (eval mode, training flags restored) on labelled data."""
    correct = 0
    device = _model_device(model)
    with eval_mode(model):
        for i in range(0, len(x), batch):
            out = model(x[i:i + batch].to(device))
            correct += int((_leaves(out)[0].argmax(1).cpu() == y[i:i + batch]).sum())
    return correct / max(len(x), 1)


def layer_drift(original: nn.Module, model: nn.Module, inputs: Any, *, sites: Sequence[str] | None = None,
                conversion: Any = None) -> dict[str, float]:
    """Per swapped site, in execution order: ‖y_new − y_orig‖ / ‖y_orig‖ of the site's output over
    ``inputs`` — the original BN's output (before any activation) against the new norm's, each model
    running on its own activations, so errors accumulated upstream show."""
    names = list(sites) if sites is not None else swapped_sites(original, model, conversion)
    return _evaluate(original, model, inputs, names)[1]


def agreement_and_drift(original: nn.Module, model: nn.Module, inputs: Any, *, sites: Sequence[str] | None = None,
                        conversion: Any = None) -> tuple[dict[str, float | None], dict[str, float]]:
    """:func:`agreement` and :func:`layer_drift` from one run of both models over ``inputs``."""
    names = list(sites) if sites is not None else swapped_sites(original, model, conversion)
    return _evaluate(original, model, inputs, names)


def _evaluate(original: nn.Module, model: nn.Module, inputs: Any, sites: Sequence[str], *, dist: Any = False,
              shard_batches: bool = True) -> tuple[dict[str, float | None], dict[str, float]]:
    """Run both models (eval, flags restored) over ``inputs`` once: output agreement, and the
    per-site drift of ``sites`` (float64 sums kept as tensors, read once at the end)."""
    active, group, rank, world = _dist_group(dist)
    smods = dict(model.named_modules())
    names = [n for n in sites if n in smods]
    tap = _TeacherTap(original, names)
    sums: dict[str, Tensor] = {}  # site → [‖y_new − y_orig‖², ‖y_orig‖²]

    def hook(name: str):
        def h(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            t = tap.pop(name)
            if t is None:
                return
            y = t.double()
            o = out.detach().double()
            if o.shape == y.shape:
                v = torch.stack([((o - y) ** 2).sum(), (y * y).sum()])
                sums[name] = sums[name] + v if name in sums else v  # insertion order = execution order
        return h

    handles = [_inner(smods[n]).register_forward_hook(hook(n)) for n in names]
    agg = _Agreement()
    device = _model_device(model)
    try:
        with eval_mode(original, model):
            for batch in as_batches(inputs):
                if active and shard_batches:
                    batch = local_batch(batch, rank, world)
                    if batch is None:
                        continue
                batch = _to(batch, device)
                agg.add(original(*batch), model(*batch))
                tap.clear()
    finally:
        for h in handles:
            h.remove()
        tap.remove()
    agg.reduce(active, group, device)
    drift = {}
    for n, v in sums.items():
        err, ref = (float(x) for x in _all_reduce(v, active, group))
        drift[n] = math.sqrt(err / ref) if ref > 0 else 0.0
    return agg.result(), drift
