"""Calibration never makes the held-out loss worse: the checks, in as few held-out passes as they need.

Passes over the held-out data (each batch: the original once, the student once):

1. **screen** — the original with taps on the sites, then the student with the fitted parameters. It
   gives the fitted model's kind loss (per sample), the loss with the readout's trained weights (the
   readout layer run again on the same features: no second forward), and at every site the paired
   per-sample error ‖site output − original's output‖² with the fitted and with the previous
   parameters (the previous ones run on the same input). A site is *screened worse* when its fitted
   error exceeds the previous one beyond noise (:mod:`normswap.keep.calibrate.paired`).
2. **naive** — the student with every previous parameter: the loss calibration must not exceed.
3. **revert** (only when some site screened worse) — those sites put back together.

With a :class:`HeldoutRecord` (what :func:`normswap.keep.recover.keep_function`'s naive measure already ran:
both models over the held-out data), pass 2 is not run — the naive swap's outputs are in the record — and
pass 1 runs only the student: the original's outputs and its site outputs come from the record too (its
site outputs only within :data:`RECORD_BYTES`; beyond it the original runs again in pass 1 for them).

Each decision (readout; the screened-worse sites; everything vs the naive swap) keeps the option with
the lower held-out kind loss — never worse on the held-out data — and records both losses with the
paired noise figure and the sample count it rests on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from ...load.data import as_batches, local_batch
from ...errors import InputError
from ..kinds import Meter
from ...norms.ws import standardized_once
from ...parity import eval_mode
from .dist import _all_reduce
from .paired import Paired, paired
from .report import SiteCalibration
from .taps import _TeacherTap, _to


def _state(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _load(m: nn.Module, state: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for k, v in m.state_dict().items():
            v.copy_(state[k])


def _call_with(mod: nn.Module, state: dict[str, Tensor], args: tuple[Any, ...]) -> Any:
    """``functional_call(mod, state, args)`` without its reparametrization machinery when every key of
    ``state`` is one of the module's own parameters or buffers: those entries are swapped in and put
    back (a few dict writes instead of ≈0.5 ms per call, once per site and held-out batch)."""
    own = [(mod._parameters if k in mod._parameters else mod._buffers, k) for k in state]
    if not all(k in d and d[k] is not None for d, k in own):
        return functional_call(mod, state, args)
    saved = [d[k] for d, k in own]
    try:
        for (d, k) in own:
            d[k] = state[k]
        return mod(*args)
    finally:
        for (d, k), v in zip(own, saved):
            d[k] = v


def _rows(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


def per_sample_loss(outputs: Any, out: Any, ref: Any) -> Tensor:
    """The kinds' distillation loss (temperature 1) of each sample, summed over the outputs
    (:meth:`normswap.keep.kinds.Outputs.sample_losses`: one vectorized call per batch; their mean is the batch loss)."""
    return outputs.sample_losses(out, ref, 1.0)


def _sq_err(a: Tensor, y: Tensor) -> Tensor:
    """‖a_i − y_i‖² of each sample, float64 [N] (one temporary: the difference)."""
    d = a - y
    return torch.linalg.vector_norm(d.reshape(d.shape[0], -1), 2, 1, dtype=torch.float64).square()


@dataclass
class _Eval:
    """One state of the student on the held-out data: mean kind loss, measures, per-sample losses."""

    loss: float
    measures: Any
    per_sample: Tensor


class _Acc:
    """Running held-out loss (batch losses weighted by batch size, as the report states it) + meter."""

    def __init__(self, held: "_Heldout") -> None:
        self.held, self.meter = held, Meter(held.outputs)
        self.total = torch.zeros(2, dtype=torch.float64, device=held.device)
        self.samples: list[Tensor] = []

    def add(self, ref: Any, out: Any, n: int) -> None:
        o = self.held.outputs
        self.meter.add(ref, out)
        self.total += torch.stack([o.loss(out, ref, 1.0).double() * n, torch.tensor(float(n), dtype=torch.float64, device=self.held.device)])
        self.samples.append(per_sample_loss(o, out, ref).detach().double().reshape(-1))

    def result(self) -> _Eval:
        h = self.held
        self.meter.reduce(h.active, h.group, h.device)
        total = _all_reduce(self.total, h.active, h.group)
        return _Eval(float(total[0] / total[1].clamp_min(1)), self.meter.result(), torch.cat(self.samples))


#: the most memory (bytes) the original's site outputs on the held-out data may take in a :class:`HeldoutRecord`
#: (beyond it the record keeps only the model outputs and the checks run the original again for its site outputs)
RECORD_BYTES = 256 * 2 ** 20


def _detached(out: Any) -> Any:
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out)


class HeldoutRecord:
    """What one pass of the original and the still-naive swapped model over the held-out data leaves for
    the checks, so they need not run either again: the batches, the original's outputs, the naive
    swap's outputs and (within :data:`RECORD_BYTES`) the original's output at every site, per batch and
    call. :func:`normswap.keep.recover.keep_function` fills it during its ``naive`` measure
    (:func:`normswap.keep.calibrate.metrics.agreement_and_drift` with ``record=``) and hands it to
    :func:`~normswap.keep.calibrate.calibrate` (``heldout_record=``) for the same held-out data."""

    def __init__(self, budget: int | None = None) -> None:
        self.batches: list[tuple[Tensor, ...]] = []
        self.refs: list[Any] = []
        self.naive: list[Any] = []
        #: per batch, per site, the original's output at each call (None: over the memory budget)
        self.sites: list[dict[str, list[Tensor]]] | None = []
        self.site_names: set[str] = set()  # the sites the pass tapped
        self.bytes = 0
        self.budget = RECORD_BYTES if budget is None else budget
        self.complete = False

    def begin(self, batch: tuple[Tensor, ...]) -> None:
        self.batches.append(batch)
        if self.sites is not None:
            self.sites.append({})

    def site(self, name: str, y: Tensor) -> None:
        if self.sites is None:
            return
        self.bytes += y.numel() * y.element_size()
        if self.bytes > self.budget:
            self.sites = None
            return
        self.sites[-1].setdefault(name, []).append(y.detach())

    def end(self, ref: Any, out: Any) -> None:
        self.refs.append(_detached(ref))
        self.naive.append(_detached(out))

    def covers(self, names: Any) -> bool:
        """Were the site outputs of every site in ``names`` recorded (when it ran)?"""
        return self.sites is not None and set(names) <= self.site_names


@dataclass
class _Screen:
    fitted: _Eval
    readout_previous: _Eval | None
    sites: dict[str, Paired]


class _Heldout:
    """Held-out data (kept on the device); the original's outputs are computed by the first pass
    (:meth:`screen`) and reused by every later one."""

    def __init__(self, student: nn.Module, data: Any, active: bool, group: Any, rank: int, world: int, shard: bool,
                 device: torch.device, record: HeldoutRecord | None = None) -> None:
        self.student, self.active, self.group, self.device = student, active, group, device
        self.batches: list[tuple[Tensor, ...]] = []
        self.refs: list[Any] = []
        #: the held-out measure's pass of the original and the naive swap (its batches are the held-out data)
        self.record = record if record is not None and record.complete and record.batches and not active else None
        if self.record is not None:
            self.batches = [_to(b, device) for b in self.record.batches]
            self.refs = list(self.record.refs)
        for b in (as_batches(data) if self.record is None else ()):
            if active and shard:
                b = local_batch(b, rank, world)
                if b is None:
                    continue
            self.batches.append(_to(b, device))
        if not self.batches:
            raise InputError("the held-out data yielded no batches; give at least one sample")
        self.outputs: Any = None
        self.loss_name = ""

    def set_outputs(self, outputs: Any) -> None:
        self.outputs = outputs
        self.loss_name = f"{outputs.kind.name} distillation loss"

    def reduce(self, t: Tensor) -> Tensor:
        return _all_reduce(t, self.active, self.group)

    def screen(self, teacher: nn.Module, mods: dict[str, nn.Module], previous: dict[str, dict[str, Tensor]],
               head: Any = None) -> _Screen:
        """Pass 1 (module docstring): the original's outputs (kept), the fitted student's loss, the loss
        with ``head``'s trained weights (when given: the readout was refit), and each site's paired error."""
        rec = self.record
        # the original's site outputs from the record when it holds them: then the original does not run at all
        cached = rec is not None and bool(self.refs) and rec.covers(mods)
        tap = _TeacherTap(teacher, [] if cached else list(mods), reuse=True)
        queues: dict[str, list[Tensor]] = {}

        def pop(name: str) -> Tensor | None:
            if not cached:
                return tap.pop(name)
            q = queues.get(name)
            return q.pop(0) if q else None

        errs: dict[str, tuple[list[Tensor], list[Tensor]]] = {n: ([], []) for n in mods}
        busy = [False]
        feats: list[Tensor] = []

        def site_hook(name: str):
            def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
                if busy[0]:
                    return
                y = pop(name)
                if y is None or not isinstance(out, Tensor) or out.shape != y.shape:
                    return
                busy[0] = True
                try:
                    prev = _call_with(mod, previous[name], (args[0],))
                finally:
                    busy[0] = False
                errs[name][0].append(_sq_err(out, y))
                errs[name][1].append(_sq_err(prev, y))
            return hook

        handles = [m.register_forward_hook(site_hook(n)) for n, m in mods.items()]
        if head is not None:
            handles.append(head.linear.register_forward_hook(lambda m, a, o: None if busy[0] else feats.append(a[0])))
            w0 = head.W0[:-1].t().reshape(head.linear.weight.shape).to(head.linear.weight.dtype)
            trained = {"weight": w0} | ({"bias": head.W0[-1].to(head.linear.bias.dtype)} if head.linear.bias is not None else {})
        fitted, alt = _Acc(self), (_Acc(self) if head is not None else None)
        keep = not self.refs
        try:
            with eval_mode(teacher, self.student), standardized_once(self.student), torch.no_grad():
                for i, b in enumerate(self.batches):
                    if cached:
                        ref = self.refs[i]
                        queues = {n: list(v) for n, v in rec.sites[i].items()}
                    else:
                        ref = teacher(*b)
                        if keep:
                            self.refs.append(ref)
                    out = self.student(*b)
                    n = int(b[0].shape[0])
                    fitted.add(ref, out, n)
                    if alt is not None and feats:
                        busy[0] = True
                        try:
                            z = _call_with(head.linear, trained, (feats[-1],))
                        finally:
                            busy[0] = False
                        leaves, spec = pytree.tree_flatten(out)
                        j = next(k for k, t in enumerate(leaves) if isinstance(t, Tensor))
                        leaves[j] = head.link.forward(z).reshape(leaves[j].shape).to(leaves[j].dtype)
                        alt.add(ref, pytree.tree_unflatten(leaves, spec), n)
                    feats.clear()
                    tap.clear()
        finally:
            for h in handles:
                h.remove()
            tap.remove()
        sites = {n: paired(torch.cat(a), torch.cat(b), self.reduce) for n, (a, b) in errs.items() if a}
        return _Screen(fitted.result(), alt.result() if alt is not None else None, sites)

    def naive(self) -> _Eval:
        """The naive swap over the held-out data, from the record (no forward)."""
        acc = _Acc(self)
        for b, ref, out in zip(self.batches, self.refs, self.record.naive):
            acc.add(ref, out, int(b[0].shape[0]))
        return acc.result()

    def evaluate(self) -> _Eval:
        """The student as it is now, over the held-out data (the original's outputs from :meth:`screen`)."""
        acc = _Acc(self)
        with eval_mode(self.student), standardized_once(self.student), torch.no_grad():
            for b, ref in zip(self.batches, self.refs):
                acc.add(ref, self.student(*b), int(b[0].shape[0]))
        return acc.result()


def _decision(held: _Heldout, what: str, fitted: _Eval, previous: _Eval) -> dict[str, Any]:
    """One decision: both held-out losses, the paired noise figure of (fitted − previous), the sample
    count, and which is kept (the lower loss: never worse on the held-out data)."""
    p = paired(fitted.per_sample, previous.per_sample, held.reduce)
    kept = "previous" if previous.loss < fitted.loss else "fitted"
    return {"site": what, "fitted": fitted.loss, "previous": previous.loss, "kept": kept, "samples": p.n,
            "diff": p.diff, "se": p.se, "noise": p.noise, "beyond_noise": p.worse or p.better}


def never_worse(held: _Heldout, teacher: nn.Module, fits: dict[str, Any], mods: dict[str, nn.Module],
                naive_state: dict[str, dict[str, Tensor]], head: Any, readout_info: dict[str, Any] | None,
                sites: list[SiteCalibration], check: bool) -> dict[str, Any]:
    """Run the checks (module docstring) and leave the student in the state they chose; returns the
    report's ``heldout`` entry."""
    refit = head is not None and readout_info is not None and bool(readout_info.get("refit"))
    scr = held.screen(teacher, mods if check else {}, naive_state, head if refit and check else None)
    fitted_state = {n: _state(m) for n, m in mods.items()}
    if held.record is not None:  # the naive swap's outputs are in the record: no forward, nothing to load
        naive = held.naive()
    else:
        for n, m in mods.items():  # the naive swap: every previous parameter, the trained readout
            _load(m, naive_state[n])
        if refit:
            head.restore()
        naive = held.evaluate()
        for n, m in mods.items():
            _load(m, fitted_state[n])
        if refit:
            head.write()
    samples = paired(naive.per_sample, naive.per_sample, held.reduce).n  # over every rank
    info: dict[str, Any] = {"loss": held.loss_name, "samples": samples, "loss_naive": naive.loss,
                            "loss_fitted": scr.fitted.loss, "naive": dict(naive.measures),
                            # the primary measure and its name (a decoder's are its own, not the registry's)
                            "primary": naive.measures.primary, "label": naive.measures.label}
    own = 2 if held.record is None else 1  # with the record, the naive swap's loss came from the held-out measure's pass
    if held.record is not None:
        info["shared"] = ("the original's held-out outputs" + (" and site outputs" if held.record.covers(mods) else "")
                          + " and the naive swap's outputs from the held-out measure's pass")
    if not check:
        info.update(loss_after=scr.fitted.loss, after=dict(scr.fitted.measures), checked=False, passes=own)
        return info
    by_site = {s.site: s for s in sites}
    trace: list[dict[str, Any]] = []
    cur, passes = scr.fitted, own
    if refit and scr.readout_previous is not None:
        d = _decision(held, "readout", cur, scr.readout_previous)
        trace.append(d)
        if d["kept"] == "previous":
            head.restore()
            readout_info["refit"] = False
            readout_info["note"] = (f"readout refit reverted: it raised the held-out {held.loss_name} "
                                    f"{d['previous']:.4g} → {d['fitted']:.4g} ({d['samples']} samples)")
            cur = scr.readout_previous
    screened = [{"site": n, **p.to_dict(), "worse": p.worse} for n, p in scr.sites.items()]
    worse = [n for n, p in scr.sites.items() if p.worse]
    if worse:
        for n in worse:
            _load(mods[n], naive_state[n])
        reverted = held.evaluate()
        passes += 1
        d = _decision(held, f"{len(worse)} site(s) screened worse: " + ", ".join(worse[:4]) + (", ..." if len(worse) > 4 else ""),
                      cur, reverted)
        d["sites"] = list(worse)
        trace.append(d)
        if d["kept"] == "previous":
            for n in worse:
                s = by_site[n]
                s.status = "kept-previous"
                s.note = (f"fitted parameters raised this site's held-out error ({scr.sites[n]}), and putting the "
                          f"{len(worse)} such site(s) back lowered the held-out {held.loss_name} ({d['fitted']:.4g} → "
                          f"{d['previous']:.4g}); kept the previous ones"
                          + (f" (fit R² {s.r2_after:.2f})" if s.r2_after is not None else ""))
            cur = reverted
        else:
            for n in worse:
                _load(mods[n], fitted_state[n])
    d = _decision(held, "all (vs the naive swap)", cur, naive)
    trace.append(d)
    if d["kept"] == "previous":  # still worse than the naive swap: put everything back
        for n, mod in mods.items():
            _load(mod, naive_state[n])
            if by_site[n].status != "not-run":
                by_site[n].status, by_site[n].note = "kept-previous", ("calibration as a whole raised the held-out loss; "
                                                                        "all sites kept the previous ones")
        if head is not None and readout_info is not None and readout_info.get("refit"):
            head.restore()
            readout_info["refit"] = False
            readout_info["note"] = "readout refit reverted with the rest: calibration as a whole raised the held-out loss"
        cur = naive
    info.update(loss_after=cur.loss, after=dict(cur.measures), checked=True, trace=trace, screen=screened, passes=passes,
                kept_previous=[s.site for s in sites if s.status == "kept-previous"])
    return info
