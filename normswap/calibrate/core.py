"""The calibration pass (see the package docstring)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..data import as_batches, local_batch
from ..errors import InputError, NormswapError
from ..norms.ws import standardized_once
from ..parity import eval_mode
from ..kinds import Meter, outputs_for
from .readout import READOUT_MIN_REL, _Readout, _ReadoutProbe
from .report import LOW_R2, MIN_R2_GAIN, CalibrationReport, SiteCalibration
from .solvers import SN_BATCHES, SN_LR, SN_STEPS, _BinFit, _Fit, _fit_quality, _Scratch, _SNFit, _why_lossy
from .dist import _all_reduce, _dist_group
from .taps import _TeacherTap, _inner, _kind, _leaves, _model_device, _to, swapped_sites

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
    output_kind: Any = None,
    heldout: Any = None,
    heldout_name: str | None = None,
    check: bool = True,
    readout_ridge: float | None = None,
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
    ``output_kind``: the outputs' kind (a name of :data:`normswap.kinds.KIND_NAMES` or
    :class:`~normswap.kinds.Outputs`; default: detected from the original's outputs on the first batch).
    ``heldout``: data the fit never sees (batches, or a tensor). With it, the report's agreement is
    measured on it before and after, and (``check``) calibration never makes the held-out loss worse:
    the readout refit, then each site in execution order, keeps its previous parameters when the
    fitted ones raise the kind's loss on ``heldout`` (status ``kept-previous``), and if the result is
    still worse than the naive swap everything is put back. ``readout_ridge``: the readout's ridge
    strength (default :data:`READOUT_RIDGE`).
    """
    from ..convert import Conversion

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

    smod_of = {n: _inner(smods[n]) for n in fits}
    naive_state = {n: _state(m) for n, m in smod_of.items()}
    device = _model_device(student)
    held: _Heldout | None = None
    held_naive: tuple[float, Any] | None = None
    if heldout is not None:
        held = _Heldout(teacher, student, heldout, output_kind, active, group, rank, world, shard_batches, device)
        held_naive = held.evaluate()

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

    samples = nbatches = 0
    teacher_seconds = 0.0
    outputs = held.outputs if held is not None else None
    agree = Meter(outputs if outputs is not None else output_kind, teacher)
    head: _Readout | None = None
    # the readout: when asked for (readout=True), or by default when some site was fitted
    probe: _ReadoutProbe | None = _ReadoutProbe(student) if readout_mode == "on" or (readout_mode == "auto" and fits) else None
    readout_why: str | None = None
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
                agree = Meter(outputs if outputs is not None else output_kind, teacher)
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
                    if outputs is None:
                        outputs = outputs_for(ref, output_kind, teacher)
                        agree = Meter(outputs)
                    agree.add(ref, out)
                    if on_batch is not None:
                        on_batch()
                    if probe is not None:
                        name, feats, link = probe.find(out)
                        readout_why = probe.why
                        probe.remove()
                        probe = None
                        lin = smods.get(name) if name is not None else None
                        if lin is not None:
                            head = _Readout(name, lin, active, group, link, readout_ridge)
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
        readout_info = {"module": head.name, "link": head.link.name, "refit": do, "ridge": head.ridge,
                        "rel_before": round(q["rel_before"], 6), "rel_after": round(q["rel_after"], 6)}
        if not do:
            readout_info["note"] = f"no readout refit: the outputs already match (rel err {rel_now:.1e} ≤ {READOUT_MIN_REL})"
    elif not fits:
        readout_info = {"refit": False, "note": "no readout refit: no swapped site to calibrate, the outputs are unchanged"}
    elif readout_mode == "off":
        readout_info = {"refit": False, "note": "no readout refit: turned off (readout=False)" if readout is False
                        else "no readout refit: only the given sites are calibrated"}
    else:
        readout_info = {"refit": False, "note": readout_why or "no readout refit: no readout found"}

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

    seconds = time.perf_counter() - t_start  # the pass and the solves: what cost_ratio compares (the checks below are apart)

    # -- calibration never makes the held-out loss worse: readout, then each site, then all together
    heldout_info: dict[str, Any] | None = None
    if held is not None and held_naive is not None:
        t_check = time.perf_counter()
        heldout_info = _never_worse(held, held_naive, fits, smod_of, naive_state, order, head, readout_info, report_sites,
                                    check and bool(fits))
        heldout_info["data"] = heldout_name or "held-out data"
        heldout_info["seconds"] = round(time.perf_counter() - t_check, 4)
        kept = [s for s in report_sites if s.status == "kept-previous"]
        if kept:
            warnings.append(f"{len(kept)} site(s) kept their previous parameters: the fitted ones raised the held-out "
                            f"{held.loss_name} ({', '.join(s.site for s in kept[:4])}{', ...' if len(kept) > 4 else ''})")
    advice = _advise(teacher, student, data, report_sites, smod_of, conv, device) if fits else []
    warnings += advice

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
        teacher_seconds=teacher_seconds, world_size=world, agreement=dict(agree.result()), readout=readout_info,
        warnings=warnings, output_kind=None if outputs is None else outputs.describe(), heldout=heldout_info,
    )


