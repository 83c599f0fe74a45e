"""Where calibration reads its data: the sites, the teacher's BN outputs (hooks), distributed helpers."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from ...errors import InputError, NormswapError
from .solvers import _Scratch, _self_moments

# ---------------------------------------------------------------------------------------------------
# sites


_EXACT_TYPES = ("FrozenBatchNorm", "MeanOnlyBatchNorm", "PerChannelShift", "ChannelAffine")


def _inner(module: nn.Module) -> nn.Module:
    from ...rewriting.layers import NormAct

    return module.norm if isinstance(module, NormAct) else module


def _kind(norm: nn.Module) -> str:
    """How a swapped-in norm is calibrated: affine, bin, sn, exact or unsupported."""
    from ...norms import BatchInstanceNorm, SwitchableNorm

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
    from ...norms.registry import site_kind

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
        from ...rewriting.sites import bn_post_ops

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
    from ...norms.registry import bn_state

    s = bn_state(m)
    use_batch = s.running_mean is None
    return F.batch_norm(x, s.running_mean, s.running_var, s.weight, s.bias, use_batch, 0.0, s.eps)



def _leaves(out: Any) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]


def _model_device(m: nn.Module) -> torch.device:
    t = next(iter(m.parameters()), None)
    if t is None:
        t = next(iter(m.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def _to(batch: tuple[Tensor, ...], device: torch.device) -> tuple[Tensor, ...]:
    return tuple(t.to(device) for t in batch)