# ---------------------------------------------------------------------------------------------------
# the held-out check


def _state(m: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _load(m: nn.Module, state: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for k, v in m.state_dict().items():
            v.copy_(state[k])


class _Heldout:
    """Held-out data with the original's outputs computed once; :meth:`evaluate` runs the student over
    it: (the kind's loss at temperature 1, mean per sample; the kind's measures)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, data: Any, output_kind: Any, active: bool, group: Any,
                 rank: int, world: int, shard: bool, device: torch.device) -> None:
        self.student, self.active, self.group, self.device = student, active, group, device
        self.batches: list[tuple[Tensor, ...]] = []
        self.refs: list[Any] = []
        with eval_mode(teacher), torch.no_grad():
            for b in as_batches(data):
                if active and shard:
                    b = local_batch(b, rank, world)
                    if b is None:
                        continue
                b = _to(b, device)
                self.batches.append(b)
                self.refs.append(teacher(*b))
        if not self.refs:
            raise InputError("the held-out data yielded no batches; give at least one sample")
        self.outputs = outputs_for(self.refs[0], output_kind, teacher)
        self.loss_name = f"{self.outputs.kind.name} distillation loss"

    def evaluate(self) -> tuple[float, Any]:
        meter = Meter(self.outputs)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        with eval_mode(self.student), standardized_once(self.student), torch.no_grad():
            for b, ref in zip(self.batches, self.refs):
                out = self.student(*b)
                meter.add(ref, out)
                n = float(b[0].shape[0])
                total += torch.stack([self.outputs.loss(out, ref, 1.0).double() * n, torch.tensor(n, dtype=torch.float64, device=self.device)])
        meter.reduce(self.active, self.group, self.device)
        total = _all_reduce(total, self.active, self.group)
        return float(total[0] / total[1].clamp_min(1)), meter.result()


#: a change counts as worse only beyond this relative margin (float noise of the loss)
_WORSE_MARGIN = 1e-6


def _never_worse(held: _Heldout, naive: tuple[float, Any], fits: dict[str, Any], mods: dict[str, nn.Module],
                 naive_state: dict[str, dict[str, Tensor]], order: list[str], head: Any, readout_info: dict[str, Any] | None,
                 sites: list[SiteCalibration], check: bool) -> dict[str, Any]:
    loss0, m0 = naive
    loss, m = held.evaluate()
    info: dict[str, Any] = {"loss": held.loss_name, "loss_naive": loss0, "loss_fitted": loss, "naive": dict(m0)}
    if not check:
        info.update(loss_after=loss, after=dict(m), checked=False)
        return info
    by_site = {s.site: s for s in sites}
    fitted_state = {n: _state(mod) for n, mod in mods.items()}
    trace: list[dict[str, Any]] = []  # each decision: the held-out loss with the fit and with the previous parameters
    if head is not None and readout_info is not None and readout_info.get("refit"):
        head.restore()
        l_r, m_r = held.evaluate()
        trace.append({"site": "readout", "fitted": loss, "previous": l_r, "kept": "previous" if l_r < loss * (1 - _WORSE_MARGIN) else "fitted"})
        if l_r < loss * (1 - _WORSE_MARGIN):
            readout_info["refit"] = False
            readout_info["note"] = (f"readout refit reverted: it raised the held-out {held.loss_name} {l_r:.4g} → {loss:.4g}")
            loss, m = l_r, m_r
        else:
            head.write()
    for n in [*order, *[k for k in fits if k not in order]]:
        if n not in mods:
            continue
        _load(mods[n], naive_state[n])
        l_s, m_s = held.evaluate()
        trace.append({"site": n, "fitted": loss, "previous": l_s, "kept": "previous" if l_s < loss * (1 - _WORSE_MARGIN) else "fitted"})
        if l_s < loss * (1 - _WORSE_MARGIN):
            s = by_site[n]
            s.status = "kept-previous"
            s.note = (f"fitted parameters raised the held-out {held.loss_name} ({l_s:.4g} → {loss:.4g}); "
                      "kept the previous ones" + (f" (fit R² {s.r2_after:.2f})" if s.r2_after is not None else ""))
            loss, m = l_s, m_s
        else:
            _load(mods[n], fitted_state[n])
    if loss > loss0 * (1 + _WORSE_MARGIN):  # still worse than the naive swap: put everything back
        for n, mod in mods.items():
            _load(mod, naive_state[n])
            if by_site[n].status not in ("not-run",):
                by_site[n].status, by_site[n].note = "kept-previous", "calibration as a whole raised the held-out loss; all sites kept their previous parameters"
        if head is not None and readout_info is not None and readout_info.get("refit"):
            head.restore()
            readout_info["refit"] = False
            readout_info["note"] = "readout refit reverted with the rest: calibration as a whole raised the held-out loss"
        loss, m = held.evaluate()
    info.update(loss_after=loss, after=dict(m), checked=True, trace=trace,
                kept_previous=[s.site for s in sites if s.status == "kept-previous"])
    return info


# ---------------------------------------------------------------------------------------------------
# when GroupNorm cannot match: what would


#: batches of the calibration data the advice pass looks at
ADVICE_BATCHES = 2


def _advise(teacher: nn.Module, student: nn.Module, data: Any, sites: list[SiteCalibration], mods: dict[str, nn.Module],
            conv: Any, device: torch.device) -> list[str]:
    """For GroupNorm sites calibration could not match (R² < LOW_R2): the R² the best per-channel affine
    reaches at the same site with the statistics of LayerNorm (G = 1) and of other group counts, on the
    first :data:`ADVICE_BATCHES` calibration batches; the better alternative is named, with numbers.
    Non-negative inputs (after a ReLU) are said so: their group means carry the signal GN removes."""
    import torch.nn.functional as F

    weak = [s for s in sites if s.status in ("low-r2", "cannot-help", "kept-previous") and isinstance(mods.get(s.site), nn.GroupNorm)
            and s.r2_after is not None]
    if not weak:
        return []
    names = [s.site for s in weak]
    tap = _TeacherTap(teacher, names)
    xs: dict[str, list[Tensor]] = {n: [] for n in names}
    handles = [mods[n].register_forward_pre_hook(lambda m, a, n=n: xs[n].append(a[0].detach().clone())) for n in names]
    ys: dict[str, list[Tensor]] = {n: [] for n in names}
    try:
        with eval_mode(teacher, student), torch.no_grad():
            for i, b in enumerate(as_batches(data)):
                if i >= ADVICE_BATCHES:
                    break
                b = _to(b, device)
                teacher(*b)
                student(*b)
                for n in names:
                    y = tap.pop(n)
                    if y is not None:
                        ys[n].append(y.detach().clone())
                tap.clear()
    finally:
        for h in handles:
            h.remove()
        tap.remove()

    def r2(z: Tensor, y: Tensor) -> float:
        c = z.shape[1]
        zc, yc = z.movedim(1, 0).reshape(c, -1).double(), y.movedim(1, 0).reshape(c, -1).double()
        zc, yc = zc - zc.mean(1, keepdim=True), yc - yc.mean(1, keepdim=True)
        vz, vy, cov = (zc * zc).sum(1), (yc * yc).sum(1), (zc * yc).sum(1)
        sse = vy - torch.where(vz > 0, cov * cov / vz.clamp_min(1e-300), torch.zeros_like(vz))
        return float(1 - sse.sum() / vy.sum().clamp_min(1e-300))

    lines: list[str] = []
    tally: dict[int, list[float]] = {}
    cur_tally: list[float] = []
    nonneg = 0
    for s in weak:
        if not xs[s.site] or not ys[s.site]:
            continue
        x, y = torch.cat(xs[s.site]), torch.cat(ys[s.site])
        if x.shape != y.shape or x.dim() < 3:
            continue
        gn = mods[s.site]
        c, g_now = int(x.shape[1]), int(gn.num_groups)
        options = sorted({1, *(g for g in (2, 4, 8, 16, 32, 64) if c % g == 0)} - {g_now})
        scores = {g: r2(F.group_norm(x, g, eps=gn.eps), y) for g in options}
        now = r2(F.group_norm(x, g_now, eps=gn.eps), y)
        cur_tally.append(now)
        for g, v in scores.items():
            tally.setdefault(g, []).append(v)
        if bool((x >= 0).all()):
            nonneg += 1
        best = max(scores, key=scores.get) if scores else None
        if best is not None and scores[best] > now + 0.02:
            s.extra["alternatives_r2"] = {("ln" if g == 1 else f"groups={g}"): round(v, 4) for g, v in scores.items()}
            s.extra["alternatives_r2"][f"groups={g_now} (this)"] = round(now, 4)
    if not tally or not cur_tally:
        return lines
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    best_g = max(tally, key=lambda g: mean(tally[g]))
    if mean(tally[best_g]) > mean(cur_tally) + 0.02:
        alt = "--to ln (GroupNorm(1, C))" if best_g == 1 else f"--groups {best_g}"
        why = f"; {nonneg} of them take non-negative (post-ReLU) inputs, whose group means GN removes" if nonneg else ""
        lines.append(f"GroupNorm cannot match the original at {len(cur_tally)} site(s): the best per-channel fit reaches R² "
                     f"{mean(cur_tally):.2f} (mean){why}; {alt} reaches R² {mean(tally[best_g]):.2f} at the same sites "
                     f"(first {ADVICE_BATCHES} calibration batches): try it")
    return lines
